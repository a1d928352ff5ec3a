"""The `mirror` command: thin; it reads configuration and runs an agent role or the demo.

mirror secondary --config F              run this host's standby
mirror primary --config F [--duration S] [--checkpoints N]
mirror status --config F [--json]        what this host's agent reports
mirror failover --config F [--force]     promote this host's secondary now
mirror switchover --config F             planned role swap (run on the primary's host)
(failover and switchover reach the agent through STATE_DIR/control.sock)
mirror keygen [--dir D] [--name N]       this host's interconnect key pair (CurveZMQ)
mirror image build [--dir D]             the demo guest (Debian kernel + busybox initramfs)
mirror demo [--guest synthetic|qemu|libvirt] ... a primary and a secondary on this machine
mirror pool COMMAND ...                  pool HA on etcd (mirror pool --help)
mirror agent [--config F]                this host's agent: every pair role on the host
mirror pair DOMAIN --peer HOST [--check] mirror a libvirt domain onto HOST (via the agents)
mirror unpair DOMAIN | list              undo it | the pairs this host's agent runs
mirror status|failover|switchover DOMAIN the same for a pair the agent runs
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.config import (
    DEFAULT_AGENT_CONFIG,
    Config,
    ConfigError,
    load,
    parse_hostport,
    require_arbiter,
)
from mirror.guests import image
from mirror.guests.base import GuestError
from mirror.ha import control, hostcli, primary, rekey, role, secondary
from mirror.hoststate import read_json, running
from mirror.lab import demo, libvirtdemo, qemudemo
from mirror.pool import cli as pool_cli
from mirror.replication import keys
from mirror.replication.standby import StandbyError


def _positive(kind: type, lo: float, hi: float):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be within {lo:g}..{hi:g}, got {text}")
        return v  # type: ignore[no-any-return]

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mirror", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    json_help = (
        "log one JSON object per line (time, level, logger, and an event's fields or "
        "the message), for journald or a log shipper"
    )
    ap.add_argument("--log-json", action="store_true", help=json_help)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("secondary", help="run this host's standby (until SIGTERM)")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS, help=json_help)

    p = sub.add_parser("primary", help="run the guest here, mirrored to the secondary")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS, help=json_help)
    p.add_argument(
        "--duration",
        type=_positive(float, 0.1, 1e9),
        metavar="S",
        help="stop after S seconds of checkpoints (default: until SIGTERM)",
    )
    p.add_argument(
        "--checkpoints",
        type=_positive(int, 1, 10**9),
        metavar="N",
        help="take N checkpoints, then hold the guest paused at the last one",
    )
    p.add_argument(
        "--leave-after-switchover",
        action="store_true",
        help="after a switchover exit instead of becoming the secondary (the pool's "
        "agent uses it: the new standby is on another host)",
    )

    p = sub.add_parser("status", help="what this host's agent reports")
    _domain_or_config(p, "host configuration (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--watch",
        nargs="?",
        const=1.0,
        type=_positive(float, 0.1, 3600),
        metavar="S",
        help="refresh in place every S seconds (default 1) until interrupted",
    )

    p = sub.add_parser("failover", help="promote this host's secondary now (manual failover)")
    _domain_or_config(p, "the secondary host's configuration (TOML)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even though the primary's storage heartbeat is fresh",
    )
    p.add_argument(
        "--timeout",
        type=_positive(float, 1, 3600),
        default=30.0,
        metavar="S",
        help="seconds to wait for the promotion (default 30)",
    )

    p = sub.add_parser(
        "switchover",
        help="planned role swap: the secondary takes over, this host becomes its secondary",
    )
    _domain_or_config(p, "the primary host's configuration (TOML)")
    p.add_argument(
        "--timeout",
        type=_positive(float, 1, 3600),
        default=30.0,
        metavar="S",
        help="seconds to wait for the swap (default 30)",
    )

    p = sub.add_parser(
        "keygen",
        help="write this host's interconnect key pair (CurveZMQ; see docs/security.md)",
    )
    p.add_argument("--dir", default="/etc/mirror", help="where to write it (default /etc/mirror)")
    p.add_argument(
        "--name",
        default=socket.gethostname(),
        help="file name: NAME.key (public) and NAME.key_secret (mode 0600); default: "
        "this host's name",
    )

    p = sub.add_parser("keys", help="the running role's interconnect keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser(
        "reload",
        help="make the running role read its [keys] and key files again (as SIGHUP does)",
    )
    k.add_argument("--config", help="the role's configuration (a role run by hand); without "
                   "it: this host's agent (`mirror agent`) and every role it runs")
    k.add_argument("--agent-config", default=DEFAULT_AGENT_CONFIG, metavar="F",
                   help=f"without --config: the agent's configuration (default "
                        f"{DEFAULT_AGENT_CONFIG})")

    p = sub.add_parser("image", help="the demo guest's kernel and initramfs")
    p.add_argument("action", choices=["build"], help="build (or rebuild) the guest image")
    p.add_argument(
        "--dir",
        default=str(image.DEFAULT_DIR),
        help=f"where to put it (default {image.DEFAULT_DIR}, or $MIRROR_IMAGE_DIR)",
    )

    p = sub.add_parser("demo", help="a primary and a secondary on this machine, then a summary")
    p.add_argument(
        "--guest",
        choices=["synthetic", "qemu", "libvirt"],
        default="synthetic",
        help="synthetic (default): a synthetic guest on loopback; qemu: a QEMU guest in "
        "network namespaces whose client's TCP connection survives the kill of its host "
        "(needs root); libvirt: the same with a libvirt domain (each host runs its own "
        "libvirtd)",
    )
    p.add_argument("--config", help="base configuration (TOML); the options below override it")
    p.add_argument(
        "--ram-mib",
        type=_positive(int, 1, 1 << 20),
        help="guest RAM (default 256; 128 for --guest qemu)",
    )
    p.add_argument(
        "--dirty-rate",
        type=_positive(int, 0, 10**8),
        metavar="PAGES_PER_S",
        help="pages the guest dirties per second (default 20000)",
    )
    p.add_argument(
        "--outputs-per-s",
        type=_positive(int, 1, 100_000),
        help="outputs the guest emits per second (default 200)",
    )
    p.add_argument(
        "--shape",
        choices=["uniform", "hot", "sequential"],
        help="where the guest's writes land (default uniform)",
    )
    p.add_argument("--epoch-ms", type=_positive(int, 10, 1000), help="epoch (default 50)")
    p.add_argument(
        "--scan",
        choices=["auto", "log", "hashed", "exact"],
        help="dirty-page scan (default auto: the dirty-page log where the kernel has it)",
    )
    p.add_argument(
        "--duration",
        type=_positive(float, 0.5, 1e6),
        default=10.0,
        metavar="S",
        help="seconds of checkpoints (default 10)",
    )
    p.add_argument(
        "--observer",
        metavar="HOST:PORT",
        help="send the outputs to this TCP endpoint instead of the built-in observer",
    )
    p.add_argument(
        "--kill-after",
        type=_positive(float, 0.5, 1e6),
        metavar="S",
        help="SIGKILL the primary host's whole process group S seconds after it "
        "starts (--guest qemu: after the client connected; default 5 there); the "
        "secondary promotes and the guest goes on there",
    )
    p.add_argument(
        "--run-on",
        type=_positive(float, 0, 1e6),
        default=3.0,
        metavar="S",
        help="with --kill-after: seconds the promoted guest runs before the end (default 3)",
    )
    p.add_argument(
        "--image-dir",
        default=str(image.DEFAULT_DIR),
        help="--guest qemu: the guest image (built there first if missing)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the hosts' files (logs, stats)")
    pool_cli.add_parser(sub)
    hostcli.add_parsers(sub)
    return ap


def _domain_or_config(p: argparse.ArgumentParser, config_help: str) -> None:
    """A role run by hand (``--config F``) or a pair of this host's agent (``DOMAIN``)."""
    p.add_argument("domain", nargs="?", metavar="DOMAIN",
                   help="a pair this host's agent runs (instead of --config)")
    p.add_argument("--config", help=config_help)
    p.add_argument("--agent-config", default=DEFAULT_AGENT_CONFIG, metavar="F",
                   help=f"with DOMAIN: the agent's configuration (default "
                        f"{DEFAULT_AGENT_CONFIG})")


