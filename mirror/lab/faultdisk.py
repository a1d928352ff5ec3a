"""A disk image with a real I/O error path, for the tests and the bench of the disk's
storage failover: nbdkit's file plugin behind its ``error`` filter, exported as a file
by ``nbdfuse`` (FUSE).  While the trigger file exists every
read, write and flush of the image fails with EIO in the kernel, as a failing local
disk or a lost storage path does (these kernels have no device-mapper).

It can also hang, as an NFS server gone or a dying disk does: nbdkit's ``pause`` filter
(its control socket) holds every request that reaches it after :meth:`FaultyImage.hang`
until :meth:`FaultyImage.unhang`; the caller's read, write or fdatasync of the FUSE file
blocks in the kernel meanwhile (uninterruptibly, once nbdfuse took the request)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class FaultToolsMissing(RuntimeError):
    """nbdkit, nbdfuse or /dev/fuse is missing; the message says what to install."""


def missing_tools() -> str | None:
    """Why a FaultyImage cannot be made here, or None."""
    for tool in ("nbdkit", "nbdfuse"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs nbdkit and libnbd-bin)"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse on this machine"
    return None


class FaultyImage:
    def __init__(self, root: Path, size: int, content: bytes = b"") -> None:
        why = missing_tools()
        if why:
            raise FaultToolsMissing(why)
        self.backing, self.path, self.trigger, self.control = (
            root / "a-backing.img",
            root / "a.img",
            root / "a.fail",
            root / "a.pause",
        )
        self.hung = False
        with open(self.backing, "wb") as f:
            f.write(content)
            f.truncate(size)
        self.path.touch()
        self.proc = subprocess.Popen(
            ["nbdfuse", str(self.path), "--command", "nbdkit", "-s", "--filter=pause",
             "--filter=error", "file", str(self.backing), "error-rate=100%",
             f"error-file={self.trigger}", f"pause-control={self.control}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "nbdfuse.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.path.stat().st_size != size or not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"nbdfuse did not export {self.backing}: see {root}/nbdfuse.log")
            time.sleep(0.02)

    def fail(self) -> None:
        self.trigger.touch()

    def heal(self) -> None:
        self.trigger.unlink(missing_ok=True)

    def _pause_control(self, cmd: bytes) -> None:
        """One command to the pause filter; it answers in upper case once in effect
        (a pause: once the requests it already had are done)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(cmd)
            got = s.recv(1)
        if got != cmd.upper():
            raise RuntimeError(f"nbdkit's pause filter answered {got!r} to {cmd!r}")

    def hang(self) -> None:
        """From now on every request to the image blocks (no answer, no error)."""
        self._pause_control(b"p")
        self.hung = True

    def unhang(self) -> None:
        """The held requests go on, and every later one is answered."""
        self._pause_control(b"r")
        self.hung = False

    def close(self) -> None:
        self.heal()
        if self.hung:  # let the held requests end: their callers (and nbdkit) can then exit
            with contextlib.suppress(OSError, RuntimeError):
                self.unhang()
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 5  # nbdkit (nbdfuse's child, same group) too
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline + 5:
                os.killpg(self.proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
                time.sleep(0.02)
