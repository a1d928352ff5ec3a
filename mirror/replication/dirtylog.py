"""The dirty-page log: the kernel records which pages of guest RAM the guest's
process wrote, so that a checkpoint needs no scan of all of RAM.

Mechanism (Linux >= 6.7; /work/shared/design/DIRTYLOG-NOTES.md): a userfaultfd
made inside the guest's process (mirror/guests/uffd.py) is set up here for
write-protection in async mode over that process's mapping of the RAM file; the
kernel then clears the protection of a page on its first write, without
stopping the writer.  ``PAGEMAP_SCAN`` on /proc/PID/pagemap returns the pages
written since they were last protected and protects them again in the same
walk, so each scan returns what was written since the previous one.

What the log does not see: writes through another mapping (pwrite to the file,
vhost-user), a hole punched in the file, pages freed by a balloon or
virtio-mem.  Guests with those are refused (Guest.log_blockers).  A log that is
gone (the userfaultfd closed, the process restarted: the scan fails with EPERM)
raises :class:`LogLost`; the checkpoint engine then scans all of RAM for that
checkpoint and sets the log up again.
"""

from __future__ import annotations

import errno
import os
from array import array
from pathlib import Path

from mirror._pagediff import ffi, lib
from mirror.guests import uffd
from mirror.guests.base import Guest, GuestError
from mirror.guests.procram import ProcessRam

PAGE_SIZE: int = lib.PD_PAGE_SIZE
SIMULATE_ENV = "MIRROR_DIRTYLOG_SIMULATE"  # "old-kernel": testing hook, PAGEMAP_SCAN refused


class DirtyLogError(RuntimeError):
    """The dirty-page log cannot be set up for this guest (the message says why)."""


class LogUnsupported(DirtyLogError):
    """This kernel cannot keep the log (older than 6.7, or userfaultfd refused)."""


class LogLost(DirtyLogError):
    """A log that worked is gone: its registration was dropped or its process ended."""


_MISSING = {
    lib.DL_NEED_WP_ASYNC: "UFFD_FEATURE_WP_ASYNC",
    lib.DL_NEED_WP_UNPOPULATED: "UFFD_FEATURE_WP_UNPOPULATED",
    lib.DL_NEED_WP_SHMEM: "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
}
_KERNEL = "Linux 6.7 or newer is needed (Debian 13, or the 6.12 kernel of bookworm-backports)"


def _err(rc: int) -> str:
    return f"{errno.errorcode.get(-rc, str(-rc))}: {os.strerror(-rc)}"


def probe() -> str | None:
    """Why this kernel cannot keep a dirty-page log, or None if it can (a working
    log on a page of this process: userfaultfd, the features, PAGEMAP_SCAN)."""
    if os.environ.get(SIMULATE_ENV) == "old-kernel":
        return f"PAGEMAP_SCAN refused (ENOTTY, simulated by {SIMULATE_ENV}): {_KERNEL}"
    feats = lib.dl_uffd_features()
    if feats < 0:
        if feats in (-errno.EPERM, -errno.EACCES):
            return (
                f"userfaultfd refused ({_err(feats)}): run mirror as root, or set "
                f"vm.unprivileged_userfaultfd=1"
            )
        return f"no userfaultfd ({_err(feats)}): {_KERNEL}"
    missing = lib.dl_missing_features(feats)
    if missing:
        names = ", ".join(n for bit, n in _MISSING.items() if missing & bit)
        return f"the kernel's userfaultfd lacks {names}: {_KERNEL}"
    step = ffi.new("int *")
    rc = lib.dl_self_test(step)
    if rc == 0:
        return None
    what = {1: "userfaultfd", 3: "UFFDIO_REGISTER", 4: "opening /proc/self/pagemap"}.get(
        step[0], "PAGEMAP_SCAN"
    )
    if step[0] == 5 and rc in (-errno.ENOTTY, -errno.EINVAL):
        return f"PAGEMAP_SCAN refused ({_err(rc)}): {_KERNEL}"
    if step[0] == 6:
        return "the kernel's PAGEMAP_SCAN did not report a written page"
    return f"{what} failed ({_err(rc)})"


