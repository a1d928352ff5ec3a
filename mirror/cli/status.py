"""`mirror status --config F [--json] [--watch [S]]`: what a role last reported
(its STATE_DIR/status.json), in words or as JSON; once, or redrawn in place."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import domain_or_config, json_flag, within

if TYPE_CHECKING:  # imported by the commands: not by `mirror --help`
    from mirror.config import Config


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="what this host's daemon (a role, or the host agent) reports")
    domain_or_config(p, "host configuration (TOML)")
    json_flag(p)
    p.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=within(float, 0.1, 3600),
        metavar="S",
        help="refresh in place every S seconds (default 1) until interrupted",
    )


def run(cfg: Config, args: argparse.Namespace) -> int:
    """`mirror status --config F`."""
    if args.watch:
        return watch_status(cfg, args.json, args.watch)
    return show_status(cfg, args.json)


def _read_status(cfg: Config) -> tuple[dict[str, Any] | None, str, int]:
    """The role's last report, or None, why not and the exit code that says so
    (NOT_RUNNING: no role has reported; ERROR: the report cannot be read)."""
    from mirror.hoststate import read_json, running

    path = cfg.state_dir / "status.json"
    try:
        st = read_json(path)
    except FileNotFoundError:
        return None, (f"not running: no role has reported in {cfg.state_dir} (no "
                      f"{path.name}; start it with `mirror primary|secondary --config F`)"
                      ), output.NOT_RUNNING
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}: {getattr(e, 'strerror', None) or e}", output.ERROR
    if not isinstance(st, dict):
        return None, f"{path} is not a role's report (not a JSON object)", output.ERROR
    st = dict(st)
    st["running"] = running(st)
    at = st.get("reported_at")
    try:
        st["report_age_s"] = round(max(0.0, time.time() - float(at)), 1)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        st["report_age_s"] = round(max(0.0, time.time() - path.stat().st_mtime), 1)
    return st, "", output.OK


def _render(st: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(st, indent=1)
    lines = [f"{k:>24}: {v}" for k, v in status_rows(st)]
    return "\n".join(lines)


def show_status(cfg: Config, as_json: bool) -> int:
    """Exit 0: the role runs; 3 (NOT_RUNNING): no role has reported, or the one that
    last reported is not running (killed, or stopped); 2: its report cannot be read."""
    st, why, code = _read_status(cfg)
    if st is None:
        if code == output.NOT_RUNNING:
            return output.not_running(why, as_json)
        return output.error(why, as_json=as_json)
    print(_render(st, as_json))
    return output.OK if st["running"] else output.NOT_RUNNING


def watch_status(cfg: Config, as_json: bool, every: float) -> int:
    """`mirror status --watch`: the status redrawn in place every ``every`` seconds
    (cursor home, clear below) until interrupted."""
    try:
        while True:
            st, why, _ = _read_status(cfg)
            text = f"mirror: {why}" if st is None else _render(st, as_json)
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[J{cfg.node.name} at {stamp} (every {every:g} s)\n")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return output.OK


def _age(v: object) -> str:
    return "never seen" if v is None else f"{float(v):.2f} s"  # type: ignore[arg-type]


def throttle_row(t: dict[str, Any]) -> str:
    """The throttle (checkpoint.max_pause_ms) in words."""
    if not t.get("active"):
        return str(t.get("note") or "off")
    level = float(t.get("level") or 0)
    now = f"level {level:.2f} (the guest at {100 * (1 - level):.0f}% speed)" if level else "off now"
    row = (f"{now}; throttled {t.get('throttled_s')} s in all; pause budget "
           f"{t.get('max_pause_ms')} ms; capacity {t.get('capacity_mb_per_s')} MB/s")  # fmt: skip
    if t.get("cannot_hold"):
        row += "; CANNOT HOLD the guest: at its slowest it still overruns the budget"
    return row


def status_rows(st: dict[str, Any]) -> list[tuple[str, object]]:
    """The status an operator reads first, in words; everything else with --json."""
    summary = st.get("summary") if isinstance(st.get("summary"), dict) else {}
    assert isinstance(summary, dict)
    age = st.get("report_age_s")
    if st.get("running", True):
        process_row = f"running (pid {st.get('pid')}, reported {age} s ago)"
    elif st.get("phase") == "stopped":
        process_row = f"not running (stopped; last report {age} s ago)"
    else:
        process_row = f"not running (last report {age} s ago); what it last reported:"
    rows: list[tuple[str, object]] = [
        ("process", process_row),
        ("node", f"{st.get('node')} of pair {st.get('pair')}, generation {st.get('generation')}"),
        ("role", st.get("role")),
        ("phase", st.get("phase")),
        ("protection", st.get("protection")),
    ]
    if st.get("arbiter_unverified"):  # the arbiter has not shown the peer: no failover
        rows.append(("not protected", st.get("arbiter_unverified")))
    if st.get("output_faults"):  # a NIC's gate broke: frames dropped, or leaving unheld
        rows.append(("NIC gates BROKEN", "; ".join(map(str, st["output_faults"]))))
    if st.get("role") == "secondary":
        rows += [
            ("committed checkpoint", st.get("committed")),
            ("primary", st.get("primary") or "none (not paired)"),
        ]
    elif "promoted_from" in st:
        ms = st.get("failover_ms")
        rows += [
            ("promoted from checkpoint", st.get("promoted_from")),
            ("failover", f"{ms:.0f} ms" if isinstance(ms, int | float) else "in progress"),
        ]
    if st.get("role") == "primary":
        rows += [
            ("checkpoints", f"{st.get('epoch')} taken, {st.get('acked')} acknowledged"),
            (
                "pause",
                f"p50 {summary.get('pause_ms_p50')} ms, p99 {summary.get('pause_ms_p99')} ms",
            ),
            ("scan", f"{summary.get('scan') or '?'}"
                     + (f" ({summary['scan_note']})" if summary.get("scan_note") else "")),
            ("replication", f"{summary.get('dirty_mb_per_s')} MB/s of dirty pages"),
            (
                "outputs",
                f"{summary.get('outputs_released')} released, {summary.get('outputs_held')} held",
            ),
        ]
    throttle = st.get("throttle")
    if st.get("role") == "primary" and isinstance(throttle, dict) and throttle.get("max_pause_ms"):
        rows.append(("throttle", throttle_row(throttle)))
    disk = st.get("disk")
    if st.get("role") == "primary" and isinstance(disk, dict) and "storage" in disk:
        storage = disk["storage"]
        if storage == "remote":  # the local image failed: the disk runs on the secondary's
            peer = st.get("peer_node") or "the secondary"
            storage = f"remote ({peer}): local image failed: {disk.get('storage_error')}"
        elif storage == "suspended":
            storage = f"suspended: local image failed ({disk.get('storage_error')}), secondary gone"
        rows.append(("storage", storage))
    if "heartbeat_age_s" in st:
        rows.append(("peer heartbeat, network", _age(st.get("heartbeat_age_s"))))
    if "storage_age_s" in st:
        rows.append(("peer heartbeat, storage", _age(st.get("storage_age_s"))))
    if st.get("metrics"):
        rows.append(("metrics", f"http://{st.get('metrics')}/metrics"))
    return rows
