"""Guest RAM that only its own process maps: private anonymous memory (QEMU's
``memory-backend-ram``, what virt-install's domains have), read from outside with
``process_vm_readv`` (root, or ptrace rights over the process).

A domain started without mirror's memory backing can be paired without a restart this
way (``mirror pair --live``): its pages are copied out of QEMU rather than through a shared
mapping, and its dirty-page log comes from a userfaultfd made inside QEMU
(:func:`mirror.guests.uffd.inject`).  The checkpoint engine reads such RAM only through
:mod:`mirror.replication.pagediff` (gather, the hashed scan, verify), which reads the
pages it needs into its own buffers first.
"""

from __future__ import annotations

import errno
import os
from array import array
from typing import Any

from mirror._pagediff import ffi, lib
from mirror.guests.base import GuestError

PAGE = 4096


class ProcessRam:
    """``size`` bytes at address ``base`` of process ``pid`` (whole pages)."""

    def __init__(self, pid: int, base: int, size: int, what: str = "guest RAM") -> None:
        if base % PAGE or size % PAGE or size <= 0:
            raise GuestError(f"{what}: not whole pages (0x{base:x}, {size} bytes)")
        self.pid, self.base, self.size, self.what = pid, base, size, what
        self.npages = size // PAGE
        probe = bytearray(PAGE)  # the first and last pages: the region is there
        for first in (0, self.npages - 1):
            self.read_range(first, 1, probe)

    def __len__(self) -> int:
        return self.size

    def _fail(self, rc: int) -> GuestError:
        name = errno.errorcode.get(-rc, str(-rc))
        if rc == -errno.ESRCH:
            return GuestError(f"{self.what}: process {self.pid} is gone")
        if rc in (-errno.EPERM, -errno.EACCES):
            return GuestError(
                f"{self.what}: reading process {self.pid}'s memory refused ({name}): run "
                f"mirror as root (it needs ptrace rights over QEMU)"
            )
        return GuestError(
            f"{self.what}: reading {self.size >> 20} MiB at 0x{self.base:x} of process "
            f"{self.pid} failed ({name}: {os.strerror(-rc)})"
        )

    def read_range(self, first: int, count: int, out: Any) -> None:
        """Pages [first, first + count) into ``out`` (a writable buffer of that size)."""
        if not 0 <= first <= first + count <= self.npages:
            raise GuestError(f"{self.what}: pages {first}..{first + count} out of range")
        buf = ffi.from_buffer("uint8_t[]", out, require_writable=True)
        if len(buf) < count * PAGE:
            raise GuestError(f"{self.what}: a buffer of {len(buf)} bytes for {count} pages")
        rc = lib.dl_read_range(self.pid, self.base, first, count, buf)
        if rc < 0:
            raise self._fail(rc)

    def read_pages(self, index: array[int], out: Any) -> None:
        """The listed pages into ``out``, one after another."""
        buf = ffi.from_buffer("uint8_t[]", out, require_writable=True)
        if len(buf) < len(index) * PAGE:
            raise GuestError(f"{self.what}: a buffer of {len(buf)} bytes for {len(index)} pages")
        idx = ffi.from_buffer("uint32_t[]", index)
        rc = lib.dl_read_pages(self.pid, self.base, self.npages, idx, len(index), buf)
        if rc < 0:
            raise self._fail(rc)

    def __getitem__(self, s: slice) -> bytes:
        """Bytes of a page-aligned slice (the engine's look at a few pages)."""
        start, stop, step = s.indices(self.size)
        if step != 1 or start % PAGE or stop % PAGE:
            raise GuestError(f"{self.what}: only whole pages can be read")
        out = bytearray(max(0, stop - start))
        if out:
            self.read_range(start // PAGE, len(out) // PAGE, out)
        return bytes(out)

    def close(self) -> None:
        """Nothing is held (no mapping, no fd)."""
