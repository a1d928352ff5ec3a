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
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror import config as config_mod
from mirror.config import Config, MetricsConfig
from mirror.hoststate import read_json
from mirror.lab.observer import Observer, fresh_sockets
from mirror.replication import keys


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports that no observer or earlier free_ports() call
    of this process had (see observer.fresh_sockets)."""
    socks = fresh_sockets(n)
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Host:
    """A host: one `mirror` role in its own process group."""

    def __init__(
        self,
        name: str,
        role: str,
        cfg: Config | str,
        root: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """``role``: the `mirror` command (``primary``, ``secondary``, ``agent``); ``cfg``:
        its configuration (a str: the TOML text as it is); ``extra``: arguments for the
        role; ``env``: more environment; ``prefix``: run the host inside something, e.g.
        ``ip netns exec NS``."""
        self.name, self.role = name, role
        self.dir = root / name
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a host's state: its own
        self.config_path = self.dir / ("agent.toml" if role == "agent" else "mirror.toml")
        self.config_path.write_text(cfg if isinstance(cfg, str) else config_mod.to_toml(cfg))
        self.log_path = self.dir / "agent.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(prefix or []),
                    sys.executable,
                    "-m",
                    "mirror",
                    role,
                    "--config",
                    str(self.config_path),
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
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
        self.wait_group_gone()
        self.remove_shm_files()

    def wait_group_gone(self, timeout: float = 10) -> None:
        """SIGKILL is delivered at once, but a member's exit (unmapping its RAM, being
        reaped by init) takes a while: wait until no process of the group is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def remove_shm_files(self) -> None:
        """A killed host leaves its guest's RAM file; a real host's memory dies with it.
        Remove what this host's last status names under /dev/shm."""
        st = self.status() or {}
        for key in ("ram", "image"):
            path = Path(str(st.get(key, "")))
            if path.parent == Path("/dev/shm") and path.name.startswith("mirror-"):
                path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


def pair_configs(root: Path, base: Config, observer: str) -> tuple[Config, Config]:
    """Two hosts on this machine: the interconnect on free loopback ports, and each host's
    metrics on a free port of its own (unless ``base`` serves none)."""
    data, hb, metrics_a, metrics_b = free_ports(4)
    link = replace(base.link, host="127.0.0.1", data_port=data, heartbeat_port=hb)
    arbiter = replace(base.arbiter, dir=str(root / "shared"))
    if not base.arbiter.etcd:  # the storage both hosts share: it exists before they start
        (root / "shared").mkdir(parents=True, exist_ok=True)
    common = replace(
        base, link=link, output=replace(base.output, observer=observer), arbiter=arbiter
    )
    a = replace(common, node=replace(base.node, name="hostA", state_dir=str(root / "hostA")))
    b = replace(common, node=replace(base.node, name="hostB", state_dir=str(root / "hostB")))
    if base.metrics.listen:
        a = replace(a, metrics=MetricsConfig(f"127.0.0.1:{metrics_a}"))
        b = replace(b, metrics=MetricsConfig(f"127.0.0.1:{metrics_b}"))
    return with_keys(root / "keys", a, b)


