"""The disk stream is under the pair's keys: a stranger with plain TCP to B's disk port
(or with a wrong key) changes no byte of the replica, commits nothing, and leaves B
promotable to the last committed checkpoint.

Real disk servers (tests/disk/harness.py) and real sockets.  Each attack is one that
worked before the stream was authenticated (issue 19, part 4)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from mirror.replication.disk import DiskError
from tests.disk import streamwire as sw
from tests.disk.harness import KEY, Harness, differing_blocks
from tests.disk.nbd import NbdClient

HELLO_TEXT = "killpair 01 copy"  # the pair's name: a stranger may know it


def _committed_pair(tmp_path: Path, **kw: object) -> Harness:
    """A live pair: the copy, epoch 1 written and committed, epoch 2 written (open)."""
    h = Harness(tmp_path, seed=5, **kw)  # type: ignore[arg-type]
    h.sync()
    c = NbdClient(h.a.spec.nbd_path)
    try:
        for i in range(8):
            c.write(i * 8192, bytes([1 + i]) * 4096)
        assert h.checkpoint()
        h.b.commit(1)
        h.a.committed(1)  # the primary learns the ack, as from its agent
        for i in range(8):
            c.write(i * 8192 + 4096, bytes([100 + i]) * 4096)  # epoch 2: not committed
    finally:
        c.close()
    return h


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _old_hello(size: int, generation: int = 1) -> bytes:
    """The stream's HELLO as it was before the handshake (what a stranger sent)."""
    text = f"killpair {generation} 01 copy".encode()
    return sw.rec(sw.HELLO, 0, size, len(text)) + text


def _stranger_records(size: int) -> bytes:
    """What a stranger would write: the whole disk as SYNC records, SYNC_DONE, an epoch
    of writes, a barrier, and READs of the whole disk."""
    out = b""
    for off in range(0, size, 1 << 20):
        out += sw.rec(sw.SYNC, 0, off, 1 << 20) + b"\xee" * (1 << 20)
    out += sw.rec(sw.SYNC_DONE, 2)
    out += sw.rec(sw.WRITE, 2, 0, 4096) + b"\xab" * 4096 + sw.rec(sw.BARRIER, 2)
    for off in range(0, size, 1 << 20):
        out += sw.rec(sw.READ, 9, off, 1 << 20)
    return out


def _attack(port: int, size: int, how: str, generation: int = 1) -> bytes:
    """One stranger's connection: ``how`` is "plain" (the old protocol, no handshake) or
    "wrongkey" (the handshake under a key not the pair's); everything the replica sent
    back after its challenge."""
    payload = _stranger_records(size)
    if how == "plain":
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        first = _old_hello(size, generation)
    else:
        s, verdict = sw.hello(port, os.urandom(32), HELLO_TEXT, size, generation=generation,
                              cipher="aes-256-gcm")  # (B's cipher: only the key is wrong)
        assert verdict is None, "the replica answered a HELLO that does not prove the key"
        first = b""
    got = b""
    with contextlib.suppress(OSError):
        s.sendall(first + payload)
    with contextlib.suppress(OSError):
        s.settimeout(5)
        while chunk := s.recv(1 << 16):
            got += chunk
    s.close()
    if how == "plain":
        assert got[:32] == sw.rec(sw.HELLO, 0, 0, 32), "no challenge first"
        got = got[64:]  # the challenge and its nonce
    return got


def _assert_promotes_to(h: Harness, epoch: int) -> None:
    st = h.b.status()
    assert st["committed"] == epoch and st["consistent"], st
    committed, _ = h.b.promote()
    assert committed == epoch
    assert differing_blocks(h.b_img.read_bytes(), h.snaps[epoch]) == 0


