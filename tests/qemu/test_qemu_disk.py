"""A real QEMU guest writing its disk (virtio-blk over the agent's disk server), host A
killed at a random moment: B's disk, as promoted, is byte for byte A's disk as of the
checkpoint B committed.  The guest writes on its own (mirror.diskload=rand|seq on its
kernel command line: dd of 4 KiB blocks with fsync); the disk servers keep copies
(MIRROR_DISK_TEST_SNAPSHOTS): A's at each barrier, B's at promotion.
MIRROR_QEMU_DISK_KILLS=N runs N kills (default 2); tests/disk runs 30 cheaper ones."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mirror.config import DiskConfig
from mirror.lab.demo import Host, wait_for
from tests.disk.harness import differing_blocks, free_port
from tests.integration.conftest import Pair
from tests.qemu.conftest import qemu_base

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]
KILLS = int(os.environ.get("MIRROR_QEMU_DISK_KILLS", "2"))


def disk_status(host_dir: Path) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(host_dir / "disk" / "disk-ctl.sock"))
            s.sendall(b"status\n")
            line = s.makefile().readline()
    except OSError:
        return {}
    return json.loads(line[3:]) if line.startswith("ok ") else {}


def disk_pair(pair_factory: Any, guest_image: Path, load: str = "rand", **disk: Any) -> Pair:
    """A pair of QEMU hosts whose guest has an 8 MiB disk it writes on its own (``load``)."""
    base = qemu_base(guest_image)
    return pair_factory(  # type: ignore[no-any-return]
        replace(
            base,
            disk=DiskConfig(**{"size_mib": 8, "port": free_port(), "journal_mib": 64, **disk}),
            qemu=replace(base.qemu, append=f"{base.qemu.append} mirror.diskload={load}"),
        )
    )


def snapshots(where: Path) -> dict[str, str]:
    """The environment that has a host's disk server keep copies of its disk in ``where``."""
    return {"MIRROR_DISK_TEST_SNAPSHOTS": str(where)}


def start_with_snapshots(p: Pair, snaps: dict[str, Path]) -> tuple[Host, Host]:
    """B, then A, each keeping disk copies in ``snaps["B"]``, ``snaps["A"]``."""
    b = Host("hostB", "secondary", p.cfg_b, p.root, env=snapshots(snaps["B"]))
    p.hosts.append(b)
    wait_for("the secondary", b.status, 30, p.hosts)
    return p.start_primary(env=snapshots(snaps["A"])), b


def promoted_disk_equals(p: Pair, host: Host, promoted: Path, source: Path) -> int:
    """``host`` promoted its replica (a copy in ``promoted``): it is, byte for byte, the
    copy the old primary kept in ``source`` at that committed checkpoint.  Returns it."""
    found = p.wait(f"{host.name}'s replica promoted", lambda: list(promoted.glob("promoted-*")),
                   10, [host])  # fmt: skip
    committed = int(found[0].stem.split("-")[1])
    want = source / f"{committed}.img"
    assert want.exists(), f"no copy of the old primary's disk at checkpoint {committed}"
    differ = differing_blocks(found[0].read_bytes(), want.read_bytes())
    assert differ == 0, f"the promoted disk differs at checkpoint {committed} in {differ} blocks"
    return committed


@pytest.mark.parametrize("run", range(KILLS))
def test_host_kill_with_the_guest_writing_its_disk(
    pair_factory, guest_image: Path, run: int
) -> None:
    load = ("rand", "seq")[run % 2]
    p = disk_pair(pair_factory, guest_image, load)
    try:
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (a.status() or {}).get("phase") == "protected"
               and disk_status(p.root / "hostA").get("writes", 0) >= 40, 180)  # fmt: skip
        time.sleep(random.Random(run).uniform(0, 1.5))
        a.signal(signal.SIGKILL)
        a.proc.wait()
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= 1
        latest = max(int(f.stem) for f in snaps["A"].glob("[0-9]*.img"))
        print(f"QEMU kill {run} ({load}): B promoted at {committed}, A had closed {latest}")
        # the promoted guest goes on writing its disk on B
        p.wait("B's guest writing", lambda: disk_status(p.root / "hostB").get("writes", 0) > 5,
               30, [b])  # fmt: skip
    finally:
        p.close()


