"""The guest's disk as a device: the disk server process and its control socket.

The server (native/diskserver.c and its parts, one process per host) serves the disk to
QEMU over NBD on a unix socket (:attr:`DiskSpec.nbd_path`, which QEMU's ``-blockdev``
names); this module starts it (``python -m mirror.guests.diskproc``), reads its answers
on the control socket, and stops it.  What the same process does beyond the device, the
epoch stream to the secondary, the secondary's journal, barrier and commit, storage
failover and resync, is replication: mirror.replication.disk drives it
(:class:`~mirror.replication.disk.ReplicatedDisk`, this class's subclass that the
backends start).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.hoststate import PRIVATE_UMASK, open_private, private_dir

log = logging.getLogger("mirror.guests.disk")


class DiskError(RuntimeError):
    """The disk server could not start, or refused a command."""


def _die_with_parent() -> None:
    """In the child before exec: SIGUSR2 when the role dies.  The server then ends its
    stream to the replica and serves QEMU on from the local image until QEMU lets go of
    the disk (a role that dies alone does not take the guest's disk with it: the host
    agent gives the disk back to libvirt's own file, or the guest ends), then exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGUSR2)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class DiskSpec:
    """What a disk server serves, and where: its command line (the device's settings, and
    its replication's: a replica's port and journal, the stream's key)."""

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
    # by ReplicatedDisk.session at pairing); never on the command line
    session_key: bytes | None = None
    plain_stream: bool = False  # tests and benches: records without AEAD (both ends alike)

    @property
    def nbd_path(self) -> Path:
        return self.run_dir / "disk.sock"

    @property
    def control_path(self) -> Path:
        return self.run_dir / "disk-ctl.sock"


class DiskServer:
    """A running disk server (a child process) and a connection to its control socket:
    the guest's device (QEMU connects to ``spec.nbd_path``); the commands of its
    replication are :class:`~mirror.replication.disk.ReplicatedDisk`'s."""

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

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(self.call("status"))
        return st

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
