"""Userfaultfds from a guest's process: the role's half of native/uffd_preload.c.

A userfaultfd logs the writes of the process that made it, so the dirty-page log
of a guest (mirror/replication/dirtylog.py) needs one made inside the process
that maps guest RAM and writes it (QEMU, or the synthetic guest process).  The
guest process is started with the small library ``mirror._uffdpreload`` in
``LD_PRELOAD`` and ``MIRROR_UFFD_SOCK`` naming a unix socket (here an abstract
one, ``@name``, so nothing is left on disk); the library listens there on a
thread of its own and answers every connection with a new userfaultfd over
SCM_RIGHTS.  Nothing else about the process or its command line changes.
"""

from __future__ import annotations

import array
import errno
import os
import re
import socket
import struct
from pathlib import Path

import mirror
from mirror._pagediff import ffi, lib
from mirror.guests.base import GuestError, LogSource

ENV_SOCK = "MIRROR_UFFD_SOCK"


def preload_library() -> Path | None:
    """The built preload library, or None (a build without it: no dirty-page log)."""
    here = Path(mirror.__file__).parent
    found = sorted(here.glob("_uffdpreload*.so"))
    return found[0] if found else None


def preload_entries(value: str) -> list[str]:
    """The libraries an LD_PRELOAD value names (ld.so splits it at spaces and colons)."""
    return [e for e in re.split(r"[:\s]+", value) if e]


def is_mirror_preload(entry: str) -> bool:
    """Whether an LD_PRELOAD entry is mirror's preload library (of any installation)."""
    return Path(entry).name.startswith("_uffdpreload")


def join_preload(lib: str, value: str) -> str:
    """LD_PRELOAD with mirror's library ``lib`` first, then the operator's own libraries
    of ``value`` in their order (any other copy of mirror's dropped)."""
    theirs = [e for e in preload_entries(value) if not is_mirror_preload(e)]
    return " ".join([lib, *theirs])


def unique_name(kind: str) -> str:
    return f"@mirror-uffd-{kind}-{os.getpid()}-{os.urandom(6).hex()}"


def preload_env(sock: str, base: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment for a guest process that hands out userfaultfds at ``sock``
    (None when the library is not built)."""
    lib = preload_library()
    if lib is None:
        return None
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = join_preload(str(lib), env.get("LD_PRELOAD", ""))
    env[ENV_SOCK] = sock
    return env


def _address(sock: str) -> str | bytes:
    return b"\0" + sock[1:].encode() if sock.startswith("@") else sock


def fetch(source: LogSource, timeout: float = 5.0) -> int:
    """A new userfaultfd made in the guest's process (the caller owns the fd)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(_address(source.socket))
            fds = array.array("i")
            msg, anc, _, _ = s.recvmsg(4, socket.CMSG_SPACE(fds.itemsize))
        except OSError as e:
            raise GuestError(
                f"no userfaultfd from guest process {source.pid} at {source.socket}: {e} "
                f"(was it started with the preload library?)"
            ) from e
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(msg) != 4:
            for fd in fds:
                os.close(fd)
            raise GuestError(f"guest process {source.pid} closed its userfaultfd socket")
        (status,) = struct.unpack("=i", msg)
        if status or not fds:
            for fd in fds:
                os.close(fd)
            raise GuestError(
                f"guest process {source.pid} could not make a userfaultfd: "
                f"{os.strerror(status) if status else 'no fd passed'}"
            )
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]


_INJECT_STEPS = {
    1: "finding a thread of it blocked in a system call",
    2: "ptrace (PTRACE_SEIZE)",
    3: "its registers",
    4: "userfaultfd() inside it",
    5: "pidfd_getfd",
    6: "close() inside it",
    7: "injection (x86_64 only)",
}


def inject(pid: int) -> int:
    """A new userfaultfd made inside process ``pid`` without the preload library: one of
    its threads runs userfaultfd() from its own ``syscall`` instruction under ptrace, the
    fd is copied here and closed there (native/dirtylog.c, dl_uffd_inject).  The
    caller owns the fd.  GuestError saying which step failed and why."""
    step = ffi.new("int *")
    rc = lib.dl_uffd_inject(pid, step)
    if rc >= 0:
        return int(rc)
    name = errno.errorcode.get(-rc, str(-rc))
    why = f"{name}: {os.strerror(-rc)}"
    hint = ""
    if rc in (-errno.EPERM, -errno.EACCES) and step[0] == 2:
        hint = (" (mirror needs ptrace rights over QEMU: run it as root, and no debugger "
                "may be attached to QEMU; kernel.yama.ptrace_scope 3 forbids it)")
    elif step[0] == 4 and rc in (-errno.EPERM, -errno.EACCES, -errno.ENOSYS):
        hint = " (QEMU's seccomp sandbox or the kernel refuses userfaultfd)"
    raise GuestError(
        f"no userfaultfd made inside process {pid}: {_INJECT_STEPS.get(step[0], 'step ?')} "
        f"failed ({why}){hint}"
    )