def _kill_a(h: Harness) -> None:
    os.kill(h.a.pid, signal.SIGKILL)  # host A dies
    h.a.proc.wait()
    deadline = time.monotonic() + 5
    while h.b.status()["streaming"]:  # B sees its stream end
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["plain", "wrongkey"])
def test_after_the_primarys_death_a_stranger_cannot_write_read_or_block_promotion(
    tmp_path: Path, how: str
) -> None:
    """A dies; a stranger copies a whole disk to B's port, writes an epoch, closes it and
    reads B's disk: B answers nothing, its replica is untouched, commit 2 fails, and it
    promotes to checkpoint 1."""
    h = _committed_pair(tmp_path)
    try:
        _kill_a(h)
        before = h.b_img.read_bytes()
        got = _attack(h.port, h.size, how)
        assert got == b"", f"the replica answered a stranger: {got[:64]!r}"
        assert h.b_img.read_bytes() == before
        with pytest.raises(DiskError, match=r"not closed|no stream"):
            h.b.commit(2, timeout_ms=300)
        assert h.b.status()["refused_connections"] >= 1
        _assert_promotes_to(h, 1)
    finally:
        h.close()


@pytest.mark.parametrize("how", ["plain", "wrongkey"])
def test_a_strangers_epoch_is_never_committed(tmp_path: Path, how: str) -> None:
    """During a live pair a stranger sends its own epoch 2 and its barrier: B's next
    `commit 2` applies the primary's epoch 2 only, and B promotes exactly it."""
    h = _committed_pair(tmp_path)
    try:
        before = h.b_img.read_bytes()
        _attack(h.port, h.size, how)
        assert h.b_img.read_bytes() == before
        assert h.b.status()["committed"] == 1
        assert h.checkpoint()  # the primary's own barrier of epoch 2
        h.b.commit(2)
        assert differing_blocks(h.b_img.read_bytes(), h.snaps[2]) == 0
        _kill_a(h)
        _assert_promotes_to(h, 2)
    finally:
        h.close()


@pytest.mark.parametrize("how", ["plain", "wrongkey"])
def test_a_queued_strangers_hello_does_not_fire_at_the_primarys_death(
    tmp_path: Path, how: str
) -> None:
    """A stranger's HELLO sent while the pair is live, waiting on B's port: when A dies
    it is not taken (it never proves the key), and B promotes to its last commit."""
    h = _committed_pair(tmp_path)
    socks: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", h.port), timeout=5)
            if how == "plain":
                s.sendall(_old_hello(h.size))
            else:  # a well-formed HELLO under a wrong key, then a disk copy, all queued
                text = f"{HELLO_TEXT} aes-256-gcm {os.urandom(32).hex()}".encode()
                s.sendall(sw.rec(sw.HELLO, 1, h.size, len(text) + 32) + text + os.urandom(32))
            with contextlib.suppress(OSError):
                s.sendall(_stranger_records(h.size)[: 1 << 16])
            socks.append(s)
        before = h.b_img.read_bytes()
        _kill_a(h)
        time.sleep(3.5)  # longer than a handshake may take
        assert h.b_img.read_bytes() == before
        _assert_promotes_to(h, 1)
    finally:
        for s in socks:
            s.close()
        h.close()


def test_a_hello_of_generation_2_63_does_not_lock_the_primary_out(tmp_path: Path) -> None:
    """A stranger's HELLO claims generation 2^63 (old protocol and under a wrong key): B's
    generation stays its agent's, and the primary pairs again at once."""
    h = _committed_pair(tmp_path)
    try:
        for how in ("plain", "wrongkey"):
            _attack(h.port, h.size, how, generation=1 << 63)
        assert h.b.status()["generation"] == 1
        h.a.replicate("127.0.0.1", h.port, h.epoch)  # the primary's new stream: a full copy
        h.a.wait_synced(30)
        assert h.checkpoint()
        h.b.commit(h.epoch - 1)
        assert differing_blocks(h.b_img.read_bytes(), h.snaps[h.epoch - 1]) == 0
    finally:
        h.close()


def test_a_primary_of_another_generation_is_told_so_not_to_copy(tmp_path: Path) -> None:
    """B's agent moved on to generation 5 (the arbiter's): the primary of generation 1 is
    refused with that reason (before, it was told "a full copy is needed"); B's
    generation stays 5, and nothing is overwritten."""
    h = _committed_pair(tmp_path)
    try:
        h.b.session(KEY, 5)
        before = h.b_img.read_bytes()
        for resync in (True, False):
            with pytest.raises(DiskError, match="another generation") as e:
                h.a.replicate("127.0.0.1", h.port, h.epoch, resync=resync)
            assert "full copy" not in str(e.value)
        assert h.b.status()["generation"] == 5
        assert h.b_img.read_bytes() == before
    finally:
        h.close()


