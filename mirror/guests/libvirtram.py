"""Where the RAM of a QEMU that libvirt runs is, found through QMP and /proc, never guessed.

- QEMU's pid: libvirt does not tell it (and its pid file may be in another mount
  namespace), so a memfd of a unique name is passed to QEMU with ``getfd``; the one process
  that then holds it is QEMU (``closefd`` gives it back).
- The RAM backend: the one ``memory-backend-*`` object in QOM's ``/objects`` (``pc.ram``,
  or ``ram-node0`` with one NUMA cell); more than one is refused (mirror maps one).
- Its backing, as libvirt's ``<memoryBacking>`` made it:

  - ``<source type='file'/><access mode='shared'/>``: ``memory-backend-file,share=on``,
    mapped from its ``mem-path``;
  - ``<source type='memfd'/><access mode='shared'/>``: ``memory-backend-memfd,share=on``,
    mapped through QEMU's own fd of it: of QEMU's fds, the memfd QEMU made for that backend
    (named ``memory-backend-memfd``) of exactly the backend's size and mapped shared by
    QEMU; none or more than one such is an error, not a pick;
  - private anonymous RAM (``memory-backend-ram``: no ``<memoryBacking>``), for a domain
    paired live (``[libvirt] private_ram``): read from QEMU's process at the address QEMU
    gives for guest-physical 0 (HMP ``gpa2hva``), which must be in that backend;
  - anything else (a backend without ``share``; hugetlbfs; private RAM otherwise) is
    refused with the change to make.

No host-wide setting is needed for memfd RAM (no ``memory_backing_dir`` in qemu.conf).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mirror.guests.base import GuestError
from mirror.guests.domaincheck import prepare_fix
from mirror.guests.libvirtqmp import Monitor

PAGE = 4096
MEMFD_NAME = "/memfd:memory-backend-memfd"  # QEMU names a memfd backend's fd after its type


@dataclass(frozen=True)
class GuestRam:
    pid: int  # QEMU's
    path: Path  # the RAM file, or /proc/PID/fd/N: QEMU's memfd
    backing: str  # "file" or "memfd"
    size: int  # bytes
    backend: str  # its QOM path
    address: int = 0  # "private": where QEMU maps it


def qemu_pid(monitor: Monitor, name: str) -> int:
    """The pid of the QEMU behind ``monitor``: the process that holds the probe passed
    with ``getfd``."""
    tag = f"mirror-probe-{os.getpid()}-{os.urandom(6).hex()}"
    probe = os.memfd_create(tag, os.MFD_CLOEXEC)
    try:
        st = os.fstat(probe)
        monitor.execute("getfd", {"fdname": tag}, fd=probe)
        try:
            holders = _holders(f"/memfd:{tag}", (st.st_dev, st.st_ino))
        finally:
            with contextlib.suppress(GuestError):
                monitor.execute("closefd", {"fdname": tag})
    finally:
        os.close(probe)
    holders.discard(os.getpid())
    if len(holders) != 1:
        raise GuestError(
            f"domain {name!r}: cannot tell its QEMU process (the fd passed to it is held by "
            f"{sorted(holders) or 'no process'})"
        )
    return holders.pop()


def has_preload(pid: int) -> bool:
    """Whether QEMU ``pid`` runs with the dirty-page log's preload (its environment)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(kv.startswith(b"MIRROR_UFFD_SOCK=") for kv in env)


def _holders(link: str, key: tuple[int, int]) -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path).startswith(link):
                        st = os.stat(fd.path)
                        if (st.st_dev, st.st_ino) == key:
                            found.add(int(entry.name))
                            break
    return found


def _backends(monitor: Monitor) -> list[str]:
    children = monitor.execute("qom-list", {"path": "/objects"}) or []
    return [
        f"/objects/{c['name']}"
        for c in children
        if str(c.get("type", "")).startswith("child<memory-backend-")
    ]


