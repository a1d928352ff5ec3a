"""A returning secondary whose replica is known gets only the blocks written since it was
last in sync (a bitmap on the primary), not a full copy; one that is not known (a new
disk, a restarted primary) is refused a resync and needs the full copy.

Real disk servers (the C process on each side), real sockets, a real SIGKILL of B."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from mirror.replication.disk import DiskError, DiskSpec, ReplicatedDisk
from tests.disk.harness import BLOCK, KEY, Harness, differing_blocks
from tests.disk.nbd import NbdClient

SIZE = 8 << 20


def replica(h: Harness) -> ReplicatedDisk:
    return ReplicatedDisk(
        DiskSpec(h.b_img, h.size, h.root / "b", "killpair", listen=f"127.0.0.1:{h.port}",
                 journal=h.root / "b.journal", journal_bytes=32 << 20, session_key=KEY)
    )  # fmt: skip


def protected_run(h: Harness, seconds: float) -> None:
    """Writers, checkpoints and commits (the primary told of each), then all committed."""
    threads = [threading.Thread(target=h.committer)]
    threads += [threading.Thread(target=h.writer, args=("rand4k", s, 0.001)) for s in (1, 2)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(0.02)
        h.wait_window()
        assert h.checkpoint()
    h.stop.set()
    with h.gate:
        h.gate.notify_all()
    for t in threads:
        t.join(10)
    h.stop.clear()
    last = h.epoch - 1
    h.b.commit(last)
    h.a.committed(last)


def test_returning_secondary_gets_only_the_blocks_written_since(tmp_path: Path) -> None:
    h = Harness(tmp_path, size=SIZE, seed=21)
    try:
        h.sync()
        protected_run(h, 0.4)
        assert h.a.status()["known"], h.a.status()
        rng = random.Random(5)
        c = NbdClient(h.a.spec.nbd_path)
        # writes B receives but never commits: one closed epoch, then the open one
        written = {rng.randrange(SIZE // BLOCK) for _ in range(40)}
        for i, b in enumerate(sorted(written)):
            c.write(b * BLOCK, rng.randbytes(BLOCK))
            if i == 20:
                assert h.a.barrier(h.epoch) is None
                h.epoch += 1
        time.sleep(0.1)  # (in B's journal)
        os.kill(h.b.pid, signal.SIGKILL)  # B's host dies
        h.b.proc.wait()
        # A goes on alone: writes to a known set of blocks (and a TRIM, a WRITE_ZEROES)
        alone = {rng.randrange(SIZE // BLOCK) for _ in range(150)}
        for b in sorted(alone):
            c.write(b * BLOCK, rng.randbytes(BLOCK))
        written |= alone
        c.trim(0, 2 * BLOCK)
        c.zeroes(SIZE - 3 * BLOCK, 3 * BLOCK)
        c.close()
        written |= {0, 1, SIZE // BLOCK - 3, SIZE // BLOCK - 2, SIZE // BLOCK - 1}
        for _ in range(3):  # checkpoints with no replica: the epochs go on
            assert h.a.barrier(h.epoch) is not None
            h.epoch += 1
        st = h.a.status()
        assert not st["peer"] and st["dirty_peer"] == len(written), (st["dirty_peer"], len(written))
        before = differing_blocks(h.a_img.read_bytes(), h.b_img.read_bytes())
        assert before == len(written), before
        # B returns with its replica (a new process, the same image): a resync
        h.b.close()
        h.b = replica(h)
        h.a.replicate("127.0.0.1", h.port, h.epoch, resync=True)
        h.a.wait_synced(30)
        st = h.a.status()
        assert st["resync_blocks"] == len(written), (st["resync_blocks"], len(written))
        # the guest writes on during and after; the next checkpoint commits
        protected_run(h, 0.3)
        assert differing_blocks(h.a_img.read_bytes(), h.b_img.read_bytes()) == 0
        assert h.a.status()["known"] and h.b.status()["consistent"]
        print(f"resync: {st['resync_blocks']} blocks sent of {SIZE // BLOCK} "
              f"({len(written)} written in epochs B never committed or while away)")  # fmt: skip
    finally:
        h.close()


def test_resync_refused_for_an_unknown_replica_or_a_restarted_primary(tmp_path: Path) -> None:
    h = Harness(tmp_path, size=SIZE, seed=22)
    try:
        with pytest.raises(DiskError, match="a full copy is needed"):  # never copied yet
            h.a.replicate("127.0.0.1", h.port, 1, resync=True)
        h.sync()
        protected_run(h, 0.2)
        # B comes back with another disk (its image replaced): its identity file is gone
        h.b.close()
        (tmp_path / "b.img.replica-id").unlink()
        h.b = replica(h)
        with pytest.raises(DiskError, match="does not hold this disk"):
            h.a.replicate("127.0.0.1", h.port, h.epoch, resync=True)
        assert "does not hold that primary's disk" in h.b.stderr_path.read_text()
        h.a.replicate("127.0.0.1", h.port, h.epoch)  # the full copy is taken
        h.a.wait_synced(30)
        assert h.a.status()["resync_blocks"] == 0
        protected_run(h, 0.2)
        assert (tmp_path / "b.img.replica-id").exists()
        # the primary's disk server restarts (a new life: it cannot know what B lacks)
        h.a.close()
        h.a = ReplicatedDisk(DiskSpec(h.a_img, h.size, tmp_path / "a", "killpair", session_key=KEY))
        h.b.close()
        h.b = replica(h)
        with pytest.raises(DiskError, match="full copy"):
            h.a.replicate("127.0.0.1", h.port, h.epoch, resync=True)
    finally:
        h.close()


def _blocks_differing(a: bytes, b: bytes) -> set[int]:
    return {i // BLOCK for i in range(0, len(a), BLOCK) if a[i : i + BLOCK] != b[i : i + BLOCK]}


def test_promoted_replica_resyncs_the_old_primary_by_block_hashes(tmp_path: Path) -> None:
    """A dies with writes of its own after the last committed checkpoint K that B never
    got (an epoch in B's journal, dropped at promotion, and writes after its stream
    ended); B, promoted, writes; A's image comes back as B's replica: B hashes its image,
    A its own, and only the blocks that differ (plus any B writes meanwhile) are sent, not
    the whole disk.  After B's death in turn, the promoted replica is B's disk at the
    checkpoint it committed, byte for byte."""
    h = Harness(tmp_path, size=SIZE, seed=23)
    a2: ReplicatedDisk | None = None
    try:
        h.sync()
        protected_run(h, 0.3)
        k = h.epoch - 1
        assert h.a_img.with_name("a.img.replica-id").read_text().endswith(" primary\n")
        rng = random.Random(7)
        nblocks = SIZE // BLOCK
        c = NbdClient(h.a.spec.nbd_path)
        # A's writes after K: an epoch B journals but never commits, then the open one
        a_only = {rng.randrange(nblocks) for _ in range(40)}
        for i, b in enumerate(sorted(a_only)):
            c.write(b * BLOCK, rng.randbytes(BLOCK))
            if i == 25:
                assert h.a.barrier(h.epoch) is None
                h.epoch += 1
        time.sleep(0.1)  # (in B's journal)
        committed, dropped = h.b.promote()  # A is cut off; B takes over at K
        assert committed == k and dropped > 0, (committed, dropped)
        deadline = time.monotonic() + 10
        while h.a.status()["peer"]:  # B ended A's stream
            assert time.monotonic() < deadline
            time.sleep(0.01)
        local = {rng.randrange(nblocks) for _ in range(20)}  # A alone, before it dies
        for b in sorted(local):
            c.write(b * BLOCK, rng.randbytes(BLOCK))
        a_only |= local
        c.close()
        os.kill(h.a.pid, signal.SIGKILL)  # A's host dies
        h.a.proc.wait()
        # B, promoted, serves the guest: its writes
        cb = NbdClient(h.b.spec.nbd_path)
        b_writes = {rng.randrange(nblocks) for _ in range(60)}
        for b in sorted(b_writes):
            cb.write(b * BLOCK, rng.randbytes(BLOCK))
        cb.close()
        differ = _blocks_differing(h.a_img.read_bytes(), h.b_img.read_bytes())
        assert a_only <= differ and differ <= a_only | b_writes, (len(differ), len(a_only))
        # A's image comes back as B's replica (a new disk server on it, B's old port)
        h.a.close()
        a2 = ReplicatedDisk(DiskSpec(h.a_img, h.size, tmp_path / "a2", "killpair",
                                     listen=f"127.0.0.1:{h.port}", journal=tmp_path / "a2.journal",
                                     journal_bytes=32 << 20, session_key=KEY))  # fmt: skip
        second = h.next_pair(a2, h.a_img)
        # the guest on B writes on during the hashing and the resync
        writer = threading.Thread(target=second.writer, args=("rand4k", 3, 0.002))
        writer.start()
        try:  # as the agent does: a resync if the replica takes it, else a full copy
            h.b.replicate("127.0.0.1", h.port, second.epoch, resync=True)
        except DiskError:
            h.b.replicate("127.0.0.1", h.port, second.epoch)
        h.b.wait_synced(30)
        second.stop.set()
        writer.join(10)
        second.stop.clear()
        st = h.b.status()
        sent = st["resync_blocks"]
        print(f"hashsync: {sent} blocks sent of {nblocks} ({len(differ)} differing, "
              f"{len(a_only)} written by A alone after K, "
              f"{st.get('hash_differ')} found by hash)")  # fmt: skip
        # not the whole disk (a full copy sends no resync_blocks): the blocks that differ,
        # A's own after K among them, and at most those the guest wrote meanwhile
        assert len(differ) <= sent < nblocks // 8, (sent, len(differ), nblocks)
        assert st["hash_differ"] >= len(a_only), st
        # the next checkpoint commits: A's image is B's disk again
        assert second.checkpoint()
        a2.commit(second.epoch - 1)
        h.b.committed(second.epoch - 1)
        assert differing_blocks(h.a_img.read_bytes(), h.b_img.read_bytes()) == 0
        assert h.b.status()["known"] and a2.status()["consistent"]
        # B dies in turn; A's replica, promoted, is B's disk at the checkpoint it committed
        second.run_and_kill("rand4k", kill_after=0.4)
        last, _ = a2.promote()
        assert last in second.snaps, (last, list(second.snaps))
        assert differing_blocks(h.a_img.read_bytes(), second.snaps[last]) == 0
    finally:
        if a2 is not None:
            a2.close()
        h.close()


def test_hashsync_refused_by_an_image_that_was_not_that_primarys(tmp_path: Path) -> None:
    """A promoted replica offers a hashsync only to the image of the primary it was
    promoted from: a new disk, or an image whose identity file names another primary
    server (or is garbage), refuses it and takes the full copy."""
    h = Harness(tmp_path, size=SIZE, seed=24)
    a2: ReplicatedDisk | None = None
    try:
        h.sync()
        protected_run(h, 0.2)
        h.b.promote()
        h.a.close()
        ident = h.a_img.with_name("a.img.replica-id")
        pair, gen, sid, _ = ident.read_text().split()
        other_sid = f"{int(sid, 16) ^ 1:016x}"
        for text in (None, f"{pair} {gen} {other_sid} primary\n", f"other {gen} {sid} primary\n",
                     f"{pair} {gen} {sid}\n", "\0" * 40):  # fmt: skip
            if text is None:
                ident.unlink()
            else:
                ident.write_text(text)
            a2 = ReplicatedDisk(DiskSpec(h.a_img, h.size, tmp_path / "a2", "killpair",
                                         listen=f"127.0.0.1:{h.port}",
                                         journal=tmp_path / "a2.journal",
                                         journal_bytes=32 << 20, session_key=KEY))  # fmt: skip
            with pytest.raises(DiskError, match="does not hold this disk: a full copy is needed"):
                h.b.replicate("127.0.0.1", h.port, 1, resync=True)
            assert "a hashsync, but this image was not" in a2.stderr_path.read_text()
            a2.close()
            a2 = None
        a2 = ReplicatedDisk(DiskSpec(h.a_img, h.size, tmp_path / "a2", "killpair",
                                     listen=f"127.0.0.1:{h.port}", journal=tmp_path / "a2.journal",
                                     journal_bytes=32 << 20, session_key=KEY))  # fmt: skip
        h.b.replicate("127.0.0.1", h.port, 1)  # the full copy
        h.b.wait_synced(30)
        assert h.b.status()["resync_blocks"] == 0
        second = h.next_pair(a2, h.a_img)
        assert second.checkpoint()
        a2.commit(second.epoch - 1)
        assert differing_blocks(h.a_img.read_bytes(), h.b_img.read_bytes()) == 0
    finally:
        if a2 is not None:
            a2.close()
        h.close()


def test_a_resync_lost_midway_is_sent_again_whole(tmp_path: Path) -> None:
    """A resync whose stream ends before it is done (here: a replica that takes it, then
    reads nothing) gives its blocks back: the next resync sends them all again."""
    import hashlib
    import hmac
    import socket as so
    import struct

    from tests.disk import streamwire as sw

    size = 32 << 20
    h = Harness(tmp_path, size=size, seed=25, stall_ms=300, plain=True)
    fake = so.socket()
    try:
        h.sync()
        protected_run(h, 0.2)
        os.kill(h.b.pid, signal.SIGKILL)  # B's host dies; A writes the whole disk alone
        h.b.proc.wait()
        c = NbdClient(h.a.spec.nbd_path)
        for off in range(0, size, 1 << 20):
            c.write(off, random.Random(off).randbytes(1 << 20))
        c.close()
        assert h.a.status()["dirty_peer"] == size // BLOCK
        # a replica that answers the resync, then never reads: A's stream stalls midway
        fake.bind(("127.0.0.1", 0))
        fake.listen(1)
        answered = threading.Event()

        def replica_that_stalls() -> None:
            conn, _ = fake.accept()
            nb = os.urandom(32)
            conn.sendall(sw.rec(sw.HELLO, length=32) + nb)
            head = sw._recv(conn, 32)
            body = sw._recv(conn, struct.unpack("<IIQQQ", head)[4])
            na = bytes.fromhex(body[:-32].decode().split()[-1])
            m = b"mirror-disk-answer".ljust(32, b"\0") + nb + na + (0).to_bytes(8, "little")
            conn.sendall(sw.rec(sw.HELLO, length=32) + hmac.new(KEY, m, hashlib.sha256).digest())
            answered.set()
            time.sleep(5)
            conn.close()

        t = threading.Thread(target=replica_that_stalls)
        t.start()
        h.a.replicate("127.0.0.1", fake.getsockname()[1], h.epoch, resync=True)
        with pytest.raises(DiskError, match=r"stopped reading|closed|ended"):
            h.a.wait_synced(30)
        t.join(10)
        st = h.a.status()
        assert not st["synced"] and st["dirty_peer"] == size // BLOCK, st
        # B returns: the resync sends every block again, and B's replica is A's disk
        h.b.close()
        h.b = ReplicatedDisk(
            DiskSpec(h.b_img, size, tmp_path / "b", "killpair", listen=f"127.0.0.1:{h.port}",
                     journal=tmp_path / "b.journal", journal_bytes=32 << 20, session_key=KEY,
                     plain_stream=True)
        )  # fmt: skip
        h.a.replicate("127.0.0.1", h.port, h.epoch, resync=True)
        h.a.wait_synced(30)
        assert h.a.status()["resync_blocks"] == size // BLOCK
        assert h.checkpoint()
        h.b.commit(h.epoch - 1)
        assert differing_blocks(h.a_img.read_bytes(), h.b_img.read_bytes()) == 0
    finally:
        fake.close()
        h.close()