def test_a_primary_with_another_key_is_refused(tmp_path: Path) -> None:
    """A disk server of another session (its key differs): the replica refuses it, and it
    says B did not prove the key; B's replica and commits are untouched."""
    h = _committed_pair(tmp_path)
    try:
        h.a.session(bytes(32), 1)
        before = h.b_img.read_bytes()
        with pytest.raises(DiskError, match="session key differs"):
            h.a.replicate("127.0.0.1", h.port, h.epoch)
        assert h.b_img.read_bytes() == before
        log = h.b.stderr_path.read_text()
        assert "without the pair's session key" in log
        _kill_a(h)
        _assert_promotes_to(h, 1)
    finally:
        h.close()


def test_idle_connections_do_not_block_the_primarys_pairing(tmp_path: Path) -> None:
    """Strangers hold 40 idle connections to B's port (more than the 16 handshakes B runs
    at once; half say nothing, half stop halfway through a HELLO): the primary's copy
    starts at once, not after they time out."""
    h = Harness(tmp_path, seed=2)
    idle: list[socket.socket] = []
    try:
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", h.port), timeout=5)
            if i % 2:
                s.sendall(sw.rec(sw.HELLO, 1, h.size, 100)[:20])
            idle.append(s)
        t0 = time.monotonic()
        h.sync()
        assert time.monotonic() - t0 < 2.5, "the primary waited for the idle connections"
        assert h.b.status()["evicted_handshakes"] >= 24
        assert h.checkpoint()
        h.b.commit(1)
        assert differing_blocks(h.b_img.read_bytes(), h.snaps[1]) == 0
    finally:
        for s in idle:
            s.close()
        h.close()


def test_two_million_zero_records_do_not_grow_the_replica(tmp_path: Path) -> None:
    """2,000,000 ZERO records (no data): from a stranger, refused at its HELLO; from the
    paired primary itself (plain records, so they reach the journal's index), the stream
    ends with a clear error at the index's bound.  B's memory stays bounded, its replica
    untouched, and B promotes to its last commit."""
    h = _committed_pair(tmp_path, plain=True)
    try:
        before = h.b_img.read_bytes()
        rss0 = _rss_kib(h.b.pid)
        zeros = sw.rec(sw.ZERO, 2, 0, 4096) * 2_000_000
        s, verdict = sw.hello(h.port, os.urandom(32), HELLO_TEXT, h.size)
        assert verdict is None
        with contextlib.suppress(OSError):
            s.sendall(zeros)
        s.close()
        # the primary's own stream is replaced by one with the key (an insider)
        h.a.close()
        s, verdict = sw.hello(h.port, KEY, "killpair 02 copy", h.size)
        assert verdict == 0
        sent = threading.Event()

        def flood() -> None:
            with contextlib.suppress(OSError):
                s.sendall(sw.rec(sw.SYNC_DONE, 2) + zeros)
            sent.set()

        t = threading.Thread(target=flood)
        t.start()
        t.join(60)
        s.close()
        assert sent.is_set()
        log = h.b.stderr_path.read_text()
        assert "more records than the journal's index holds" in log, log[-600:]
        grown = _rss_kib(h.b.pid) - rss0
        assert grown < 16 << 10, f"the replica grew by {grown} KiB"
        st = h.b.status()
        assert st["pending_records"] <= st["max_pending"]
        # that insider's copy overwrote nothing (no SYNC), but B holds no commit of it:
        # the stream ended before any barrier
        with pytest.raises(DiskError, match="no committed checkpoint"):
            h.b.promote()
        assert h.b_img.read_bytes() == before
    finally:
        h.close()