def find_ram(monitor: Monitor, pid: int, name: str, *, private_ok: bool = False) -> GuestRam:
    """The guest's RAM (GuestError saying what to change if mirror cannot map it);
    ``private_ok``: private anonymous RAM too (read from the process, not mapped)."""
    backends = _backends(monitor)
    if len(backends) != 1:
        raise GuestError(
            f"domain {name!r} has {len(backends)} RAM backends ({', '.join(backends) or 'none'}"
            f"): mirror maps exactly one (no NUMA cells beyond one, no memory devices)"
        )
    obj = backends[0]

    def prop(p: str) -> object:
        return monitor.execute("qom-get", {"path": obj, "property": p})

    kind = str(prop("type"))
    if kind == "memory-backend-ram" and private_ok:
        size = int(prop("size"))  # type: ignore[call-overload]
        return GuestRam(pid, Path(f"/proc/{pid}/mem"), "private", size, obj,
                        _address(monitor, obj, size, name))  # fmt: skip
    if kind == "memory-backend-ram":
        raise GuestError(
            f"domain {name!r}: its RAM is private anonymous memory ({kind}), which no other "
            f"process can map: {prepare_fix(name)}"
        )
    if kind not in ("memory-backend-file", "memory-backend-memfd"):
        raise GuestError(f"domain {name!r}: its RAM backend is {kind}, which mirror cannot map")
    if kind == "memory-backend-memfd" and prop("hugetlb"):
        raise GuestError(_hugetlbfs(name, "a hugetlbfs memfd"))
    if not prop("share"):
        raise GuestError(
            f"domain {name!r}: its RAM ({kind}) is mapped private by QEMU (no <access "
            f"mode='shared'/>), so its writes are invisible to any other mapping: "
            f"{prepare_fix(name)}"
        )
    size = int(prop("size"))  # type: ignore[call-overload]
    if kind == "memory-backend-file":
        path = Path(str(prop("mem-path")))
        try:
            st = os.stat(path)
        except OSError as e:
            raise GuestError(f"domain {name!r}: its RAM file {path}: {e.strerror}") from None
        if st.st_blksize > PAGE:
            raise GuestError(_hugetlbfs(name, f"a hugetlbfs file ({path})"))
        return GuestRam(pid, path, "file", size, obj)
    return GuestRam(pid, _memfd(pid, size, name), "memfd", size, obj)


def _gpa2hva(monitor: Monitor, gpa: int) -> tuple[str, int]:
    """(the RAM block, the host address) QEMU gives for guest-physical address ``gpa``."""
    text = str(monitor.execute("human-monitor-command", {"command-line": f"gpa2hva {gpa:#x}"}))
    m = re.search(r"\((?P<block>[^)]*)\) is (?P<hva>0x[0-9a-fA-F]+)", text)
    if m is None:
        raise GuestError(f"QEMU's gpa2hva {gpa:#x} said {text.strip()!r}")
    return m["block"], int(m["hva"], 16)


LOW_RAM = 0x80000000  # guest RAM below this is at guest-physical = offset (pc and q35)


def _address(monitor: Monitor, backend: str, size: int, name: str) -> int:
    """Where QEMU maps the private RAM of ``backend`` (its id is its last path part): the
    host address of guest-physical 0, checked at the last low page too (one mapping)."""
    block, base = _gpa2hva(monitor, 0)
    if block != backend.rsplit("/", 1)[-1]:
        raise GuestError(
            f"domain {name!r}: guest-physical 0 is in {block!r}, not its RAM backend {backend}"
        )
    last = min(size, LOW_RAM) - PAGE
    _, at = _gpa2hva(monitor, last)
    if at != base + last:
        raise GuestError(
            f"domain {name!r}: its private RAM is not one mapping in QEMU (0x{base:x} + "
            f"{last:#x} is not 0x{at:x}): mirror reads it as one"
        )
    return base


def _hugetlbfs(name: str, what: str) -> str:
    return (
        f"domain {name!r}: its RAM is on hugepages ({what}, <memoryBacking><hugepages/>): the "
        f"dirty-page log and the page scans work on 4 KiB pages; remove <hugepages/> from its "
        f"<memoryBacking> (and restart it)"
    )


def _memfd(pid: int, size: int, name: str) -> Path:
    """QEMU's fd of its RAM memfd: the one memfd of the backend's name and size that QEMU
    maps shared (several fds of one memfd are one)."""
    found: dict[tuple[int, int], Path] = {}
    try:
        fds = sorted(os.scandir(f"/proc/{pid}/fd"), key=lambda e: int(e.name))
    except OSError as e:
        raise GuestError(f"domain {name!r}: cannot read QEMU {pid}'s fds: {e.strerror}") from None
    for fd in fds:
        with contextlib.suppress(OSError):
            if not os.readlink(fd.path).startswith(MEMFD_NAME):
                continue
            st = os.stat(fd.path)
            if st.st_size == size:
                found.setdefault((st.st_dev, st.st_ino), Path(fd.path))
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        raise GuestError(f"domain {name!r}: cannot read QEMU {pid}'s maps: {e.strerror}") from None
    mapped = set()
    for line in maps:
        f = line.split(maxsplit=5)
        if len(f) >= 5 and f[1][3:4] == "s" and f[4].isdigit():
            mapped.add(int(f[4]))
    ram = [p for (_dev, ino), p in found.items() if ino in mapped]
    if len(ram) != 1:
        raise GuestError(
            f"domain {name!r}: its RAM is a memfd, but QEMU {pid} has {len(ram)} shared "
            f"memfds of {size >> 20} MiB named {MEMFD_NAME[1:]}: mirror maps only the one it "
            f"can tell (nothing guessed)"
        )
    return ram[0]
