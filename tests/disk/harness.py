"""A pair of real disk servers driven like the checkpoint engine drives them.

Writers are NBD clients on the primary's real unix socket; a "checkpoint"
waits until no request is in flight (what QMP ``stop`` does to the guest's
I/O), sends the barrier, keeps a copy of the primary's image as of that
barrier (for the byte-for-byte check), and lets the writers go on.  Commits go
to the replica later, pipelined (at most two open), after random delays, as the
standby commits checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from mirror.replication.disk import DiskError, DiskSpec, ReplicatedDisk
from tests.disk.nbd import NbdClient, NbdError

BLOCK = 4096
KEY = bytes(range(32))  # the stream's session key (an agent derives one per pairing)
REC = 512  # one journal record


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def differing_blocks(a: bytes, b: bytes) -> int:
    return sum(a[i : i + BLOCK] != b[i : i + BLOCK] for i in range(0, len(a), BLOCK))


class Harness:
    def __init__(
        self,
        root: Path,
        *,
        size: int = 2 << 20,
        seed: int = 1,
        journal_bytes: int = 32 << 20,
        stall_ms: int = 5000,
        prefill: bool = True,
        plain: bool = False,
    ) -> None:
        self.root, self.size = root, size
        self.rng = random.Random(seed)
        self.a_img, self.b_img = root / "a.img", root / "b.img"
        if prefill:
            self.a_img.write_bytes(self.rng.randbytes(size))
        self.port = free_port()
        self.b = ReplicatedDisk(
            DiskSpec(self.b_img, size, root / "b", "killpair", listen=f"127.0.0.1:{self.port}",
                     journal=root / "b.journal", journal_bytes=journal_bytes, session_key=KEY,
                     plain_stream=plain)
        )  # fmt: skip
        self.a = ReplicatedDisk(DiskSpec(self.a_img, size, root / "a", "killpair",
                                         stall_ms=stall_ms, session_key=KEY, plain_stream=plain))
        self.epoch = 1  # the open epoch
        self.snaps: OrderedDict[int, bytes] = OrderedDict()
        self.snaps[0] = self.a_img.read_bytes()  # as of the end of the initial sync (no writes)
        self.gate = threading.Condition()
        self.paused = False
        self.in_flight = 0
        self.stop = threading.Event()
        self.committed = 0
        self.commit_error = ""
        self.journal_oks: list[tuple[int, int]] = []  # (K, epoch it was answered in)

    def next_pair(self, replica: ReplicatedDisk, replica_img: Path) -> Harness:
        """The rig for the next generation: the promoted replica is the primary, streaming
        to ``replica`` (on the same port); epochs start again at 1."""
        nxt = Harness.__new__(Harness)
        nxt.root, nxt.size, nxt.rng, nxt.port = self.root, self.size, self.rng, self.port
        nxt.a, nxt.a_img, nxt.b, nxt.b_img = self.b, self.b_img, replica, replica_img
        nxt.epoch, nxt.committed, nxt.commit_error = 1, 0, ""
        nxt.snaps = OrderedDict()
        nxt.gate, nxt.paused, nxt.in_flight = threading.Condition(), False, 0
        nxt.stop = threading.Event()
        nxt.journal_oks = []
        return nxt

    def sync(self) -> None:
        self.a.replicate("127.0.0.1", self.port, 1)
        self.a.wait_synced(30)
        deadline = time.monotonic() + 30
        while not self.b.status()["copied"]:  # B applies the copy as it arrives
            assert time.monotonic() < deadline, "the replica never became consistent"
            time.sleep(0.01)

    # -- writers -----------------------------------------------------------------------

    def _enter(self) -> bool:
        with self.gate:
            while self.paused and not self.stop.is_set():
                self.gate.wait(0.05)
            if self.stop.is_set():
                return False
            self.in_flight += 1
            return True

    def _leave(self) -> int:
        with self.gate:
            self.in_flight -= 1
            self.gate.notify_all()
            return self.epoch

    def wait_window(self) -> None:
        """Until at most one checkpoint awaits its commit (two in flight after the next)."""
        deadline = time.monotonic() + 10
        while self.epoch - 1 - self.committed >= 2 and not self.commit_error:
            assert time.monotonic() < deadline, "commits stopped"
            time.sleep(0.001)

    def writer(self, kind: str, seed: int, delay: float = 0.0) -> None:
        rng = random.Random(seed)
        try:
            c = NbdClient(self.a.spec.nbd_path)
        except OSError:
            return
        pos, k = 0, 0
        try:
            while self._enter():
                try:
                    if kind == "seq":
                        c.write(pos, rng.randbytes(65536))
                        pos = (pos + 65536) % self.size
                    elif kind == "journal":
                        # K records appended, each durable (FUA) before "ok K"
                        k += 1
                        rec = struct.pack("<Q", k) + rng.randbytes(REC - 8)
                        c.write((k * REC) % self.size, rec, fua=True)
                    else:
                        off = rng.randrange(self.size // BLOCK) * BLOCK
                        op = rng.random()
                        if op < 0.05:
                            n = rng.randint(1, 4) if off + 4 * BLOCK <= self.size else 1
                            c.trim(off, BLOCK * n)
                        elif op < 0.1:
                            c.zeroes(off, BLOCK)
                        elif op < 0.12:
                            c.flush()
                        else:
                            c.write(off, rng.randbytes(BLOCK), fua=op < 0.2)
                finally:
                    epoch = self._leave()
                if kind == "journal":
                    self.journal_oks.append((k, epoch))
                if delay:
                    time.sleep(delay)
        except (NbdError, OSError):
            pass  # the primary died
        finally:
            c.sock.close()

    # -- checkpoints -------------------------------------------------------------------

    @contextlib.contextmanager
    def drained(self) -> Iterator[None]:
        """The guest paused with none of its requests in flight, as in a checkpoint."""
        with self.gate:
            self.paused = True
            while self.in_flight:
                self.gate.wait(0.05)
        try:
            yield
        finally:
            with self.gate:
                self.paused = False
                self.gate.notify_all()

    def checkpoint(self) -> bool:
        """One drained pause: barrier, copy of the image; False if the primary is gone."""
        with self.drained():
            try:
                err = self.a.barrier(self.epoch)
            except DiskError:
                return False
            if err is not None and "server" in err:
                return False
            assert err is None, err
            self.snaps[self.epoch] = self.a_img.read_bytes()
            while len(self.snaps) > 8:
                self.snaps.popitem(last=False)
            self.epoch += 1
            return True

    def committer(self) -> None:
        while not self.stop.is_set():
            closed = self.epoch - 1
            if closed > self.committed:
                time.sleep(self.rng.uniform(0, 0.04))
                try:
                    self.b.commit(closed, timeout_ms=2000)
                except DiskError as e:
                    self.commit_error = str(e)
                    return
                self.committed = closed
                with contextlib.suppress(DiskError):  # (the primary may have died)
                    self.a.committed(closed)  # the primary learns the ack, as from the agent
            else:
                time.sleep(0.002)

    def run_and_kill(self, kind: str, kill_after: float, epoch_s: float = 0.02) -> None:
        writers = [
            threading.Thread(target=self.writer, args=(kind, self.rng.random()))
            for _ in range(1 if kind == "journal" else 2)
        ]
        committer = threading.Thread(target=self.committer)
        for t in [*writers, committer]:
            t.start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < kill_after:
                time.sleep(epoch_s)
                self.wait_window()
                if not self.checkpoint():
                    break
        finally:
            os.kill(self.a.pid, signal.SIGKILL)  # host A dies
            self.a.proc.wait()
            self.stop.set()
            with self.gate:
                self.gate.notify_all()
            for t in [*writers, committer]:
                t.join(10)

    def close(self) -> None:
        self.stop.set()
        self.a.close()
        self.b.close()
