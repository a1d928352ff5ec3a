"""The replica's journal is bounded: back-pressure when full, and what happens when one
epoch alone outgrows it.  Also: the replica refuses what is not its stream."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from mirror.replication.disk import DiskError
from tests.disk import streamwire
from tests.disk.harness import KEY, Harness, differing_blocks
from tests.disk.nbd import NbdClient


def test_journal_wraps_and_loses_nothing(tmp_path: Path) -> None:
    """A 256 KiB journal (each epoch smaller), 40 checkpoints of random writes committed
    as they close: several journals' worth goes through the ring; B equals A at the
    last checkpoint."""
    h = Harness(tmp_path, journal_bytes=256 << 10, seed=7)
    try:
        h.sync()
        committer = threading.Thread(target=h.committer)
        writers = [threading.Thread(target=h.writer, args=("rand4k", s, 0.001)) for s in (1, 2)]
        for t in [committer, *writers]:
            t.start()
        for _ in range(40):
            time.sleep(0.01)
            h.wait_window()
            assert h.checkpoint()
        h.stop.set()
        for t in writers:
            t.join(10)
        last = h.epoch - 1
        committer.join(10)
        h.b.commit(last)
        st = h.b.status()
        assert st["journal_used"] <= st["journal_size"] == 256 << 10
        written = h.a.status()["write_bytes"]
        assert written > 2 * (256 << 10), f"only {written} bytes written: no back-pressure tested"
        assert differing_blocks(h.b_img.read_bytes(), h.snaps[last]) == 0
    finally:
        h.close()


def test_epoch_larger_than_journal_gives_up_the_stream_not_the_guest(tmp_path: Path) -> None:
    """One epoch of 24 MiB against a 256 KiB journal and no commit: the primary's writes
    wait, then after stall_ms it stops replicating (its writes go on, no error); the
    barrier says so; B commits nothing of that epoch."""
    h = Harness(tmp_path, journal_bytes=256 << 10, stall_ms=300, seed=3)
    try:
        h.sync()
        c = NbdClient(h.a.spec.nbd_path)
        for i in range(384):  # 24 MiB, more than the journal and both TCP buffers
            c.write((i * 65536) % h.size, bytes([i % 251]) * 65536)
        c.close()
        st = h.a.status()
        assert not st["peer"] and "stopped reading" in st["lost"], st
        err = h.a.barrier(1)
        assert err is not None and "stopped reading" in err
        with pytest.raises(DiskError, match="not closed"):
            h.b.commit(1, timeout_ms=200)
        # no checkpoint was ever committed after the copy: nothing B could go on from
        with pytest.raises(DiskError, match="no committed checkpoint"):
            h.b.promote()
    finally:
        h.close()


def _raw_stream(port: int, hello: bytes, size: int) -> socket.socket:
    """The primary's handshake with the session key, then raw (plain) records."""
    s, _ = streamwire.hello(port, KEY, hello.decode(), size)
    return s


@pytest.mark.parametrize(
    ("hello", "size", "record", "why"),
    [
        (b"otherpair 01 copy", 2 << 20, b"", "another pair"),
        (b"killpair 01 copy", 4 << 20, b"", "size differs"),
        (b"killpair 1", 2 << 20, b"", "does not understand"),
        (b"killpair 01 resync", 2 << 20, b"", "does not hold that primary's disk"),
        # a write beyond the end of the disk, then a record of an unknown type
        (b"killpair 01 copy", 2 << 20, struct.pack("<IIQQQ", 0x4D524431, 2, 0, 2 << 20, 4096),
         "out of the disk's bounds"),
        (b"killpair 01 copy", 2 << 20, struct.pack("<IIQQQ", 0x4D524431, 99, 0, 0, 0),
         "unknown type"),
        # a read of B's view before its copy is complete
        (b"killpair 01 copy", 2 << 20, struct.pack("<IIQQQ", 0x4D524431, 8, 5, 0, 4096),
         "a READ during the initial sync"),
        # after the copy: a read of B's view past the end of the disk
        (b"killpair 01 copy", 2 << 20,
         struct.pack("<IIQQQ", 0x4D524431, 7, 1, 0, 0)  # SYNC_DONE
         + struct.pack("<IIQQQ", 0x4D524431, 8, 5, (2 << 20) - 4096, 8192),
         "out of the disk's bounds"),
    ],
)  # fmt: skip
def test_replica_refuses_a_bad_stream(
    tmp_path: Path, hello: bytes, size: int, record: bytes, why: str
) -> None:
    """The paired primary itself (it has the session key) sending what is not a stream;
    records without AEAD (``plain``) so that the record checks are reached."""
    h = Harness(tmp_path, seed=1, plain=True)
    try:
        h.sync()  # B is consistent at epoch 0
        before = h.b_img.read_bytes()
        h.a.close()  # the real primary's stream ends
        s = _raw_stream(h.port, hello, size)
        with contextlib.suppress(OSError):  # B may have closed it already
            s.sendall(record)
        s.settimeout(5)
        got = b""  # the end of the stream (B answered the HELLO already)
        with contextlib.suppress(OSError):
            while chunk := s.recv(4096):
                got += chunk
                assert len(got) <= 0, "the replica kept a bad stream open, answering"
        s.close()
        log = (h.b.spec.run_dir / "diskserver.log").read_text()
        assert why in log, log[-400:]
        assert h.b_img.read_bytes() == before
    finally:
        h.close()
