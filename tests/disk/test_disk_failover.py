"""Component-level storage failover on the primary: A's local image starts failing with
real EIO (nbdkit's error filter behind nbdfuse); A's disk server goes on serving the
guest from B's replica over the stream (reads of B's view, writes to B only, per
epoch); the guest sees no error and reads its own writes.  When the image answers
again, the blocks written meanwhile are copied back and A serves locally again.
If B dies while A runs on B's storage, A suspends the guest's I/O (no error, no answer)
and nothing of a committed checkpoint is lost.  A local image that hangs (nbdkit's pause
filter: requests held, neither answered nor failed) fails over the same way once a call
on it has taken longer than the disk server's --hang-ms, without waiting for that call.

Writers are NBD clients on A's real socket, each in its own half of the disk, checking
every read against a model of what they wrote (the model, copied at each drained
checkpoint, is the disk as of that checkpoint)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

from mirror.replication.disk import DiskSpec, ReplicatedDisk
from tests.disk.faulty import FaultyImage
from tests.disk.harness import BLOCK, KEY, Harness, differing_blocks
from tests.disk.nbd import NbdClient, NbdError

SIZE = 4 << 20


class Rig(Harness):
    """A Harness whose primary's image is a FaultyImage, with a model of the disk."""

    def __init__(self, root: Path, seed: int, hang_ms: int = 2000) -> None:
        rng = random.Random(seed)
        content = rng.randbytes(SIZE)
        self.faulty = FaultyImage(root, SIZE, content)
        try:
            super().__init__(root, size=SIZE, seed=seed, prefill=False)
        except BaseException:
            self.faulty.close()
            raise
        # the primary with a short probe period (the Harness's has the default)
        self.a.close()
        spec = DiskSpec(self.a_img, SIZE, root / "a", "killpair", probe_ms=100, hang_ms=hang_ms,
                        session_key=KEY)
        self.a = ReplicatedDisk(spec)
        self.model = bytearray(content)
        self.models: dict[int, bytes] = {0: bytes(content)}
        self.errors: list[str] = []
        self.ops = 0
        self.reads_checked = 0
        self.threads: list[threading.Thread] = []  # the committer, then two writers
        self.pauses: list[float] = []  # each checkpoint's pause (drain and barrier), s

    def start_io(self) -> None:
        """The committer and a writer on each half of the disk."""
        self.threads = [threading.Thread(target=self.committer)]
        self.threads += [threading.Thread(target=self.writer, args=("", s, 0.0005))
                         for s in (0, 1)]  # fmt: skip
        for t in self.threads:
            t.start()

    def stop_io(self) -> int:
        """The writers finish their requests, then the committer; returns the last
        checkpoint closed (its model is ``models[it]``).  Idempotent."""
        self.stop.set()
        with self.gate:
            self.gate.notify_all()
        for t in self.threads[1:]:
            t.join(10)
        last = self.epoch - 1
        for t in self.threads[:1]:
            t.join(10)
        return last

    def checkpoint(self) -> bool:
        """One drained pause: barrier, and the model of the disk as of it."""
        t0 = time.monotonic()
        with self.drained():
            err = self.a.barrier(self.epoch)
            assert err is None, err
            self.models[self.epoch] = bytes(self.model)
            self.epoch += 1
        self.pauses.append(time.monotonic() - t0)
        return True

    def writer(self, kind: str, seed: int, delay: float = 0.0) -> None:
        """Random 4 KiB writes (some FUA), TRIM, WRITE_ZEROES, FLUSH and reads checked
        against the model, in half ``seed`` of the disk."""
        rng = random.Random(seed)
        lo, hi = (SIZE // 2) * seed, (SIZE // 2) * (seed + 1)
        c = NbdClient(self.a.spec.nbd_path)
        try:
            while self._enter():
                try:
                    off = rng.randrange(lo // BLOCK, hi // BLOCK) * BLOCK
                    op = rng.random()
                    if op < 0.35:
                        n = min(rng.randint(1, 16) * BLOCK, hi - off)
                        got = c.read(off, n)
                        if got != bytes(self.model[off : off + n]):
                            self.errors.append(f"read at {off}: not what was written")
                        self.reads_checked += 1
                    elif op < 0.4:
                        c.trim(off, BLOCK)
                        self.model[off : off + BLOCK] = bytes(BLOCK)
                    elif op < 0.45:
                        c.zeroes(off, BLOCK)
                        self.model[off : off + BLOCK] = bytes(BLOCK)
                    elif op < 0.48:
                        c.flush()
                    else:
                        data = rng.randbytes(BLOCK)
                        c.write(off, data, fua=op < 0.55)
                        self.model[off : off + BLOCK] = data
                    self.ops += 1
                except NbdError as e:
                    self.errors.append(str(e))
                finally:
                    self._leave()
                if delay:
                    time.sleep(delay)
        finally:
            c.sock.close()

    def run(self, seconds: float, until: str = "") -> None:
        """Checkpoints every 20 ms for ``seconds`` (or until A's storage is ``until``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.02)
            self.wait_window()
            assert self.checkpoint()
            if until and self.a.status()["storage"] == until:
                return
        assert not until, f"A's storage never became {until}: {self.a.status()}"

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError, RuntimeError):
                self.faulty.heal()
                if self.faulty.hung:  # a call stuck on the image ends (else A could not exit)
                    self.faulty.unhang()
            self.stop_io()
            super().close()
        finally:
            self.faulty.close()


def test_local_storage_fails_and_returns_no_guest_error(tmp_path: Path) -> None:
    r = Rig(tmp_path, seed=3)
    try:
        r.sync()
        r.start_io()
        r.run(0.3)
        assert r.a.status()["storage"] == "local"
        ops_before = r.ops
        r.faulty.fail()  # A's storage fails: every read, write and flush gets EIO
        r.run(5, until="remote")
        r.run(0.6)
        st = r.a.status()
        assert st["storage"] == "remote" and st["failovers"] == 1, st
        assert st["storage_peer"] == "127.0.0.1" and "Input/output error" in st["storage_error"], st
        assert st["remote_reads"] > 0 and st["dirty_local"] > 0, st
        ops_remote = r.ops
        assert ops_remote > ops_before + 50, "the guest's I/O stopped while A ran on B's storage"
        r.faulty.heal()
        r.run(10, until="local")
        r.run(0.3)
        last = r.stop_io()
        r.b.commit(last)
        st = r.a.status()
        assert not r.errors, (
            f"the guest saw {len(r.errors)} errors (I/O errors or wrong data): {r.errors[:3]}"
        )
        assert st["storage"] == "local" and st["switchbacks"] == 1 and st["dirty_local"] == 0, st
        assert 0 < st["resynced_local"] <= SIZE // BLOCK, st
        want = r.models[last]
        assert differing_blocks(r.b_img.read_bytes(), want) == 0, (
            "B's replica is not the guest's disk"
        )
        assert differing_blocks(r.a_img.read_bytes(), want) == 0, (
            "A's image missed blocks after the switch back"
        )
        print(f"failover: {r.ops} ops ({ops_remote - ops_before} while failing or remote), "
              f"{r.reads_checked} reads checked, 0 errors, "
              f"{st['resynced_local']} blocks copied back, "
              f"{last} checkpoints")  # fmt: skip
    finally:
        r.close()


def test_replica_dies_while_primary_runs_on_it_io_suspends(tmp_path: Path) -> None:
    r = Rig(tmp_path, seed=4)
    try:
        r.sync()
        r.start_io()
        r.run(0.2)
        r.faulty.fail()
        r.run(5, until="remote")
        r.run(0.3)
        last = r.stop_io()  # the writers finish their requests; the last checkpoint commits
        r.b.commit(last)
        committed = last
        # the guest writes on (an open epoch), then B dies
        c = NbdClient(r.a.spec.nbd_path, timeout=1.0)
        c.write(0, b"\x01" * BLOCK)
        assert c.read(0, BLOCK) == b"\x01" * BLOCK  # its own write, from B's view
        os.kill(r.b.pid, signal.SIGKILL)
        r.b.proc.wait()
        deadline = time.monotonic() + 5
        while r.a.status()["storage"] != "suspended":
            assert time.monotonic() < deadline, r.a.status()
            time.sleep(0.02)
        st = r.a.status()
        assert not st["peer"] and st["failovers"] == 1, st
        for op in ("read", "write"):  # the guest's requests wait: no answer, and no error
            c2 = NbdClient(r.a.spec.nbd_path, timeout=1.0)
            try:
                if op == "read":
                    c2.read(BLOCK, BLOCK)
                else:
                    c2.write(BLOCK, b"\x02" * BLOCK)
                raise AssertionError(f"a {op} was answered while A has no storage")
            except TimeoutError:
                pass
            finally:
                c2.sock.close()
        c.sock.close()
        assert r.a.proc.poll() is None, "A's disk server died"
        assert "guest I/O suspended" in r.a.stderr_path.read_text()
        # nothing of the committed checkpoint is lost: B's replica is the disk as of it
        assert not r.errors, r.errors[:3]
        assert differing_blocks(r.b_img.read_bytes(), r.models[committed]) == 0
    finally:
        r.close()


def _cleaned_up(img: FaultyImage) -> None:
    """The FUSE mount is gone and nbdfuse and nbdkit (one process group) are stopped."""
    assert str(img.path) not in Path("/proc/mounts").read_text(), "the FUSE mount is left"
    try:
        os.killpg(img.proc.pid, 0)
        raise AssertionError("nbdfuse or nbdkit is still running")
    except ProcessLookupError:
        pass


def test_local_storage_hangs_fails_over_within_the_bound(tmp_path: Path) -> None:
    hang_s = 1.0  # the disk server's --hang-ms
    r = Rig(tmp_path, seed=5, hang_ms=int(hang_s * 1000))
    try:
        r.sync()
        r.start_io()
        r.run(0.3)
        assert r.a.status()["storage"] == "local"
        ops_before = r.ops
        r.pauses.clear()
        r.faulty.hang()  # A's image now holds every request: no answer, no error
        t0 = time.monotonic()
        r.run(hang_s + 5, until="remote")
        took = time.monotonic() - t0
        st = r.a.status()
        assert st["storage"] == "remote" and st["failovers"] == 1, st
        assert f"no answer in {int(hang_s * 1000)} ms" in st["storage_error"], st
        assert st["local_timeouts"] >= 1 and st["local_stuck"] >= 1, st
        # detected within the bound (plus a margin for this shared machine), not before it
        assert 0.8 * hang_s <= took <= hang_s + 1.5, f"failover {took:.2f} s after the hang"
        # no checkpoint's pause waited on the stuck call for longer than the bound
        assert max(r.pauses) <= hang_s + 1.5, f"a pause of {max(r.pauses):.2f} s"
        r.run(1.0)  # the image still hangs: the guest runs on B's storage
        st = r.a.status()
        assert st["storage"] == "remote" and st["local_stuck"] >= 1, st
        ops_remote = r.ops
        assert ops_remote > ops_before + 50, "the guest's I/O stopped while A ran on B's storage"
        r.faulty.unhang()  # the held calls land now (stale); the copy back comes after them
        r.run(10, until="local")
        r.run(0.3)
        last = r.stop_io()
        r.b.commit(last)
        st = r.a.status()
        assert not r.errors, (
            f"the guest saw {len(r.errors)} errors (I/O errors or wrong data): {r.errors[:3]}"
        )
        assert st["storage"] == "local" and st["switchbacks"] == 1 and st["local_stuck"] == 0, st
        want = r.models[last]
        assert differing_blocks(r.b_img.read_bytes(), want) == 0, (
            "B's replica is not the guest's disk"
        )
        assert differing_blocks(r.a_img.read_bytes(), want) == 0, (
            "A's image missed blocks after the switch back"
        )
        print(f"hang: failover {took:.2f} s after the image hung (bound {hang_s:g} s), "
              f"longest checkpoint pause {max(r.pauses) * 1000:.0f} ms, "
              f"{st['local_timeouts']} calls abandoned, {r.ops} ops "
              f"({ops_remote - ops_before} while hung), {r.reads_checked} reads checked, "
              f"0 errors, {st['resynced_local']} blocks copied back")  # fmt: skip
    finally:
        r.close()
    _cleaned_up(r.faulty)


def test_primary_with_a_hung_image_stops(tmp_path: Path) -> None:
    """A's image hangs for good (a call of A's stays in the kernel): the disk runs on B
    and A's disk server still ends when told to, once the call comes back; its owner's
    close does not wait for it forever."""
    r = Rig(tmp_path, seed=6, hang_ms=500)
    try:
        r.sync()
        r.start_io()
        r.run(0.2)
        r.faulty.hang()
        r.run(5, until="remote")
        last = r.stop_io()
        r.b.commit(last)
        assert r.a.status()["local_stuck"] >= 1
        t0 = time.monotonic()
        r.a.close(timeout=1.0)  # SIGTERM, then SIGKILL: a thread of A's stays in the kernel
        assert time.monotonic() - t0 < 5, "closing A's disk server waited on the hung image"
        assert r.a.proc.poll() is None, "A exited with a call of it still in FUSE?"
        r.faulty.unhang()  # the call returns: the process ends at once
        r.a.proc.wait(5)
        assert not r.errors, r.errors[:3]
        assert differing_blocks(r.b_img.read_bytes(), r.models[last]) == 0
    finally:
        r.close()
    _cleaned_up(r.faulty)


def test_hung_image_without_a_replica_waits_and_fails_nothing(tmp_path: Path) -> None:
    """No replica holds the whole disk: a hung image is waited for (a slow disk is no
    error), and the guest's write completes once the image answers again."""
    r = Rig(tmp_path, seed=7, hang_ms=300)
    try:
        r.faulty.hang()
        c = NbdClient(r.a.spec.nbd_path, timeout=30.0)
        done: list[str] = []

        def write() -> None:
            try:
                c.write(0, b"\x07" * BLOCK)
                done.append("ok")
            except (NbdError, OSError) as e:
                done.append(f"error: {e}")

        t = threading.Thread(target=write)
        t.start()
        t.join(1.5)  # five times the bound
        assert not done, f"the write was answered while the image hangs: {done}"
        log = r.a.stderr_path.read_text()
        assert "no replica has the whole disk: waiting" in log, log[-500:]
        r.faulty.unhang()
        t.join(10)
        assert done == ["ok"], done
        st = r.a.status()
        assert st["storage"] == "local" and st["failovers"] == 0 and st["local_timeouts"] == 0, st
        assert c.read(0, BLOCK) == b"\x07" * BLOCK
        c.sock.close()
    finally:
        r.close()
    _cleaned_up(r.faulty)
