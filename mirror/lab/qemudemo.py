"""`mirror demo --guest qemu`: a QEMU guest keeps its client's TCP connection while its
host is killed.

On one machine (mirror/lab/netlab.py): namespaces for host A, host B, a client and
the LAN; the interconnect on its own link; a shared directory as the storage
path.  The guest boots on A and is mirrored to B; the client opens ONE TCP
connection to the guest, reads its counter stream and sends echo requests;
then host A is killed (SIGKILL to its process group: the role, and QEMU with
it).  B promotes, and the same connection goes on from B.  The demo prints a
timeline and a summary; everything it made is removed at the end, whatever
happened.
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
from typing import Any, Protocol

from mirror.config import Config, QemuConfig
from mirror.guests import image
from mirror.guests.qemu import qemu_version
from mirror.lab.demo import Host, wait_for, with_keys
from mirror.lab.netlab import GUEST_IP, IC_IP, GuestLan, check_capable

PORT = 7000


def configs(root: Path, base: Config, img: Path, pair: str) -> tuple[Config, Config]:
    if not base.arbiter.etcd:  # the storage both hosts share: it exists before they start
        (root / "shared").mkdir(parents=True, exist_ok=True)
    qemu = replace(
        base.qemu,
        kernel=str(image.kernel(img)),
        initrd=str(img / "initramfs.cpio.gz"),
        append=f"console=ttyS0 quiet mirror.ip={GUEST_IP}/24 mirror.port={PORT}",
        tap="mtap0",
        bridge="br0",
    )
    common = replace(
        base,
        pair=replace(base.pair, name=pair),
        guest=replace(base.guest, kind="qemu"),
        qemu=qemu,
        link=replace(base.link, host=IC_IP["B"], data_port=7400, heartbeat_port=7401),
        arbiter=replace(base.arbiter, dir=str(root / "shared")),
    )
    a = replace(common, node=replace(base.node, name="hostA", state_dir=str(root / "hostA")))
    b = replace(
        common,
        node=replace(base.node, name="hostB", state_dir=str(root / "hostB")),
        link=replace(common.link, peer_host=IC_IP["A"]),
    )
    return with_keys(root / "keys", a, b)


def default_base(ram_mib: int = 128, epoch_ms: int = 50, disk_mib: int = 16) -> Config:
    base = Config()
    return replace(
        base,
        guest=replace(base.guest, kind="qemu", ram_mib=ram_mib),
        disk=replace(base.disk, size_mib=disk_mib, journal_mib=64),
        qemu=QemuConfig(),
        checkpoint=replace(base.checkpoint, epoch_ms=epoch_ms),
    )


def start_pair(
    lan: GuestLan, root: Path, cfg_a: Config, cfg_b: Config, hosts: list[Host]
) -> tuple[Host, Host]:
    """Host B (secondary) in its namespace, ready; then host A (primary) in its own.
    Both are appended to ``hosts`` as they start (the caller stops them)."""
    b = Host("hostB", "secondary", cfg_b, root, prefix=lan.prefix("B"))
    hosts.append(b)
    wait_for("the secondary to listen", b.status, 60, hosts)
    a = Host("hostA", "primary", cfg_a, root, prefix=lan.prefix("A"))
    hosts.append(a)
    return a, b


def start_client(
    lan: GuestLan, log: Path, connect_for: float = 120, write_every: float = 0.0,
    echo_every: float = 0.2, gaps_over: float = 0.0,
) -> subprocess.Popen[bytes]:
    """The TCP client in its namespace, in a process group of its own (``write_every``:
    it also writes the guest's disk journal, and reads it back at the end; ``gaps_over``:
    it logs every silence longer than that)."""
    return subprocess.Popen(
        [*lan.prefix("C"), sys.executable, "-m", "mirror.lab.tcpclient",
         "--connect", f"{GUEST_IP}:{PORT}", "--log", str(log),
         "--connect-for", str(connect_for), "--write-every", str(write_every),
         "--echo-every", str(echo_every), "--gaps-over", str(gaps_over)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def client_events(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


class Mark(Protocol):
    def __call__(self, what: str, at: float | None = None) -> None: ...


class DemoGuest(Protocol):
    """What differs between guest kinds in this demo (mirror/lab/libvirtdemo.py has the
    libvirt one): how the hosts and their guests are set up and paired, where A's
    console is, how A dies."""

    label: str  # "QEMU", "a libvirt domain", ...

    def check(self, base: Config) -> None: ...

    def start(
        self,
        lan: GuestLan,
        root: Path,
        base: Config,
        img: Path,
        pair: str,
        hosts: list[Host],
        mark: Mark,
    ) -> tuple[Host, Host]:
        """Hosts A and B (appended to ``hosts`` as they start), A's guest being mirrored
        to B; ``status()`` of each: its pair role's status."""
        ...

    def serial(self, root: Path) -> Path: ...

    def kill_a(self, a: Host) -> str:
        """Host A dies at once; what was killed (for the timeline)."""
        ...

    def report(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class QemuDemoGuest:
    """mirror's own QEMU: the role boots it; SIGKILL to A's group takes QEMU along."""

    label = "QEMU"

    def check(self, base: Config) -> None:
        qemu_version(base.qemu.binary)  # a clear error now if QEMU is missing

    def start(
        self,
        lan: GuestLan,
        root: Path,
        base: Config,
        img: Path,
        pair: str,
        hosts: list[Host],
        mark: Mark,
    ) -> tuple[Host, Host]:
        a, b = start_pair(lan, root, *configs(root, base, img, pair), hosts)
        mark(f"host B: standby ready ({base.guest.ram_mib} MiB image, QEMU waiting on it)")
        return a, b

    def serial(self, root: Path) -> Path:
        return root / "hostA" / "qemu" / "serial.log"

    def kill_a(self, a: Host) -> str:
        a.signal(signal.SIGKILL)  # the whole host at once: the role, and QEMU dies with it
        return f"SIGKILL to its process group {a.proc.pid}: its role, and QEMU with it"

    def report(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def run(
    base: Config,
    *,
    guest: DemoGuest | None = None,
    image_dir: Path = image.DEFAULT_DIR,
    kill_after: float = 5.0,
    run_on: float = 5.0,
    keep: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Boot, mirror, connect the client, kill host A ``kill_after`` seconds after the
    client connected, let the promoted guest serve ``run_on`` seconds, stop."""
    check_capable()
    guest = guest or QemuDemoGuest()
    guest.check(base)
    t0 = time.time()
    timeline: list[tuple[float, str]] = []

    def mark(what: str, at: float | None = None) -> None:
        timeline.append(((at or time.time()) - t0, what))
        if not quiet:
            print(f"[{(at or time.time()) - t0:7.2f} s] {what}", file=sys.stderr, flush=True)

    img = image.ensure(image_dir, say=lambda m: mark(m))
    root = Path(tempfile.mkdtemp(prefix="mirror-qdemo-"))
    pair = f"qdemo{os.getpid()}"
    lan = GuestLan()
    hosts: list[Host] = []
    client: subprocess.Popen[bytes] | None = None
    log = root / "client.jsonl"
    result: dict[str, Any] = {}
    try:
        mark("network namespaces up: LAN bridge, host A, host B, client; interconnect A-B")
        writes = base.disk.size_mib or guest_writes_disk(guest)
        early: list[subprocess.Popen[bytes]] = []
        if getattr(guest, "live", False):  # paired as it runs: the client connects first

            def client_first() -> None:
                serial = guest.serial(root)
                wait_for("the guest's service", lambda: "guestd: listening" in _read(serial),
                         120, hosts)  # fmt: skip
                mark(f"guest: service up on {GUEST_IP}:{PORT}, not yet protected")
                early.append(start_client(lan, log, connect_for=60,
                                          write_every=0.1 if writes else 0.0))  # fmt: skip
                c = wait_for("the client to connect", lambda: next(
                    (e for e in client_events(log) if e["event"] == "connected"), None), 60,
                    hosts)  # fmt: skip
                mark(f"client: one TCP connection to {GUEST_IP}:{PORT}", c["t"])

            guest.before_pair = client_first  # type: ignore[attr-defined]
        a, b = guest.start(lan, root, base, img, pair, hosts, mark)
        client = early[0] if early else None
        st = wait_for("the pre-copy", lambda: (a.status() or {}).get("phase") == "protected"
                      and a.status(), 120, hosts)  # fmt: skip
        mark(f"host A: guest running under {guest.label}; sync to B done, "
             f"checkpoints every {base.checkpoint.epoch_ms} ms")  # fmt: skip
        if client is None:  # (paired live: it connected before the pairing)
            serial = guest.serial(root)
            wait_for("the guest's service", lambda: "guestd: listening" in _read(serial), 120,
                     hosts)  # fmt: skip
            mark(f"guest: service up on {GUEST_IP}:{PORT} (checkpoint "
                 f"{(a.status() or {}).get('epoch')})")  # fmt: skip
            client = start_client(lan, log, connect_for=60, write_every=0.1 if writes else 0.0)
            connected = wait_for(
                "the client to connect",
                lambda: next((e for e in client_events(log) if e["event"] == "connected"), None),
                60,
                hosts,
            )
            mark(f"client: one TCP connection to {GUEST_IP}:{PORT}", connected["t"])
        end = time.monotonic() + kill_after
        while time.monotonic() < end:
            time.sleep(0.1)
            if a.proc.poll() is not None or client.poll() is not None:
                raise RuntimeError("host A or the client ended before the kill")
        st = a.status() or {}
        counter = max((e.get("n", 0) for e in client_events(log) if e["event"] == "counter"),
                      default=0)  # fmt: skip
        mark(f"client has read n={counter}; host A at checkpoint {st.get('epoch')} "
             f"(acked {st.get('acked')})")  # fmt: skip
        killed = time.time()
        how = guest.kill_a(a)
        a.proc.wait()
        mark(f"KILLED host A ({how})", killed)  # fmt: skip
        promoted = wait_for(
            "host B to promote",
            lambda: (s := b.status()) and s.get("role") == "primary" and s.get("failover_ms") and s,
            30,
            [b],
        )
        mark(f"host B: promoted from checkpoint {promoted.get('promoted_from')}; guest "
             f"resumed {promoted['failover_ms']:.0f} ms after A's last heartbeat",
             time.time())  # fmt: skip
        first = wait_for(
            "the client's next byte",
            lambda: next(
                (e for e in client_events(log)
                 if e["event"] == "resumed-after-silence" and e["t"] > killed), None),
            30,
            [b],
        )  # fmt: skip
        mark(f"client: next byte on the same connection, {first['t'] - killed:.2f} s after "
             f"the kill", first["t"])  # fmt: skip
        end = time.monotonic() + run_on
        while time.monotonic() < end and client.poll() is None:
            time.sleep(0.1)
        client.send_signal(signal.SIGTERM)
        client.wait(10)
        summary = next((e for e in client_events(log) if e["event"] == "summary"), {})
        mark(f"client stopped: last n={summary.get('last_n')}")
        st_b = b.status() or {}
        result = {
            "timeline": [[round(t, 3), w] for t, w in timeline],
            "client": summary,
            "connection_survived": summary.get("error") is None and client.returncode == 0,
            "next_byte_after_kill_s": round(first["t"] - killed, 3),
            "failover_ms": promoted.get("failover_ms"),
            "promoted_from": promoted.get("promoted_from"),
            "primary_summary": st.get("summary", {}),
            "promoted_status": {k: st_b.get(k) for k in ("role", "phase", "generation")},
            **guest.report(),
        }
        return result
    except BaseException:
        for h in hosts:
            if not quiet:
                print(f"--- {h.name} log:\n{h.log_tail(25)}", file=sys.stderr)
        raise
    finally:
        stop_all(client, hosts, guest, lan)
        if keep:
            print(f"files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def stop_all(
    client: subprocess.Popen[bytes] | None, hosts: list[Host], guest: DemoGuest, lan: GuestLan
) -> None:
    """What a demo (or a test built from its parts) started, stopped: the client's
    process group, every host, what the guest kind holds, the namespaces."""
    if client is not None and client.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(client.pid, signal.SIGKILL)
        client.wait()
    for h in hosts:
        h.stop()
    guest.close()
    lan.close()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def guest_writes_disk(guest: object) -> bool:
    """A libvirt demo guest with a disk of its own keeps the journal there."""
    return bool(getattr(guest, "disk", ""))


def print_summary(r: dict[str, Any]) -> None:
    c = r["client"]
    if "write_sent" in c:
        verdict = "INTACT" if c.get("journal_intact") else "DAMAGED"
        print(f"\ndisk journal: {verdict}: {c['write_ok']} writes answered ok (of "
              f"{c['write_sent']} sent), all in the journal read back after the failover, in "
              f"order: {c['journal_len']} entries; missing {c['journal_missing']}")  # fmt: skip
    p = r["primary_summary"]
    split = p.get("pause_split_ms_p50", {})
    print("\ntimeline (seconds from start):")
    for t, what in r["timeline"]:
        print(f"  {t:7.2f}  {what}")
    verdict = "SURVIVED" if r["connection_survived"] else "BROKEN"
    print(f"\nTCP connection: {verdict} ({c.get('error') or 'no reset, no EOF'})")
    print(f"  counter: last n={c.get('last_n')}, gaps {c.get('gaps')}, repeats {c.get('repeats')}")
    print(f"  echo: {c.get('echo_ok')} answered in order, {c.get('echo_bad')} wrong, "
          f"{c.get('echo_sent')} sent")  # fmt: skip
    print(
        f"  next byte after the kill: {r['next_byte_after_kill_s']:.2f} s; guest resumed on B "
        f"{r['failover_ms']:.0f} ms after A's last heartbeat (checkpoint {r['promoted_from']})"
    )
    print(
        f"checkpoints on A: {p.get('checkpoints')}, pause p50 {p.get('pause_ms_p50')} ms "
        f"(stop {split.get('stop')}, scan {split.get('scan')}, device state "
        f"{split.get('state')}, cont {split.get('resume')}), p99 {p.get('pause_ms_p99')} ms"
    )


def dump_json(r: dict[str, Any]) -> None:
    print(json.dumps(r, indent=2))