def find_mapping(pid: int, ram_path: Path, size: int) -> int:
    """The address where process ``pid`` maps the whole of ``ram_path`` (one run of
    mappings of the file from offset 0 covering ``size`` bytes)."""
    try:
        st = os.stat(ram_path)
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        raise DirtyLogError(f"cannot find the RAM mapping of process {pid}: {e}") from e
    # a memfd (/proc/PID/fd/N) resolves to "/memfd:NAME (deleted)", as maps names it
    want = os.path.realpath(ram_path).removesuffix(" (deleted)")
    runs: list[tuple[int, int, int]] = []  # (start, end, file offset)
    for line in lines:
        f = line.split(maxsplit=5)
        if len(f) < 6 or int(f[4]) != st.st_ino:
            continue
        if os.path.realpath(f[5].strip().removesuffix(" (deleted)")) != want:
            continue
        a, b = (int(x, 16) for x in f[0].split("-"))
        runs.append((a, b, int(f[2], 16)))
    runs.sort()
    for i, (a, b, off) in enumerate(runs):
        if off != 0:
            continue
        end = b
        for a2, b2, off2 in runs[i + 1 :]:
            if a2 != end or off2 != end - a:
                break
            end = b2
        if end - a >= size:
            return a
    raise DirtyLogError(
        f"process {pid} does not map all of {ram_path} ({size >> 20} MiB) in one piece"
    )


class DirtyLog:
    """The log of one guest's RAM: :meth:`scan` returns the pages written since the
    previous scan (indices into RAM, ascending, like the other scans)."""

    def __init__(self, guest: Guest) -> None:
        source = guest.log_source()
        if source is None:
            raise DirtyLogError(
                f"the {guest.kind} guest was not started with the userfaultfd preload library"
            )
        blockers = guest.log_blockers()
        if blockers:
            raise DirtyLogError(
                "the guest has what the dirty-page log cannot see: " + "; ".join(blockers)
            )
        self.pid = source.pid
        self.npages = len(guest.ram) // PAGE_SIZE
        ram = guest.ram
        self.start: int
        if isinstance(ram, ProcessRam):  # private RAM: its own address in the process
            self.start = ram.base
        else:
            self.start = find_mapping(source.pid, guest.ram_path, len(ram))
        self._out = array("I", bytes(4 * self.npages))
        self._out_p = ffi.from_buffer("uint32_t[]", self._out)
        self.uffd = -1
        self.pagemap = -1
        try:
            self.uffd = uffd.fetch(source) if source.socket else uffd.inject(source.pid)
        except GuestError as e:
            raise DirtyLogError(str(e)) from e
        try:
            rc = lib.dl_uffd_setup(self.uffd, self.start, self.npages * PAGE_SIZE)
            if rc < 0:
                raise DirtyLogError(
                    f"registering {self.npages * PAGE_SIZE >> 20} MiB of process {self.pid} "
                    f"for write-protection failed ({_err(rc)})"
                )
            try:
                self.pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise DirtyLogError(
                    f"cannot open /proc/{self.pid}/pagemap: {e.strerror} (the role needs "
                    f"ptrace read rights on the guest's process: root or the same uid)"
                ) from e
            self._walk(protect=True)  # the first scan protects every page: the log starts
        except BaseException:
            self.close()
            raise

    def _walk(self, *, protect: bool, first: int = 0, count: int | None = None) -> array[int]:
        n = self.npages - first if count is None else count
        rc = lib.dl_scan(
            self.pagemap, self.start + first * PAGE_SIZE, n, int(protect), self._out_p, n
        )
        if rc < 0:
            if rc == -errno.EPERM:
                raise LogLost(f"the write-protection of process {self.pid} is gone (EPERM)")
            if rc in (-errno.ESRCH, -errno.ENOENT, -errno.EIO):
                raise LogLost(f"process {self.pid} is gone ({_err(rc)})")
            if rc in (-errno.ENOTTY, -errno.EINVAL):
                raise LogUnsupported(f"PAGEMAP_SCAN refused ({_err(rc)}): {_KERNEL}")
            raise LogLost(f"PAGEMAP_SCAN on process {self.pid} failed ({_err(rc)})")
        out = self._out[:rc]
        if first:
            for i in range(len(out)):
                out[i] += first
        return out

    def scan(self) -> array[int]:
        """The pages written since the last scan; they are protected again."""
        return self._walk(protect=True)

    def written(self, first: int, count: int) -> array[int]:
        """The pages of [first, first + count) written since the last scan, without
        protecting anything (the safety net asks this)."""
        return self._walk(protect=False, first=first, count=count)

    def drop(self) -> None:
        """Close our (the only) copy of the userfaultfd: the registration is gone, the
        guest's process runs on unprotected, and the kernel fails the next scan with
        EPERM, so it raises LogLost (a lost registration, as a test makes one)."""
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def close(self) -> None:
        self.drop()
        if self.pagemap >= 0:
            os.close(self.pagemap)
            self.pagemap = -1
