"""The guest's disk, replicated per epoch: the agent's handle on its disk server (a device
backend of the guest, like the NIC relay; the epoch engine and the standby drive it).

The server (native/diskserver.c, one process per host) serves the disk to QEMU
over NBD on a unix socket.  On the primary it writes the local image and streams
every change to the secondary's server as it happens; :meth:`DiskServer.barrier`
closes an epoch inside the checkpoint's pause (after QMP ``stop`` drained the
guest's I/O).  On the secondary it journals the stream;
:meth:`DiskServer.commit` applies epoch N (durably) when checkpoint N commits,
before the ack; :meth:`DiskServer.promote` drops every uncommitted epoch.

Why a socket of the server's own rather than the zmq interconnect: the records
are produced by C threads on the guest's I/O path; sending them through the
agent's Python would put a per-write Python step back on that path.  The stream
is under the pair's keys all the same: both agents derive a key for each pairing
session from their CurveZMQ key pairs (:func:`session_key`) and hand it, with the
pair's generation, to their disk server on its control socket
(:meth:`DiskServer.session`); a connection that does not prove it is refused, and
the records go under AES-256-GCM (docs/security.md).  The secondary also refuses
another pair, another generation than its own agent's, or another disk size.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.hoststate import PRIVATE_UMASK, open_private, private_dir

log = logging.getLogger("mirror.guests.disk")


class DiskError(RuntimeError):
    """The disk server could not start, or refused a command."""


def session_key(
    secret: bytes | None, peer: bytes | None, pair: str, generation: int, session: int
) -> bytes:
    """The disk stream's key for one pairing session, which both hosts derive on their own:
    HMAC-SHA256 of X25519(this host's CurveZMQ secret key, the peer's public key) over the
    pair, the generation and the interconnect session (a random number the primary's HELLO
    carries under CurveZMQ).  Keys are z85 (40 characters) or raw (32 bytes); both None:
    an insecure pair (no keys), whose stream proves only the session number."""
    from mirror._diskserver import ffi, lib  # type: ignore[import-not-found]

    def raw(k: bytes) -> bytes:
        if len(k) == 40:
            from zmq.utils import z85

            k = z85.decode(k)
        if len(k) != 32:
            raise DiskError("a CurveZMQ key is 32 bytes (40 in z85)")
        return k

    ctx = b"mirror disk stream 1\0" + pair.encode() + b"\0"
    ctx += generation.to_bytes(8, "little") + (session & (2**64 - 1)).to_bytes(8, "little")
    out = ffi.new("unsigned char[32]")
    if secret is None or peer is None:
        rc = lib.mirror_disk_session_key(ffi.NULL, ffi.NULL, ctx, len(ctx), out)
    else:
        rc = lib.mirror_disk_session_key(raw(secret), raw(peer), ctx, len(ctx), out)
    if rc:
        raise DiskError("cannot derive the disk stream's session key from the CurveZMQ keys")
    return bytes(ffi.buffer(out, 32))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the agent dies (a host dies whole)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class DiskSpec:
    """What a disk server serves, and where."""

    image: Path
    size: int
    run_dir: Path  # its sockets (keep the path short: unix sockets hold 107 bytes)
    pair: str
    generation: int = 1
    workers: int = 4
    stall_ms: int = 5000
    probe_ms: int = 1000  # while on the replica's storage: how often to try the local image
    hang_ms: int = 2000  # a call on the local image longer than this: it hangs (fail over)
    listen: str = ""  # HOST:PORT: a replica, receiving the stream there
    journal: Path | None = None
    journal_bytes: int = 256 << 20
    meta: Path | None = None  # a replica's identity file (None: IMAGE.replica-id)
    snapshots: Path | None = None  # tests: a copy of the image at each barrier
    keep: int = 8
    # the stream's session key, handed over on the control socket at start (None: later,
    # by DiskServer.session at pairing); never on the command line
    session_key: bytes | None = None
    plain_stream: bool = False  # tests and benches: records without AEAD (both ends alike)

    @property
    def nbd_path(self) -> Path:
        return self.run_dir / "disk.sock"

    @property
    def control_path(self) -> Path:
        return self.run_dir / "disk-ctl.sock"


class DiskServer:
    """A running disk server (a child process) and a connection to its control socket."""

    def __init__(self, spec: DiskSpec, *, timeout: float = 10.0) -> None:
        self.spec = spec
        private_dir(spec.run_dir)
        args = [
            "--image", str(spec.image), "--size", str(spec.size),
            "--nbd", str(spec.nbd_path), "--control", str(spec.control_path),
            "--pair", spec.pair, "--generation", str(spec.generation),
            "--workers", str(spec.workers), "--stall-ms", str(spec.stall_ms),
            "--probe-ms", str(spec.probe_ms), "--hang-ms", str(spec.hang_ms),
        ]  # fmt: skip
        if spec.meta is not None:
            args += ["--meta", str(spec.meta)]
        if spec.listen:
            assert spec.journal is not None
            args += ["--replica", spec.listen, "--journal", str(spec.journal)]
            args += ["--journal-bytes", str(spec.journal_bytes)]
        if spec.snapshots is not None:
            spec.snapshots.mkdir(parents=True, exist_ok=True)
            args += ["--test-snapshots", str(spec.snapshots), "--test-keep", str(spec.keep)]
        if spec.plain_stream:
            args += ["--test-plain-stream", "1"]
        self.stderr_path = spec.run_dir / "diskserver.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirror.guests.diskproc", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open_private(self.stderr_path),
            preexec_fn=_die_with_parent,
            umask=PRIVATE_UMASK,  # the image, the journal, the metadata: ours only
        )
        self._ctl: socket.socket | None = None
        self._buf = b""
        self._lock = threading.Lock()  # one command at a time on the control socket
        try:
            assert self.proc.stdout is not None
            os.set_blocking(self.proc.stdout.fileno(), False)
            deadline = time.monotonic() + timeout
            line = b""
            while b"ready" not in line:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise DiskError(f"the disk server did not start: {self._stderr()}")
                with contextlib.suppress(BlockingIOError, TypeError):
                    line += self.proc.stdout.read() or b""
                time.sleep(0.005)
            self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._ctl.connect(str(spec.control_path))
            if spec.session_key is not None:
                self.session(spec.session_key, spec.generation)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _stderr(self) -> str:
        try:
            return self.stderr_path.read_text().strip()[-600:] or "(no message)"
        except OSError:
            return "(no message)"

    def call(self, command: str, timeout: float = 30.0) -> str:
        """One control command; its answer line without the leading ``ok``.
        DiskError with the server's words if it answers ``err``."""
        with self._lock:
            return self._call(command, timeout)

    def _call(self, command: str, timeout: float) -> str:
        if self._ctl is None:
            raise DiskError("the disk server is closed")
        self._ctl.settimeout(timeout)
        try:
            self._ctl.sendall(command.encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = self._ctl.recv(65536)
                if not chunk:
                    raise DiskError(f"the disk server went away: {self._stderr()}")
                self._buf += chunk
        except OSError as e:
            raise DiskError(f"disk server control ({command.split()[0]}): {e}") from e
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode(errors="replace")
        if text.startswith("ok"):
            return text[3:]
        raise DiskError(text[4:] if text.startswith("err ") else text)

    def session(self, key: bytes, generation: int) -> None:
        """The pairing session's stream key (32 bytes, :func:`session_key`) and the pair's
        generation (the arbiter's): a replica takes only a stream that proves this key
        and names this generation; a primary proves it when it next replicates."""
        if len(key) != 32 or generation < 1:
            raise DiskError("a disk session is a 32-byte key and a generation >= 1")
        self.call(f"session {key.hex()} {generation}")

    # -- the primary -----------------------------------------------------------------

    def replicate(self, host: str, port: int, first_epoch: int, *, resync: bool = False) -> None:
        """Start streaming to the secondary's server, with a live copy of the whole disk;
        ``resync``: only the blocks its replica lacks (DiskError if this server cannot
        tell which, or the replica does not hold this server's disk: copy it all then).
        A promoted replica's server, asked for a resync, offers its old primary's image a
        hashsync instead: both hash every block, and the blocks that differ (and those
        written since promotion) are sent; the hashing runs after this returns (status
        ``peer`` true, ``synced`` false, as during any copy)."""
        self.call(f"replicate {host} {port} {first_epoch}{' resync' if resync else ''}")

    def committed(self, epoch: int) -> None:
        """The secondary acknowledged checkpoint ``epoch``: its replica holds the disk's
        epochs <= ``epoch`` (what a resync after a break needs to send shrinks)."""
        self.call(f"committed {epoch}")

    def wait_synced(
        self, timeout: float = 600.0, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Until the initial copy is done (``progress(done, total)`` as it goes)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if progress:
                progress(st["sync_bytes"], st["sync_total"])
            if st["synced"]:
                return
            if not st["peer"]:
                raise DiskError(f"the disk stream to the secondary ended: {st['lost']}")
            if time.monotonic() > deadline:
                raise DiskError(f"the initial disk sync did not finish in {timeout:g} s")
            time.sleep(0.05)

    def barrier(self, epoch: int) -> str | None:
        """Close epoch ``epoch`` (in the checkpoint's pause); None, or why the
        disk is not replicated (the guest's I/O goes on either way)."""
        try:
            self.call(f"barrier {epoch}")
        except DiskError as e:
            return str(e)
        return None

    # -- the secondary ---------------------------------------------------------------

    def commit(self, epoch: int, timeout_ms: int = 10_000) -> None:
        """Apply epochs <= ``epoch`` to the replica, fdatasync; DiskError if it cannot."""
        self.call(f"commit {epoch} {timeout_ms}", timeout=timeout_ms / 1000 + 30)

    def promote(self) -> tuple[int, int]:
        """Drop every uncommitted epoch and serve the replica read-write:
        (the committed epoch, the records dropped)."""
        committed, dropped = self.call("promote").split()
        return int(committed), int(dropped)

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(self.call("status"))
        return st

    def summary(self) -> dict[str, Any]:
        """For the agent's status file: the disk's replication, in a few fields."""
        try:
            st = self.status()
        except DiskError as e:
            return {"error": str(e)}
        keys = ("role", "synced", "peer", "lost", "writes", "write_bytes", "committed",
                "consistent", "journal_used", "journal_size", "dropped_records",
                "storage", "storage_error", "failovers", "switchbacks", "dirty_local",
                "known", "dirty_peer", "resync_blocks", "generation", "session_key",
                "refused_connections")  # fmt: skip
        return {k: st[k] for k in keys}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, SIGKILL after ``timeout`` s; a server with a call
        hung on its image in the kernel ends only when the call returns: not waited for."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("the disk server (pid %d) has not ended: a call on its image "
                                "hangs in the kernel; it ends when that call returns",
                                self.proc.pid)  # fmt: skip
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for p in (self.spec.nbd_path, self.spec.control_path):
            p.unlink(missing_ok=True)
        if self.spec.journal is not None:
            self.spec.journal.unlink(missing_ok=True)