def test_host_kill_demo_keeps_the_disk_journal(root_or_skip: None, guest_image: Path) -> None:
    """The host-kill demo with a disk: the client writes `write K` every 100 ms while A is
    killed; after the failover every K the guest answered "ok K" for is in the journal
    read back from B, in order."""
    from mirror.lab import qemudemo

    base = replace(qemu_base(guest_image), disk=DiskConfig(size_mib=16, journal_mib=64))
    r = qemudemo.run(base, image_dir=guest_image, kill_after=3, run_on=4, quiet=True)
    c = r["client"]
    assert r["connection_survived"], c
    assert c["write_ok"] >= 20, c
    assert c["journal_read"] and c["journal_intact"], c
    assert c["journal_len"] >= c["write_ok"]


def test_reprotection_with_a_disk_survives_a_second_kill(pair_factory, guest_image: Path) -> None:
    """A dies; B runs the guest on its replica; A comes back as the secondary on its old
    image, which B resyncs by block hashes (the blocks that differ: B's writes since it
    took over and A's own after the last commit), not a full copy; B dies; A goes on,
    its disk as B's at the checkpoint A committed."""
    size_mib = 8
    p = disk_pair(pair_factory, guest_image, size_mib=size_mib)
    try:
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B", "A2")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A's guest writing its disk",
               lambda: disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        a.signal(signal.SIGKILL)
        a.proc.wait()
        a.wait_group_gone()
        a.remove_shm_files()
        p.hosts.remove(a)
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        # the blocks A wrote after the checkpoint B promoted: its image against B's replica
        promoted = p.wait("B's replica promoted", lambda: list(snaps["B"].glob("promoted-*")), 10)
        a_extra = differing_blocks(p.cfg_a.disk_image.read_bytes(), promoted[0].read_bytes())
        # A's host returns with its state and its image: the secondary now
        a2 = Host("hostA", "secondary", p.cfg_a, p.root, env=snapshots(snaps["A2"]))
        p.hosts.append(a2)
        p.wait("B protected again, its guest writing",
               lambda: (s := b.status()) and s.get("phase") == "protected" and s["acked"] >= 20
               and disk_status(p.root / "hostB").get("writes", 0) >= 20, 120, [b, a2])  # fmt: skip
        events = [json.loads(line[line.index("{"):]) for line in b.log_path.read_text().splitlines()
                  if '"disk-synced"' in line]  # fmt: skip
        assert [e["mode"] for e in events] == ["resync"], events
        blocks = events[0]["resync_blocks"]
        # only what differs is sent: A's late blocks and those B's guest wrote (one 4 KiB
        # block a write: B's count since promotion, read after the resync, bounds them)
        b_written = disk_status(p.root / "hostB")["write_bytes"] // 4096
        assert 0 < blocks <= a_extra + b_written, (events, a_extra, b_written)
        assert blocks < (size_mib << 20) // 4096, events
        b.signal(signal.SIGKILL)
        b.proc.wait()
        p.wait("A promoted again", lambda: (a2.status() or {}).get("role") == "primary", 30, [a2])
        committed = promoted_disk_equals(p, a2, snaps["A2"], snaps["B"])
        print(f"re-protection by the old primary: {blocks} blocks resynced of "
              f"{(size_mib << 20) // 4096} (A wrote {a_extra} after B's commit, B's guest "
              f"{b_written}); A promoted again at {committed}")  # fmt: skip
    finally:
        p.close()