def demo_config(args: argparse.Namespace) -> Config:
    base = load(args.config) if args.config else Config()
    g = base.guest
    guest = replace(
        g,
        ram_mib=args.ram_mib or g.ram_mib,
        dirty_pages_per_s=g.dirty_pages_per_s if args.dirty_rate is None else args.dirty_rate,
        outputs_per_s=args.outputs_per_s or g.outputs_per_s,
        shape=args.shape or g.shape,
    )
    ck = replace(
        base.checkpoint,
        epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
        scan=args.scan or base.checkpoint.scan,
    )
    return replace(base, guest=guest, checkpoint=ck)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    role.setup_logging(args.verbose, args.log_json)
    try:
        if args.command == "pool":
            return pool_cli.run(args)
        return run(args)
    except KeyboardInterrupt:
        print("mirror: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: every known bad input has its own message
        if args.verbose:
            traceback.print_exc()
        print(
            f"mirror: error: internal error: {type(e).__name__}: {e} (a bug in mirror: "
            f"run it again with -v for the traceback, and report it)",
            file=sys.stderr,
        )
        return 2


def run(args: argparse.Namespace) -> int:
    """The command of ``args`` (except pool); a known error is one line, exit 2."""
    try:
        if args.command == "keygen":
            pub, sec, key = keys.generate(Path(args.dir), args.name)
            print(f"secret key: {sec} (mode 0600; keep it on this host)")
            print(f"public key: {pub}")
            print(f"public key (z85): {key.decode()}")
            print(f'on this host:  [keys] secret_key = "{sec}"')
            print(f'on its peer:   [keys] peer_public_key = "{key.decode()}"')
            return 0
        if args.command == "image":
            image.build(Path(args.dir))
            return 0
        if args.command == "demo" and args.guest in ("qemu", "libvirt"):
            libvirt = args.guest == "libvirt"
            default = libvirtdemo.default_base() if libvirt else qemudemo.default_base()
            base = load(args.config) if args.config else default
            base = replace(
                base,
                guest=replace(base.guest, ram_mib=args.ram_mib or 128),
                checkpoint=replace(
                    base.checkpoint,
                    epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
                    scan=args.scan or base.checkpoint.scan,
                ),
            )
            r = qemudemo.run(
                base,
                guest=libvirtdemo.LibvirtDemoGuest() if libvirt else None,
                image_dir=Path(args.image_dir),
                kill_after=args.kill_after or 5.0,
                run_on=args.run_on if args.run_on != 3.0 else 5.0,
                keep=args.keep,
                quiet=args.json,
            )
            (qemudemo.dump_json if args.json else qemudemo.print_summary)(r)
            if libvirt and not args.json:
                libvirtdemo.print_libvirt(r)
            return 0 if r["connection_survived"] else 1
        if args.command == "demo":
            if args.observer:
                parse_hostport(args.observer, "--observer")
            result = demo.run(
                demo_config(args),
                duration=args.duration,
                observer=args.observer,
                keep=args.keep,
                quiet=args.json,
                kill_after=args.kill_after,
                run_on=args.run_on,
            )
            (demo.dump_json if args.json else demo.print_summary)(result)
            return 0
        if args.command in hostcli.HOST_COMMANDS:
            return hostcli.run(args)
        if args.command == "keys" and not args.config:
            answer = hostcli.ask(args, "reload-keys", timeout=120.0)
            return _print_reload(answer)
        if args.command in ("status", "failover", "switchover") and not args.config:
            return agent_pair_command(args)
        cfg = load(args.config)
        if args.command == "keys":
            return reload_keys(cfg)
        if args.command == "status":
            if args.watch:
                return watch_status(cfg, args.json, args.watch)
            return show_status(cfg, args.json)
        if args.command == "failover":
            return manual_failover(cfg, args.force, args.timeout)
        if args.command == "switchover":
            return switchover(cfg, args.timeout)
        require_arbiter(cfg.arbiter, args.config)  # before anything starts
        stop = role.stop_on_signals()
        rekey.install(cfg.keys, cfg.node.name, Path(args.config))  # SIGHUP: read the keys again
        lock, server = control.start(cfg.state_dir)  # one agent per state_dir; its socket
        code: int | None = None
        try:
            if args.command == "secondary":
                code = secondary.run_secondary(cfg, stop)
            else:
                code = primary.run_primary(
                    cfg,
                    stop,
                    duration=args.duration,
                    epochs=args.checkpoints,
                    stay=not args.leave_after_switchover,
                )
            return code
        finally:
            role.mark_stopped(cfg.state_dir, cfg.pair.name, cfg.node.name, code)
            server.close()
            lock.close()
    except (ConfigError, GuestError, StandbyError, ConnectionError, RuntimeError, OSError) as e:
        print(f"mirror: error: {e}", file=sys.stderr)
        return 2


def agent_pair_command(args: argparse.Namespace) -> int:
    """`mirror status|failover|switchover [DOMAIN]` without --config: through this host's
    agent, which names the pair's role configuration (and so its control socket)."""
    if args.domain is None:
        if args.command != "status":
            raise ConfigError(f"mirror {args.command}: give DOMAIN (a pair of this host's "
                              f"agent) or --config F (a role run by hand)")
        args.json = getattr(args, "json", False)
        args.command = "list"
        return hostcli.run(args)
    path, st = hostcli.role_config(args)
    if args.command == "status":
        if args.json:
            print(json.dumps(st, indent=1))
            return 0
        for k in ("pair", "kind", "role", "peer", "generation", "state", "phase", "protection",
                  "epoch", "acked", "committed", "waiting", "role_pid"):
            print(f"{k:>12}: {st.get(k)}")
        if st.get("arbiter_unverified"):  # no failover until the arbiter shows the peer
            print(f"{'not protected':>12}: {st['arbiter_unverified']}")
        return 0 if st.get("running") else NOT_RUNNING
    cfg = load(path)
    if args.command == "failover":
        return manual_failover(cfg, args.force, args.timeout)
    return switchover(cfg, args.timeout)


NOT_RUNNING = 3  # `mirror status`: the agent that last reported is not running


def _read_status(cfg: Config) -> tuple[dict[str, Any] | None, str]:
    """The agent's last report, or None and why not."""
    path = cfg.state_dir / "status.json"
    try:
        st = read_json(path)
    except FileNotFoundError:
        return None, f"no agent has reported in {cfg.state_dir} (no {path.name})"
    except (OSError, ValueError) as e:
        return None, f"cannot read {path}: {getattr(e, 'strerror', None) or e}"
    if not isinstance(st, dict):
        return None, f"{path} is not an agent's report (not a JSON object)"
    st = dict(st)
    st["running"] = running(st)
    at = st.get("reported_at")
    try:
        st["report_age_s"] = round(max(0.0, time.time() - float(at)), 1)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        st["report_age_s"] = round(max(0.0, time.time() - path.stat().st_mtime), 1)
    return st, ""


def _render(st: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(st, indent=1)
    lines = [f"{k:>24}: {v}" for k, v in status_rows(st)]
    return "\n".join(lines)


def show_status(cfg: Config, as_json: bool) -> int:
    """Exit 0: the agent runs; 1: no agent has reported; 3 (NOT_RUNNING): the agent
    that last reported is not running (killed, or stopped)."""
    st, why = _read_status(cfg)
    if st is None:
        print(f"mirror: {why}", file=sys.stderr)
        return 1
    print(_render(st, as_json))
    return 0 if st["running"] else NOT_RUNNING


def watch_status(cfg: Config, as_json: bool, every: float) -> int:
    """`mirror status --watch`: the status redrawn in place every ``every`` seconds
    (cursor home, clear below) until interrupted."""
    try:
        while True:
            st, why = _read_status(cfg)
            text = f"mirror: {why}" if st is None else _render(st, as_json)
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[J{cfg.node.name} at {stamp} (every {every:g} s)\n")
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def _age(v: object) -> str:
    return "never seen" if v is None else f"{float(v):.2f} s"  # type: ignore[arg-type]


def status_rows(st: dict[str, Any]) -> list[tuple[str, object]]:
    """The status an operator reads first, in words; everything else with --json."""
    summary = st.get("summary") if isinstance(st.get("summary"), dict) else {}
    assert isinstance(summary, dict)
    age = st.get("report_age_s")
    if st.get("running", True):
        agent_row = f"running (pid {st.get('pid')}, reported {age} s ago)"
    elif st.get("phase") == "stopped":
        agent_row = f"not running (stopped; last report {age} s ago)"
    else:
        agent_row = f"not running (last report {age} s ago); what it last reported:"
    rows: list[tuple[str, object]] = [
        ("agent", agent_row),
        ("node", f"{st.get('node')} of pair {st.get('pair')}, generation {st.get('generation')}"),
        ("role", st.get("role")),
        ("phase", st.get("phase")),
        ("protection", st.get("protection")),
    ]
    if st.get("arbiter_unverified"):  # the arbiter has not shown the peer: no failover
        rows.append(("not protected", st.get("arbiter_unverified")))
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
            ("replication", f"{summary.get('dirty_mb_per_s')} MB/s of dirty pages"),
            (
                "outputs",
                f"{summary.get('outputs_released')} released, {summary.get('outputs_held')} held",
            ),
        ]
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


def _wait_status(
    cfg: Config, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any] | None:
    """The agent's status once ``done`` holds for it, or None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            st = control.ask(cfg.state_dir, "status", timeout=max(0.5, deadline - time.monotonic()))
        except control.ControlError:
            continue  # between roles, or gone (then the timeout says so)
        if done(st):
            return st
    return None


def manual_failover(cfg: Config, force: bool, timeout: float) -> int:
    """`mirror failover`: ask this host's secondary (through its control socket) to
    promote now."""
    st = control.ask(cfg.state_dir, "status")
    if st.get("role") != "secondary":
        print(
            f"mirror: the agent in {cfg.state_dir} is not a secondary (role "
            f"{st.get('role')!r}): nothing to promote",
            file=sys.stderr,
        )
        return 1
    if not st.get("committed"):
        print(
            "mirror: the standby holds no committed checkpoint yet: cannot promote", file=sys.stderr
        )
        return 1
    primary = st.get("primary")
    if primary and not force:
        arbiter = role.make_arbiter(
            cfg.arbiter, cfg.pair.name, f"{cfg.node.name}-cli", prepare=True
        )
        silent = cfg.arbiter.silent_after_ms / 1000
        arbiter.peer_age(str(primary))
        time.sleep(silent)
        age = arbiter.peer_age(str(primary))
        if age is None:  # no slot of its here: its silence says nothing (one primary rule)
            print(
                f"mirror: the primary {primary}'s storage slot is not on this arbiter: "
                f"cannot tell whether it is alive (do both hosts share the arbiter?); "
                f"refusing to promote a second primary. Use --force only if you know it is "
                f"dead or fenced.",
                file=sys.stderr,
            )
            return 1
        if age <= silent:
            print(
                f"mirror: the primary {primary} is alive on storage (its heartbeat slot "
                f"changed {age:.2f} s ago): refusing to promote a second primary. Use "
                f"--force only if you know it is dead or fenced.",
                file=sys.stderr,
            )
            return 1
    control.ask(cfg.state_dir, "failover")
    now = _wait_status(cfg, lambda s: s.get("role") == "primary", timeout)
    if now is None:
        print(
            f"mirror: {cfg.node.name} did not promote within {timeout:g} s (it may have "
            f"lost the claim: see its log)",
            file=sys.stderr,
        )
        return 1
    print(f"promoted {cfg.node.name} from checkpoint {now.get('promoted_from')}")
    return 0


def reload_keys(cfg: Config) -> int:
    """`mirror keys reload --config F`: the running role reads its keys again."""
    return _print_reload(control.ask(cfg.state_dir, "reload-keys", timeout=rekey.APPLY_WAIT_S + 5))


def _print_reload(answer: dict[str, Any]) -> int:
    if not answer.get("reloaded"):
        print(f"mirror: error: keys not reloaded (the keys in use stay): {answer.get('error')}",
              file=sys.stderr)  # fmt: skip
        return 2
    what = "changed: connections made with the old keys end" if answer.get("changed") else (
        "unchanged")  # fmt: skip
    if "peers" in answer:  # the agent's: its peers' keys and its roles' reloads
        print(f"keys reloaded ({what}); this host's key {answer.get('own_key')} (fingerprint)")
        for name, fp in sorted(dict(answer["peers"]).items()):
            print(f"  peer {name}: {fp}")
        for pair, how in sorted(dict(answer.get("roles") or {}).items()):
            print(f"  pair {pair}: {how}")
        return 0
    print(f"keys reloaded ({what}); this host's key {answer.get('own_key')}, the peer's key "
          f"{answer.get('peer_key')} (fingerprints)")  # fmt: skip
    return 0


def switchover(cfg: Config, timeout: float) -> int:
    """`mirror switchover`: ask this host's primary (through its control socket) to hand
    over to its secondary."""
    st = control.ask(cfg.state_dir, "status")
    if st.get("role") != "primary" or st.get("phase") != "protected":
        print(
            f"mirror: the agent in {cfg.state_dir} is not a protected primary (role "
            f"{st.get('role')!r}, phase {st.get('phase')!r}): nothing to hand over",
            file=sys.stderr,
        )
        return 1
    answer = control.ask(cfg.state_dir, "switchover")
    if not answer.get("accepted"):
        print(
            f"mirror: the primary is no longer protected (phase {answer.get('phase')!r}): "
            f"nothing to hand over",
            file=sys.stderr,
        )
        return 1
    if _wait_status(cfg, lambda s: s.get("role") == "secondary", timeout) is None:
        print(
            f"mirror: no switchover within {timeout:g} s: see {cfg.node.name}'s log",
            file=sys.stderr,
        )
        return 1
    print(
        f"switched over: {cfg.node.name} is now the secondary; its peer runs the guest "
        f"from the last checkpoint"
    )
    return 0