def test_a_stranger_flood_of_zero_records_is_refused_without_growth(tmp_path: Path) -> None:
    """The same flood as a stranger after A's death: refused at the HELLO; B promotes."""
    h = _committed_pair(tmp_path)
    try:
        _kill_a(h)
        rss0 = _rss_kib(h.b.pid)
        zeros = sw.rec(sw.ZERO, 2, 0, 4096) * 2_000_000
        for how in ("plain", "wrongkey"):
            if how == "plain":
                s = socket.create_connection(("127.0.0.1", h.port), timeout=5)
                data = _old_hello(h.size) + sw.rec(sw.SYNC_DONE, 2) + zeros
            else:
                s, _ = sw.hello(h.port, os.urandom(32), HELLO_TEXT, h.size)
                data = sw.rec(sw.SYNC_DONE, 2) + zeros
            with contextlib.suppress(OSError):
                s.sendall(data)
            s.close()
        assert _rss_kib(h.b.pid) - rss0 < 8 << 10
        _assert_promotes_to(h, 1)
    finally:
        h.close()


class _Proxy:
    """A man in the middle on the stream: forwards both ways, records what A sent, and
    can flip one byte of A's stream after ``flip_at`` bytes."""

    def __init__(self, target: int, flip_at: int | None = None) -> None:
        self.target, self.flip_at = target, flip_at
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.sent = bytearray()
        self.threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            a, _ = self.lsock.accept()
            b = socket.create_connection(("127.0.0.1", self.target))
            for src, dst, up in ((a, b, True), (b, a, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                if up:
                    data = bytearray(chunk)
                    at = -1 if self.flip_at is None else self.flip_at - len(self.sent)
                    if 0 <= at < len(data):
                        data[at] ^= 0x01
                    self.sent += chunk
                    chunk = bytes(data)
                dst.sendall(chunk)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.lsock.close()


def test_an_altered_record_ends_the_stream_and_a_replay_is_refused(tmp_path: Path) -> None:
    """A man in the middle flips one byte of the encrypted copy: B ends the stream on its
    tag and commits nothing of it.  Then A's recorded bytes, replayed whole as a new
    connection, are refused at the HELLO (the challenge is new each time)."""
    h = _committed_pair(tmp_path)
    proxy = _Proxy(h.port, flip_at=200_000)
    try:
        before = h.b_img.read_bytes()
        h.a.replicate("127.0.0.1", proxy.port, h.epoch)
        with contextlib.suppress(DiskError):
            h.a.wait_synced(10)
        deadline = time.monotonic() + 10
        while "fails its integrity check" not in h.b.stderr_path.read_text():
            assert time.monotonic() < deadline, h.b.stderr_path.read_text()[-600:]
            time.sleep(0.05)
        # the copy ended halfway: B holds no committed checkpoint of that stream
        with pytest.raises(DiskError):
            h.b.commit(h.epoch, timeout_ms=300)
        recorded = bytes(proxy.sent)
        s = socket.create_connection(("127.0.0.1", h.port), timeout=5)
        with contextlib.suppress(OSError):
            s.sendall(recorded)
        got = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(1 << 16):
                got += chunk
        s.close()
        # its challenge only (or less of it: B closes with the replay unread, and the
        # reset may cut the challenge short); an answer would come after it
        assert len(got) <= 64, "the replica answered a replayed HELLO"
        assert "without the pair's session key" in h.b.stderr_path.read_text()
        assert before is not None
    finally:
        proxy.close()
        h.close()


def test_the_session_key_is_the_same_on_both_hosts_and_only_theirs() -> None:
    """The agents' derivation: A (its secret, B's public) and B (its secret, A's public)
    get the same key; another session, generation or host gets another."""
    import zmq

    from mirror.replication.disk import session_key

    a_pub, a_sec = zmq.curve_keypair()
    b_pub, b_sec = zmq.curve_keypair()
    _, c_sec = zmq.curve_keypair()
    k = session_key(a_sec, b_pub, "p", 3, 42)
    assert k == session_key(b_sec, a_pub, "p", 3, 42) and len(k) == 32
    assert k != session_key(a_sec, b_pub, "p", 3, 43)
    assert k != session_key(a_sec, b_pub, "p", 4, 42)
    assert k != session_key(c_sec, b_pub, "p", 3, 42)  # a stranger's key pair
    assert k != session_key(None, None, "p", 3, 42)
    assert struct.calcsize("<IIQQQ") == 32