def test_storage_failure_on_the_primary_with_a_real_guest(pair_factory, guest_image: Path) -> None:
    """A's disk image starts failing (real EIO: nbdkit's error filter behind nbdfuse) while
    the QEMU guest writes it: A's disk runs on B's replica (`mirror status`: storage remote
    (hostB); an event), the guest's kernel logs no I/O error and its writes go on; the
    image answers again: A copies the blocks back and runs locally; then A is killed and
    B's disk, promoted, is A's at the committed checkpoint."""
    from mirror.cli.status import status_rows
    from tests.disk.faulty import FaultyImage

    p = disk_pair(pair_factory, guest_image, probe_ms=200)
    (p.root / "faulty").mkdir()
    faulty = FaultyImage(p.root / "faulty", 8 << 20)
    try:
        p.cfg_a = replace(p.cfg_a, disk=replace(p.cfg_a.disk, image=str(faulty.path)))
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (a.status() or {}).get("phase") == "protected"
               and disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        faulty.fail()
        p.wait("A's disk on B's storage",
               lambda: ((a.status() or {}).get("disk") or {}).get("storage") == "remote", 20)
        w0 = disk_status(p.root / "hostA")["writes"]
        p.wait("the guest writing on",
               lambda: disk_status(p.root / "hostA")["writes"] >= w0 + 20, 60)  # fmt: skip
        rows = dict(status_rows(a.status() or {}))
        assert str(rows["storage"]).startswith("remote (hostB)"), rows
        assert '"disk-storage-remote"' in a.log_path.read_text()
        faulty.heal()
        p.wait("A's disk local again",
               lambda: ((a.status() or {}).get("disk") or {}).get("storage") == "local", 30)
        st = disk_status(p.root / "hostA")
        assert st["switchbacks"] == 1 and st["dirty_local"] == 0 and st["resynced_local"] > 0, st
        back_at = st["open_epoch"]
        p.wait("checkpoints after the switch back",
               lambda: (a.status() or {}).get("acked", 0) >= back_at + 5, 30)
        serial = (p.root / "hostA" / "qemu" / "serial.log").read_text(errors="replace")
        assert "I/O error" not in serial and "blk_update_request" not in serial, serial[-2000:]
        a.signal(signal.SIGKILL)
        a.proc.wait()
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= back_at, (committed, back_at)
        print(f"storage fault: {st['resynced_local']} blocks copied back, "
              f"B promoted at {committed}")  # fmt: skip
    finally:
        p.close()
        faulty.close()


def test_hung_storage_on_the_primary_with_a_real_guest(pair_factory, guest_image: Path) -> None:
    """A's disk image hangs (nbdkit's pause filter behind nbdfuse: requests held, neither
    answered nor failed) while the QEMU guest writes it: within disk.hang_ms A's disk runs
    on B's replica, the checkpoints go on meanwhile and the guest logs no I/O error; the
    image resumes (the held writes land), A copies the blocks back and runs locally; then
    A is killed and B's disk, promoted, is A's at the committed checkpoint."""
    from tests.disk.faulty import FaultyImage

    hang_ms = 1000
    p = disk_pair(pair_factory, guest_image, probe_ms=200, hang_ms=hang_ms)
    (p.root / "faulty").mkdir()
    faulty = FaultyImage(p.root / "faulty", 8 << 20)
    try:
        p.cfg_a = replace(p.cfg_a, disk=replace(p.cfg_a.disk, image=str(faulty.path)))
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (a.status() or {}).get("phase") == "protected"
               and disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        faulty.hang()
        t0 = time.monotonic()
        p.wait("A's disk on B's storage",
               lambda: disk_status(p.root / "hostA").get("storage") == "remote", 20)
        took = time.monotonic() - t0
        st = disk_status(p.root / "hostA")
        assert f"no answer in {hang_ms} ms" in st["storage_error"], st
        assert took <= hang_ms / 1000 + 2.0, f"failover {took:.2f} s after the image hung"
        acked, w0 = (a.status() or {})["acked"], st["writes"]
        p.wait("checkpoints and the guest's writes go on while the image hangs",
               lambda: (a.status() or {}).get("acked", 0) >= acked + 10
               and disk_status(p.root / "hostA")["writes"] >= w0 + 20, 60)  # fmt: skip
        assert disk_status(p.root / "hostA")["local_stuck"] >= 1  # the held call: still held
        faulty.unhang()
        p.wait("A's disk local again",
               lambda: disk_status(p.root / "hostA").get("storage") == "local", 30)
        st = disk_status(p.root / "hostA")
        assert st["switchbacks"] == 1 and st["local_stuck"] == 0, st
        back_at = st["open_epoch"]
        p.wait("checkpoints after the switch back",
               lambda: (a.status() or {}).get("acked", 0) >= back_at + 5, 30)
        serial = (p.root / "hostA" / "qemu" / "serial.log").read_text(errors="replace")
        assert "I/O error" not in serial and "blk_update_request" not in serial, serial[-2000:]
        a.signal(signal.SIGKILL)
        a.proc.wait()
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= back_at, (committed, back_at)
        print(f"hung storage: failover {took:.2f} s after the hang (bound {hang_ms} ms), "
              f"{st['resynced_local']} blocks copied back, B promoted at {committed}")  # fmt: skip
    finally:
        if faulty.hung:  # a call held in the kernel would keep A's disk server from ending
            faulty.unhang()
        p.close()
        faulty.close()
    assert str(faulty.path) not in Path("/proc/mounts").read_text(), "the FUSE mount is left"