def with_keys(key_dir: Path, a: Config, b: Config) -> tuple[Config, Config]:
    """``a`` and ``b`` with a key pair each (made in ``key_dir``) and each other's public
    key; unchanged if the pair is configured insecure."""
    if a.keys.insecure:
        return a, b
    made = {}
    for cfg in (a, b):
        name = cfg.node.name
        if not (key_dir / f"{name}.key_secret").exists():
            keys.generate(key_dir, name)
        made[name] = key_dir / f"{name}.key_secret", key_dir / f"{name}.key"

    def keyed(cfg: Config, peer: Config) -> Config:
        secret, _ = made[cfg.node.name]
        _, public = made[peer.node.name]
        return replace(
            cfg, keys=replace(cfg.keys, secret_key=str(secret), peer_public_key=str(public))
        )

    return keyed(a, b), keyed(b, a)


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
    kill_after: float | None = None,
    run_on: float = 3.0,
) -> dict[str, Any]:
    """Run the pair for ``duration`` seconds of checkpoints; with ``kill_after``, SIGKILL
    the primary host's whole process group that many seconds after it started,
    wait for the secondary to promote, and let the promoted guest run ``run_on``
    seconds more."""
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
        started = time.monotonic()
        say(
            f"primary hostA: synthetic guest, {base.guest.dirty_pages_per_s} pages/s dirtied, "
            f"epoch {base.checkpoint.epoch_ms} ms, for {duration:g} s"
            + (f"; killing it after {kill_after:g} s" if kill_after else "")
        )
        last, killed_at, last_status = 0.0, None, None
        while a.proc.poll() is None:
            time.sleep(0.02)
            st = a.status()
            last_status = st or last_status
            if kill_after is not None and time.monotonic() - started >= kill_after:
                a.signal(signal.SIGKILL)  # the whole host at once: role and guest
                a.proc.wait()
                killed_at = time.monotonic()
                say(
                    f"killed host A (SIGKILL to process group {a.proc.pid}) at checkpoint "
                    f"{(last_status or {}).get('epoch')}"
                )
                break
            if st and time.monotonic() - last >= 1:
                last = time.monotonic()
                s = st["summary"]
                say(
                    f"  {st['phase']:>9}: checkpoint {st['epoch']}, acked {st['acked']}, "
                    f"pause p50 {s['pause_ms_p50']} ms, outputs released "
                    f"{s['outputs_released']}"
                )
        if killed_at is None and a.proc.returncode != 0:
            raise RuntimeError(f"the primary failed (exit {a.proc.returncode}):\n{a.log_tail()}")
        promoted = None
        if killed_at is not None:
            promoted = wait_for(
                "the secondary to promote",
                lambda: (
                    (s := b.status())
                    and s.get("role") == "primary"
                    and s.get("failover_ms") is not None
                    and s
                ),
                30,
                [b],
            )
            say(
                f"hostB promoted from checkpoint {promoted['promoted_from']}: first output of "
                f"the resumed guest {promoted['failover_ms']:.0f} ms after the last heartbeat"
            )
            time.sleep(run_on)
            promoted = b.status() or promoted
        time.sleep(0.2)
        standby = b.status() or {}
        try:
            stats = read_json(a.dir / "stats.json")["summary"]
        except (OSError, ValueError):
            stats = (last_status or {}).get("summary", {})  # killed: its last report
        result: dict[str, Any] = {
            "ram_mib": base.guest.ram_mib,
            "epoch_ms": base.checkpoint.epoch_ms,
            "dirty_pages_per_s": base.guest.dirty_pages_per_s,
            "duration_s": duration,
            **stats,
            "standby_committed": standby.get("committed"),
        }
        if promoted is not None and killed_at is not None:
            result.update(
                failover_ms=promoted["failover_ms"],
                promoted_from=promoted["promoted_from"],
                replayed_outputs=promoted["replayed_outputs"],
                outputs_after_failover=promoted.get("outputs_released", 0),
                standby_committed=promoted["promoted_from"],
            )
        if own_observer:
            seen = own_observer.seen
            result.update(
                observer_outputs=own_observer.count(),
                observer_gaps=seen.gaps(),
                observer_duplicates=seen.duplicates(),
                observer_interleaved=seen.interleaved(),
            )
            if killed_at is not None:
                after = [
                    t for src, (_, _, t) in zip(seen.sources, seen.outputs, strict=True) if src > 0
                ]
                if after:
                    result["kill_to_next_output_ms"] = round((min(after) - killed_at) * 1000, 1)
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
    if "failover_ms" in r:
        after_kill = r.get("kill_to_next_output_ms")
        rows.append(
            (
                "failover",
                f"promoted from checkpoint {r['promoted_from']}; first output of "
                f"the resumed guest {r['failover_ms']:.0f} ms after the last "
                f"heartbeat" + (f", {after_kill:.0f} ms after the kill" if after_kill else ""),
            )
        )
        rows.append(
            (
                "after failover",
                f"{r['replayed_outputs']} committed outputs replayed, "
                f"{r['outputs_after_failover']} released by hostB",
            )
        )
    if "observer_outputs" in r:
        mixed = ", TWO SOURCES INTERLEAVED" if r.get("observer_interleaved") else ""
        rows.append(
            (
                "observer",
                f"{r['observer_outputs']} outputs, {r['observer_gaps']} gaps, "
                f"{r['observer_duplicates']} duplicates{mixed}",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:>{width}}: {v}")


def dump_json(r: dict[str, Any]) -> None:
    print(json.dumps(r, indent=1))
