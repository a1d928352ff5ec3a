"""`mirror demo`: a primary and a secondary host on this machine, with a synthetic guest.

Each host is its own process group with its own state directory; the
interconnect is on loopback.  The demo watches from outside (an observer of
the guest's outputs, the hosts' status files), stops both hosts at the end,
and prints a summary.  Whatever happens, it stops what it started, by
process group, and removes its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror import config as config_mod
from mirror.config import Config
from mirror.hoststate import read_json
from mirror.observer import Observer


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Host:
    """A host: one `mirror` role in its own process group."""

    def __init__(self, name: str, role: str, cfg: Config, root: Path, *extra: str) -> None:
        self.name, self.role = name, role
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "mirror.toml"
        self.config_path.write_text(config_mod.to_toml(cfg))
        self.log_path = self.dir / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", role, "--config", str(self.config_path), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def status(self) -> dict[str, Any] | None:
        try:
            return dict(read_json(self.dir / "status.json"))
        except (OSError, ValueError):
            return None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the whole group, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.signal(signal.SIGKILL)  # anything left of the group
        self.proc.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


def pair_configs(root: Path, base: Config, observer: str) -> tuple[Config, Config]:
    data, hb = free_ports(2)
    link = replace(base.link, host="127.0.0.1", data_port=data, heartbeat_port=hb)
    common = replace(base, link=link, output=replace(base.output, observer=observer))
    a = replace(common, node=replace(base.node, name="hostA", state_dir=str(root / "hostA")))
    b = replace(common, node=replace(base.node, name="hostB", state_dir=str(root / "hostB")))
    return a, b


def wait_for(what: str, cond: Any, timeout: float, hosts: list[Host]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for h in hosts:
            if h.proc.poll() is not None:
                raise RuntimeError(
                    f"{h.name} ({h.role}) exited with code {h.proc.returncode} "
                    f"while waiting for {what}:\n{h.log_tail()}"
                )
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def run(
    base: Config,
    *,
    duration: float,
    observer: str | None = None,
    keep: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mirror-demo-"))
    own_observer = Observer() if observer is None else None
    address = f"127.0.0.1:{own_observer.port}" if own_observer else str(observer)
    cfg_a, cfg_b = pair_configs(root, base, address)
    hosts: list[Host] = []

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        b = Host("hostB", "secondary", cfg_b, root)
        hosts.append(b)
        wait_for("the secondary to listen", b.status, 30, hosts)
        say(f"secondary hostB up: standby image of {base.guest.ram_mib} MiB reserved")
        a = Host("hostA", "primary", cfg_a, root, "--duration", str(duration))
        hosts.append(a)
        say(
            f"primary hostA: synthetic guest, {base.guest.dirty_pages_per_s} pages/s dirtied, "
            f"epoch {base.checkpoint.epoch_ms} ms, for {duration:g} s"
        )
        last = 0.0
        while a.proc.poll() is None:
            time.sleep(0.1)
            st = a.status()
            if st and time.monotonic() - last >= 1:
                last = time.monotonic()
                s = st["summary"]
                say(
                    f"  {st['phase']:>9}: checkpoint {st['epoch']}, acked {st['acked']}, "
                    f"pause p50 {s['pause_ms_p50']} ms, outputs released "
                    f"{s['outputs_released']}"
                )
        if a.proc.returncode != 0:
            raise RuntimeError(f"the primary failed (exit {a.proc.returncode}):\n{a.log_tail()}")
        time.sleep(0.2)
        standby = b.status() or {}
        stats = read_json(a.dir / "stats.json")["summary"]
        result: dict[str, Any] = {
            "ram_mib": base.guest.ram_mib,
            "epoch_ms": base.checkpoint.epoch_ms,
            "dirty_pages_per_s": base.guest.dirty_pages_per_s,
            "duration_s": duration,
            **stats,
            "standby_committed": standby.get("committed"),
        }
        if own_observer:
            seen = own_observer.seen
            result.update(
                observer_outputs=own_observer.count(),
                observer_gaps=seen.gaps(),
                observer_duplicates=seen.duplicates(),
            )
        return result
    finally:
        for h in reversed(hosts):
            h.stop()
        if own_observer:
            own_observer.close()
        if keep:
            say(f"kept the hosts' files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def print_summary(r: dict[str, Any]) -> None:
    rows = [
        ("guest", f"{r['ram_mib']} MiB synthetic, {r['dirty_pages_per_s']} pages/s dirtied"),
        ("pre-copy", f"{r['precopy_pages'] * 4096 >> 20} MiB in {r['precopy_s']} s"),
        (
            "checkpoints",
            f"{r['checkpoints']} ({r['acked']} acknowledged), epoch {r['epoch_ms']} ms",
        ),
        ("pause", f"p50 {r['pause_ms_p50']} ms, p99 {r['pause_ms_p99']} ms"),
        ("pause split p50", ", ".join(f"{k} {v} ms" for k, v in r["pause_split_ms_p50"].items())),
        ("ack after send", f"p50 {r['ack_ms_p50']} ms"),
        ("replicated", f"{r['dirty_mb_per_s']} MB/s of dirty pages"),
        (
            "output latency added",
            f"p50 {r['output_latency_ms_p50']} ms, p99 {r['output_latency_ms_p99']} ms",
        ),
        (
            "outputs released",
            f"{r['outputs_released']} ({r['outputs_held']} still held at the end)",
        ),
        ("standby", f"holds checkpoint {r['standby_committed']}"),
    ]
    if "observer_outputs" in r:
        rows.append(
            (
                "observer",
                f"{r['observer_outputs']} outputs, {r['observer_gaps']} gaps, "
                f"{r['observer_duplicates']} duplicates",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:>{width}}: {v}")


def dump_json(r: dict[str, Any]) -> None:
    print(json.dumps(r, indent=1))