def test_lost_standby_returns_and_is_resynced(pair_factory, guest_image: Path) -> None:
    """B's host dies (its whole process group) while A's guest writes its disk: A never
    stops, runs unprotected on its local disk (the disk server marks the blocks written);
    B restarts with its replica: A pairs again, pre-copies RAM and resyncs only those
    blocks (not the whole disk), checkpoints again; then A is killed and B's promoted
    disk is A's at the checkpoint B committed."""
    size_mib = 8
    p = disk_pair(pair_factory, guest_image, size_mib=size_mib)
    try:
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (s := a.status() or {}).get("phase") == "protected" and s["acked"] >= 10
               and disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        gen = (a.status() or {})["generation"]
        b.signal(signal.SIGKILL)  # B's host dies
        b.proc.wait()
        b.wait_group_gone()
        b.remove_shm_files()
        p.hosts.remove(b)
        p.wait("A unprotected", lambda: (a.status() or {}).get("phase") == "unprotected", 30)
        w0 = disk_status(p.root / "hostA")["writes"]
        p.wait("the guest writing on, alone",
               lambda: disk_status(p.root / "hostA").get("writes", 0) >= w0 + 20
               and disk_status(p.root / "hostA").get("dirty_peer", 0) > 0, 60)  # fmt: skip
        assert a.proc.poll() is None, a.log_tail()
        b = Host("hostB", "secondary", p.cfg_b, p.root, env=snapshots(snaps["B"]))  # same replica
        p.hosts.append(b)
        p.wait("A protected again",
               lambda: (s := a.status() or {}).get("phase") == "protected"
               and s["generation"] > gen and s["acked"] >= 20
               and disk_status(p.root / "hostA").get("writes", 0) >= w0 + 40, 120)  # fmt: skip
        assert a.proc.poll() is None, a.log_tail()
        # both disk servers hold the pair's generation (the arbiter's), not 1
        new_gen = (a.status() or {})["generation"]
        for host in ("hostA", "hostB"):
            assert disk_status(p.root / host)["generation"] == new_gen > 1, host
        events = [json.loads(line[line.index("{"):]) for line in a.log_path.read_text().splitlines()
                  if '"disk-synced"' in line]  # fmt: skip
        assert [e["mode"] for e in events] == ["copy", "resync"], events
        blocks = events[1]["resync_blocks"]
        assert 0 < blocks < (size_mib << 20) // 4096, events
        log_a = a.log_path.read_text()
        assert '"disk-stream-lost"' in log_a or '"unprotected"' in log_a
        assert '"re-protecting"' in log_a
        a.signal(signal.SIGKILL)
        a.proc.wait()
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= 20
        print(f"resync after B's return: {blocks} blocks of {(size_mib << 20) // 4096}; "
              f"B promoted at {committed}")  # fmt: skip
    finally:
        p.close()


