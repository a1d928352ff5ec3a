"""May this host run a standby domain whose definition its peer's host agent sent?

A definition that arrives over the interconnect is untrusted input: it may not name a
program to run (the emulator must be at a standard path; `<qemu:commandline>` only a
`-qmp unix:` socket, and only mirror's own environment, its LD_PRELOAD naming besides
mirror's library only libraries the host installed), nor a file outside the host's
domain directories (``[agent] domain_dirs``; firmware also from its firmware
directories).  Pure, over the XML; the operator's own domain is checked by
mirror/guests/domaincheck.py.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from mirror.guests import uffd
from mirror.guests.domaincheck import QEMU_NS, parse

EMULATORS = ("/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm", "/usr/bin/kvm")


MIRROR_ENV = frozenset({"LD_PRELOAD", uffd.ENV_SOCK})


# where a domain's files belong on a host (the host agent's [agent] domain_dirs by default):
# libvirt's own directories and mirror's; the host agent adds its state_dir
DEFAULT_DOMAIN_DIRS = (
    "/var/lib/libvirt", "/var/log/libvirt", "/run/libvirt", "/var/cache/libvirt",
    "/var/lib/mirror", "/var/cache/mirror",
)  # fmt: skip
# the attributes and the <os> elements that name a file on the host
PATH_ATTRS = ("file", "path", "dir", "socket", "template")  # and a <source dev>
OS_FILES = ("kernel", "initrd", "dtb", "loader", "nvram")
# firmware images a domain's <loader> and <nvram template> may name besides: read only,
# installed by the host's packages (ovmf, qemu-system-data, seabios)
FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/edk2", "/usr/share/AAVMF", "/usr/share/qemu",
                 "/usr/share/seabios")  # fmt: skip
FIRMWARE_FILES = {("loader", ""), ("nvram", "template")}
# where an operator's own LD_PRELOAD libraries may be: the host's system library
# directories (what its packages install; a bare name is searched there by ld.so)
LIBRARY_DIRS = ("/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/local/lib")
LIBRARY_SUBDIRS = ((), (f"{os.uname().machine}-linux-gnu",))  # Debian's multiarch


def _inside(path: str, dirs: Sequence[str]) -> bool:
    if not path.startswith("/") or "\0" in path:
        return False
    real = os.path.realpath(os.path.normpath(path))  # "..", and symlinks that exist here
    for d in dirs:
        base = os.path.realpath(os.path.normpath(d))
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def _qmp_path(arg: str) -> str:
    return arg[len("unix:") :].split(",", 1)[0] if arg.startswith("unix:") else ""


def path_refusals(root: ET.Element, dirs: Sequence[str]) -> list[str]:
    """Every file a peer's definition names on this host (kernel, initrd, firmware and
    NVRAM, disk and CD-ROM images, serial and console logs and sockets, channel
    sockets, mirror's QMP socket) that is not inside one of ``dirs``: libvirt (as root)
    would create, truncate, write or read it for the peer.  Paths are compared after
    "..", and symlinks that exist on this host, are resolved."""
    named: list[tuple[str, str]] = []  # (what, path)
    firmware: list[tuple[str, str]] = []  # the same, where firmware dirs are allowed too
    for name in OS_FILES:
        for el in root.findall(f"os/{name}"):
            text = (el.text or "").strip()
            if text:
                (firmware if (name, "") in FIRMWARE_FILES else named).append(
                    (f"<os><{name}>", text))  # fmt: skip
            for attr in ("template",):
                if el.get(attr):
                    (firmware if (name, attr) in FIRMWARE_FILES else named).append(
                        (f"<os><{name} {attr}>", el.get(attr, "")))  # fmt: skip
    devices = root.find("devices")
    for dev in [] if devices is None else list(devices):
        for el in dev.iter():
            if el.tag in ("emulator", "script"):
                continue  # the emulator is checked on its own; a script is refused
            for attr in (*PATH_ATTRS, "dev") if el.tag == "source" else PATH_ATTRS:
                value = el.get(attr)
                if value is not None:
                    named.append((f"<{dev.tag}>'s <{el.tag} {attr}>", value))
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is not None:
        for a in cmd.findall(f"{{{QEMU_NS}}}arg"):
            qmp = _qmp_path(a.get("value", ""))
            if qmp:
                named.append(("the -qmp socket", qmp))
    out = [
        f"{what} is {path!r}, outside the places a domain's files belong on this host "
        f"({', '.join(dirs)}; the host agent's [agent] domain_dirs)"
        for what, path in named
        if not _inside(path, dirs)
    ]
    return out + [
        f"{what} is {path!r}, outside the places a domain's files belong on this host "
        f"({', '.join(dirs)}; the host agent's [agent] domain_dirs) and its firmware "
        f"directories ({', '.join(FIRMWARE_DIRS)})"
        for what, path in firmware
        if not _inside(path, [*dirs, *FIRMWARE_DIRS])
    ]


def preload_refusals(value: str) -> list[str]:
    """Why this host does not preload the libraries of an LD_PRELOAD ``value`` from a
    peer's definition into its standby's QEMU (mirror's own library is replaced by this
    host's, mirror.guests.libvirtxml.standby_xml): each other one must be a library of
    this host's system library directories (a path there, or a bare name ld.so looks for
    there) that exists here."""
    out = []
    for entry in uffd.preload_entries(value):
        if uffd.is_mirror_preload(entry):
            continue
        if "$" in entry or "\0" in entry:
            out.append(f"its LD_PRELOAD names {entry!r}: no ld.so tokens ($LIB, $ORIGIN) "
                       f"are taken")  # fmt: skip
            continue
        if "/" in entry and not _inside(entry, LIBRARY_DIRS):
            out.append(
                f"its LD_PRELOAD names {entry!r}, outside this host's system library "
                f"directories ({', '.join(LIBRARY_DIRS)}): a standby's QEMU loads only "
                f"libraries the host installed (install it there on both hosts)"
            )
            continue
        # a bare name: ld.so searches the system's directories (no LD_LIBRARY_PATH is taken)
        where = (
            [entry]
            if "/" in entry
            else [os.path.join(d, *sub, entry) for d in LIBRARY_DIRS for sub in LIBRARY_SUBDIRS]
        )
        if not any(os.path.isfile(p) for p in where):
            out.append(f"its LD_PRELOAD names {entry!r}, which this host does not have "
                       f"(install it on both hosts)")  # fmt: skip
    return out


def standby_refusals(xml: str, dirs: Sequence[str] = DEFAULT_DOMAIN_DIRS) -> list[str]:
    """Why a standby's host must not run ``xml``, a definition its peer's host agent sent (an
    authenticated peer, but no more than that: nothing in the XML may make this host run
    a program of the peer's choosing, or read or write a file outside ``dirs``).  Empty:
    acceptable.  Beyond ``check``: :func:`program_refusals` and every file it names is
    inside ``dirs`` (:func:`path_refusals`)."""
    root = parse(xml)
    return path_refusals(root, dirs) + program_refusals(root)


def program_refusals(root: ET.Element) -> list[str]:
    """What a standby's host refuses in a definition whatever its directories: the
    emulator is QEMU at a standard path; ``<qemu:commandline>`` holds at most a ``-qmp
    unix:`` monitor socket and no environment but mirror's preload (LD_PRELOAD, whose
    other libraries must pass :func:`preload_refusals`, and MIRROR_UFFD_SOCK); no hooks
    or scripts.  The same on every host: ``mirror pair --check`` says them before pairing."""
    out = []
    emulator = (root.findtext("devices/emulator") or "").strip()
    if emulator and emulator not in EMULATORS:
        out.append(f"its <emulator> is {emulator!r}, not one of {', '.join(EMULATORS)}")
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is not None:
        args = [a.get("value", "") for a in cmd.findall(f"{{{QEMU_NS}}}arg")]
        ok = args == [] or (len(args) == 2 and args[0] == "-qmp" and args[1].startswith("unix:"))
        # the dirty-page log's preload library and socket: the standby's definition
        # replaces both with this host's own (mirror.guests.libvirtxml.standby_xml)
        envs = [e.get("name") for e in cmd.findall(f"{{{QEMU_NS}}}env")]
        ok = ok and all(n in MIRROR_ENV for n in envs) and len(cmd) == len(args) + len(envs)
        if not ok:
            out.append(
                f"its <qemu:commandline> passes {args!r} and environment {envs!r} (only "
                f"-qmp unix:PATH and mirror's own {', '.join(sorted(MIRROR_ENV))} are taken)"
            )
        for e in cmd.findall(f"{{{QEMU_NS}}}env"):
            if e.get("name") == "LD_PRELOAD":
                out += preload_refusals(e.get("value", ""))
    for el in root.iter():
        if el.tag in ("script", "hook") or (el.tag == "source" and el.get("type") == "exec"):
            out.append(f"it names a script or program (<{el.tag}>)")
    return out
