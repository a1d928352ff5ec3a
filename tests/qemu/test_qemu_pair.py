"""Real QEMU guests (TCG) mirrored between two real hosts (agent processes).

The network tests build namespaces and TAP devices (root; CI runs as root) and
check what crosses the LAN; the others run on loopback with no guest network
and read the guest's serial console, where guestd writes "guestd: tick <t>"
every second (a counter in guest memory)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.guests import image
from mirror.lab import qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.integration.conftest import Pair, shm_files
from tests.qemu.conftest import qemu_base, qemu_pid_gone

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]
TICK = re.compile(r"guestd: tick (\d+)")


def ticks(path: Path) -> list[int]:
    try:
        return [int(m) for m in TICK.findall(path.read_text(errors="replace"))]
    except OSError:
        return []


def test_the_demo_image_boots_debians_kernel_by_its_pvh_entry(guest_image: Path) -> None:
    """Debian's kernel has a PVH entry: the image holds it uncompressed, and every QEMU
    and libvirt guest here boots that (3 s less of TCG decompression each boot)."""
    assert image.kernel(guest_image) == guest_image / "vmlinux"
    assert json.loads((guest_image / "manifest.json").read_text())["kernel"] == "vmlinux"
    pvh = image.pvh_kernel((guest_image / "vmlinuz").read_bytes())
    assert pvh is not None and pvh == (guest_image / "vmlinux").read_bytes()


@pytest.fixture
def qpair(pair_factory, guest_image: Path):
    """Pairs of hosts running the QEMU guest; their QEMUs must be gone afterwards."""
    made: list[Pair] = []

    def make(**over) -> Pair:
        p = pair_factory(replace(qemu_base(guest_image), **over))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        for h in p.hosts:
            with pytest.raises(ProcessLookupError):
                os.killpg(h.proc.pid, 0)
            assert qemu_pid_gone(h.dir / "qemu"), f"{h.name}'s QEMU outlived its host"


def test_guest_resumes_on_b_from_the_checkpoint_without_reboot(qpair) -> None:
    # 250 checkpoints of 100 ms (25 s or more): time for the guest to boot (about 5 s
    # on an idle machine with the PVH kernel, 9 s with the bzImage, over 30 s with that on
    # a loaded one); then A stays paused at checkpoint 250, which B holds
    p = qpair(checkpoint=replace(qemu_base(Path("/")).checkpoint, epoch_ms=100))
    b = p.start_secondary()
    a = p.start_primary("--checkpoints", "250")
    serial_a = p.root / "hostA" / "qemu" / "serial.log"
    serial_b = p.root / "hostB" / "qemu" / "serial.log"
    st = p.wait("A frozen at its last checkpoint",
                lambda: (s := a.status()) and s.get("phase") == "frozen" and s, 180)  # fmt: skip
    assert st["acked"] == 250
    last = ticks(serial_a)
    assert len(last) >= 1, f"the guest's service never ran on A: {serial_a.read_text()[-500:]}"
    # A is paused at checkpoint 250 and B holds it: the RAM is the same, byte for byte
    ram_a = Path(st["ram"])
    image_b = Path(f"/dev/shm/mirror-{p.cfg_b.pair.name}-hostB-standby.img")
    assert ram_a.read_bytes() == image_b.read_bytes()
    a.signal(signal.SIGKILL)
    a.proc.wait()
    p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
    p.wait("B's guest ticking", lambda: len(ticks(serial_b)) >= 2, 30, [b])
    text_b = serial_b.read_text()
    assert "mirror-guest: eth0" not in text_b, "the guest booted again on B"
    assert ticks(serial_b)[:2] == [last[-1] + 1, last[-1] + 2], (last[-3:], text_b[:300])


def test_missing_qemu_is_a_clear_error_and_leaves_nothing(qpair, guest_image: Path) -> None:
    base = qemu_base(guest_image)
    p = qpair(qemu=replace(base.qemu, binary="/nonexistent/qemu-system-x86_64"))
    for role, cfg in (("secondary", p.cfg_b), ("primary", p.cfg_a)):
        h = Host(f"host-{role}", role, cfg, p.root)
        p.hosts.append(h)
        assert h.proc.wait(30) == 2
        log = h.log_path.read_text()
        assert "QEMU not found: `/nonexistent/qemu-system-x86_64` is not on PATH" in log, log


def test_different_machine_configuration_is_refused_at_pairing(qpair) -> None:
    p = qpair()
    p.cfg_b = replace(p.cfg_b, qemu=replace(p.cfg_b.qemu, machine="pc"))
    b = p.start_secondary()
    a = p.start_primary()
    assert a.proc.wait(60) == 2
    log = a.log_path.read_text()
    assert "the standby refused this primary" in log
    assert "QEMU version or machine configuration" in log and "machine=q35" in log
    log_b = b.log_path.read_text()  # the details stay with the standby
    assert "same QEMU version and machine configuration" in log_b
    assert "machine=pc" in log_b and "machine=q35" in log_b
    assert b.proc.poll() is None  # the standby goes on waiting for the right primary
    assert (b.status() or {}).get("committed") == 0


# ---- with a network: namespaces and TAP devices (root) --------------------------------


def _lan_pair(p: Pair, lan: GuestLan, img: Path, **arbiter: int):
    cfg_a, cfg_b = qemudemo.configs(p.root, qemu_base(img), img, p.cfg_a.pair.name)
    if arbiter:
        cfg_a = replace(cfg_a, arbiter=replace(cfg_a.arbiter, **arbiter))
        cfg_b = replace(cfg_b, arbiter=replace(cfg_b.arbiter, **arbiter))
    a, b = qemudemo.start_pair(lan, p.root, cfg_a, cfg_b, p.hosts)
    return a, b, cfg_a


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_frames_are_not_on_the_lan_before_their_checkpoint_is_acked(
    qpair, root_or_skip: None, guest_image: Path
) -> None:
    p = qpair()
    with GuestLan() as lan:
        # slow judgement, so that A waits for acks (holding frames) all through the window
        a, b, cfg_a = _lan_pair(p, lan, guest_image, silent_after_ms=6000, fence_after_ms=12000)
        frames = p.root / "frames.txt"
        capture = subprocess.Popen(
            [*lan.prefix("L"), sys.executable, "-m", "tests.qemu.capture", "pa",
             cfg_a.qemu.mac, str(frames)],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log = p.root / "client.jsonl"
        client = qemudemo.start_client(lan, log)
        try:
            wait_for("the client", lambda: "connected" in _read(log), 120, p.hosts)
            time.sleep(2)
            serial_a = p.root / "hostA" / "qemu" / "serial.log"
            before = len(ticks(serial_a))
            t_stop = time.time()
            b.signal(signal.SIGSTOP)  # no more acks
            time.sleep(3)
            t_cont = time.time()
            during = len(ticks(serial_a)) - before
            b.signal(signal.SIGCONT)
            time.sleep(2)
        finally:
            _stop(client)
            _stop(capture)
        times = [float(x) for x in frames.read_text().split()[1:]]
        assert during >= 2, "the guest did not run while the secondary was stopped"
        assert any(t < t_stop for t in times), "no frame of the guest reached the LAN at all"
        leaked = [round(t - t_stop, 3) for t in times if t_stop + 0.15 < t < t_cont]
        assert not leaked, f"frames on the LAN while their checkpoints were unacked: {leaked}"
        assert any(t > t_cont for t in times), "held frames were not released after the acks"
        summary = [e for e in qemudemo.client_events(log) if e["event"] == "summary"][-1]
        assert summary["error"] is None and summary["gaps"] == 0 and summary["repeats"] == 0
        assert summary["echo_bad"] == 0 and summary["last_n"] > 20
        assert a.proc.poll() is None and b.proc.poll() is None


def test_host_kill_keeps_the_clients_tcp_connection(root_or_skip: None, guest_image: Path):
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                text=True).stdout.split())  # fmt: skip
    r = qemudemo.run(qemu_base(guest_image), image_dir=guest_image, kill_after=3, run_on=4,
                     quiet=True)  # fmt: skip
    c = r["client"]
    assert r["connection_survived"], c
    assert c["error"] is None and c["gaps"] == 0 and c["repeats"] == 0 and c["echo_bad"] == 0
    assert c["echo_ok"] >= c["echo_sent"] - 3 and c["echo_ok"] > 20
    assert r["next_byte_after_kill_s"] < 10
    assert r["promoted_status"]["role"] == "primary"
    whats = [w for _, w in r["timeline"]]
    assert any(w.startswith("KILLED host A") for w in whats)
    assert any("next byte on the same connection" in w for w in whats)
    after = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split())  # fmt: skip
    assert not {n for n in after - before if n.startswith("mq")}, "namespaces left behind"
    assert not shm_files(f"qdemo{os.getpid()}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""



def test_qemu_dying_on_a_is_a_clear_error_and_b_goes_on_from_the_committed_state(qpair) -> None:
    p = qpair()
    b = p.start_secondary()
    a = p.start_primary()
    serial_a = p.root / "hostA" / "qemu" / "serial.log"
    serial_b = p.root / "hostB" / "qemu" / "serial.log"
    p.wait("A protected, the guest's service running",
           lambda: (a.status() or {}).get("phase") == "protected"
           and len(ticks(serial_a)) >= 3, 120)  # fmt: skip
    pid = int((p.root / "hostA" / "qemu" / "qemu.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # QEMU alone dies: every QMP command fails from now on
    assert a.proc.wait(30) == 2
    log = a.log_path.read_text()
    assert re.search(r"mirror: error: QMP \S+ failed", log), log[-800:]
    last_a = ticks(serial_a)[-1]
    p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
    p.wait("B's guest ticking", lambda: len(ticks(serial_b)) >= 2, 30, [b])
    first_b = ticks(serial_b)[0]
    assert "mirror-guest: eth0" not in serial_b.read_text(), "the guest booted again on B"
    # B goes on from the last committed checkpoint: at most where A's console had got to
    # (the console is not under output commit), and past tick 2 (seconds old at the kill)
    assert 3 <= first_b <= last_a + 1, (first_b, last_a)


def test_qemu_guest_reprotected_on_the_returning_host_survives_a_second_kill(qpair) -> None:
    """A fails, B runs the guest; A comes back as the secondary with a ready QEMU of its
    own; B (whose QEMU was started for an incoming state) checkpoints it to A; B fails;
    A goes on from B's checkpoint.  The console counter never restarts."""
    p = qpair()
    b = p.start_secondary()
    a = p.start_primary()
    serial = {h: p.root / h / "qemu" / "serial.log" for h in ("hostA", "hostB", "hostA2")}
    p.wait("A's guest ticking", lambda: len(ticks(serial["hostA"])) >= 2, 120)
    a.signal(signal.SIGKILL)
    a.proc.wait()
    p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
    a2 = Host(
        "hostA2",
        "secondary",
        replace(p.cfg_a, node=replace(p.cfg_a.node, name="hostA",
                                      state_dir=str(p.root / "hostA2"))),
        p.root,
    )  # fmt: skip
    p.hosts.append(a2)
    p.wait("B protected again",
           lambda: (s := b.status()) and s.get("phase") == "protected" and s["acked"] >= 20,
           120, [b, a2])  # fmt: skip
    p.wait("B's guest ticking", lambda: len(ticks(serial["hostB"])) >= 3, 60, [b, a2])
    b.signal(signal.SIGKILL)
    b.proc.wait()
    p.wait("A promoted again", lambda: (a2.status() or {}).get("role") == "primary", 30, [a2])
    p.wait("A's guest ticking again", lambda: len(ticks(serial["hostA2"])) >= 2, 60, [a2])
    seq = ticks(serial["hostA"]) + ticks(serial["hostB"]) + ticks(serial["hostA2"])
    for log in serial.values():
        assert "mirror-guest: eth0" not in log.read_text() or log == serial["hostA"]
    # each host goes on from a checkpoint of the one before: never back to the start,
    # never past what the dead one had printed
    assert ticks(serial["hostB"])[0] <= ticks(serial["hostA"])[-1] + 1
    assert ticks(serial["hostA2"])[0] <= ticks(serial["hostB"])[-1] + 1
    assert ticks(serial["hostA2"])[0] > ticks(serial["hostB"])[0], seq


def test_a_guest_that_powers_itself_off_is_not_brought_back_on_b(
    qpair, guest_image: Path
) -> None:
    # the guest's own shutdown is no host failure: A tells B (BYE), B does not promote
    base = qemu_base(guest_image)
    p = qpair(qemu=replace(base.qemu, append=f"{base.qemu.append} mirror.poweroff=20"))
    b = p.start_secondary()
    a = p.start_primary()
    p.wait("A protected", lambda: (a.status() or {}).get("phase") == "protected", 120)
    assert a.proc.wait(120) == 0, a.log_tail()
    log_a = a.log_path.read_text()
    assert '"guest-shutdown"' in log_a and '"guest-died"' not in log_a, log_a[-800:]
    assert (a.status() or {}).get("guest_ended") == "shutdown"  # what a host agent reads
    p.wait("B told", lambda: "standing down, not promoting" in b.log_path.read_text(), 10, [b])
    time.sleep(5)  # longer than the failover timeout: B would have promoted by now
    assert b.proc.poll() is None
    assert (b.status() or {}).get("role") == "secondary", b.log_tail()
    assert "promoted" not in b.log_path.read_text()