@pytest.mark.slow
def test_a_qemu_pairs_files_are_its_owners_only(pair_factory, guest_image: Path) -> None:
    """QEMU's and the disk server's files too (serial log, QMP socket, device state, the
    disk image, the replica and its journal) are the owner's only, in 0700 directories."""
    from tests.integration.test_file_modes import too_wide

    p = disk_pair(pair_factory, guest_image)
    try:
        for cfg in (p.cfg_a, p.cfg_b):
            Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
            os.chmod(cfg.state_dir, 0o755)  # an existing, looser directory
        b = p.start_secondary()
        a = p.start_primary()
        p.wait("A's guest writing its disk",
               lambda: disk_status(p.root / "hostA").get("writes", 0) >= 5, 180)  # fmt: skip
        a.stop()
        b.stop()
        wide = too_wide(Path(p.cfg_a.state_dir)) + too_wide(Path(p.cfg_b.state_dir))
        assert not wide, "wider than the owner:\n" + "\n".join(wide)
    finally:
        p.close()


def event_time(log_text: str, name: str) -> float:
    """When the first event ``name`` was logged (seconds, from the log line's time)."""
    import datetime

    for line in log_text.splitlines():
        if f'{{"event": "{name}"' in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise AssertionError(f"no event {name} in the log")


def test_disk_stream_broken_with_the_standby_alive(pair_factory, guest_image: Path) -> None:
    """B stays alive, only its disk stream breaks (the TCP connection reset under both
    disk servers with `ss -K`).  Within the grace (DISK_LOST_GRACE_S plus silent_after)
    A runs on, takes no checkpoint and releases nothing (event disk-stream-lost); beyond
    it A stops (exit 2, saying why), and B promotes from its last committed checkpoint,
    its disk byte for byte A's at that checkpoint."""
    from mirror.ha.primaryrun import DISK_LOST_GRACE_S

    p = disk_pair(pair_factory, guest_image)
    grace = DISK_LOST_GRACE_S + p.cfg_a.arbiter.silent_after_ms / 1000
    try:
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (s := a.status() or {}).get("phase") == "protected" and s["acked"] >= 10
               and disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        port = p.cfg_b.disk.port
        cut = time.monotonic()
        subprocess.run(["ss", "-K", "-t", "(", "dport", "=", f":{port}", "or", "sport", "=",
                        f":{port}", ")"], check=True, capture_output=True)  # fmt: skip
        p.wait("A's disk stream lost", lambda: '"disk-stream-lost"' in a.log_path.read_text(), 10)
        time.sleep(max(0.0, cut + 1.0 - time.monotonic()))  # the acks in flight land
        held = (a.status() or {})["acked"]
        time.sleep(max(0.0, cut + grace - 1.0 - time.monotonic()))
        # within the grace: A runs on, nothing more is acknowledged (outputs held); B waits
        st = a.status() or {}
        assert a.proc.poll() is None, a.log_tail()
        assert st["acked"] == held and st["phase"] == "protected", st
        assert (b.status() or {}).get("role") == "secondary" and b.proc.poll() is None
        # beyond it: A stops, saying why; B goes on from its last committed checkpoint
        assert '"disk-stream-lost-stopping"' not in a.log_path.read_text()
        code = a.proc.wait(timeout=grace + 30)
        assert code == 2, a.log_tail()
        log_a = a.log_path.read_text()
        assert "the guest's disk is no longer replicated" in log_a
        # the decision to stop, by the log's clock: the grace after the loss, not before
        lost = event_time(log_a, "disk-stream-lost")
        stopped_after = event_time(log_a, "disk-stream-lost-stopping") - lost
        assert grace - 0.05 <= stopped_after < grace + 2.0, stopped_after
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= held - 1, (committed, held)
        print(f"disk stream cut: A stopped {stopped_after:.1f} s later (grace {grace:g} s), "
              f"B promoted at checkpoint {committed}")  # fmt: skip
    finally:
        p.close()
