"""A disk image with a real I/O error path, for the tests and the bench of the disk's
storage failover: nbdkit's file plugin behind its ``error`` filter, exported as a file
by ``nbdfuse`` (FUSE).  While the trigger file exists every
read, write and flush of the image fails with EIO in the kernel, as a failing local
disk or a lost storage path does (these kernels have no device-mapper)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
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
        self.backing, self.path, self.trigger = (
            root / "a-backing.img",
            root / "a.img",
            root / "a.fail",
        )
        with open(self.backing, "wb") as f:
            f.write(content)
            f.truncate(size)
        self.path.touch()
        self.proc = subprocess.Popen(
            ["nbdfuse", str(self.path), "--command", "nbdkit", "-s", "--filter=error", "file",
             str(self.backing), "error-rate=100%", f"error-file={self.trigger}"],
            stdout=subprocess.DEVNULL, stderr=open(root / "nbdfuse.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while self.path.stat().st_size != size:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"nbdfuse did not export {self.backing}: see {root}/nbdfuse.log")
            time.sleep(0.02)

    def fail(self) -> None:
        self.trigger.touch()

    def heal(self) -> None:
        self.trigger.unlink(missing_ok=True)

    def close(self) -> None:
        self.heal()
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
