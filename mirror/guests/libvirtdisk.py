"""A libvirt domain's disk, replicated: its file's bytes go through mirror's disk server.

The domain keeps its disk as the operator defined it (a raw or qcow2 file, any bus,
cache and discard mode; its XML is never changed).  Below QEMU's format layer, mirror
puts its disk server (mirror/guests/disk.py) in the path, live:

- the disk server opens the same file (on the primary: the image itself; on the
  secondary: its replica at the same path, in that host's file system);
- QMP ``getfd`` hands QEMU a socket already connected to the server's NBD export,
  ``blockdev-add`` makes an NBD node on it, and ``blockdev-reopen`` gives the domain's
  format node (libvirt's ``libvirt-N-format``, qcow2 or raw) that node as its ``file``.
  Every byte QEMU's qcow2 (or raw) driver writes, data and metadata, now goes through
  the server, which writes the file and streams the change to the peer per epoch.
  ``stop`` (every checkpoint's pause) drains the guest's I/O and flushes QEMU's qcow2
  caches to the file, so the file is consistent at each barrier;
- :func:`restore` reopens the format node on libvirt's own file node again (``mirror
  unpair``, a role that ends with the guest running): libvirt's view of the domain was
  never changed.

A qcow2 image grows as clusters are allocated, but an NBD export has one size: the
export is the file's size plus room for the whole virtual disk and its metadata
(:func:`export_size`), and the file is extended (sparse) to it when paired.  The file's
apparent size stays so after unpairing; ``qemu-img check`` reports it clean.

On the secondary, the standby QEMU (started paused, ``-incoming``) opens the replica
inactive and reads only its header; migration's activation at promotion reopens it and
reads the committed metadata.  A new replica therefore gets a qcow2 header first
(:func:`placeholder`), which the initial copy overwrites.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror.guests.base import GuestError

log = logging.getLogger("mirror.guests.libvirtdisk")

FORMATS = ("raw", "qcow2")
PREFIX = "mirror-disk-"  # the NBD node a role adds: PREFIX + the role's pid (and its fd's name)


@dataclass(frozen=True)
class DomainDisk:
    """The one writable disk of a domain, as its XML defines it."""

    target: str  # vda, sda, ...
    path: str  # its file on this host
    fmt: str  # raw or qcow2
    alias: str = ""  # libvirt's device alias in the live XML (virtio-disk0, ...)


def writable_disks(xml: str) -> list[DomainDisk]:
    """Every writable disk of the domain (``device='disk'``, not read-only)."""
    out = []
    for d in ET.fromstring(xml).findall("./devices/disk"):
        if d.get("device", "disk") != "disk" or d.find("readonly") is not None:
            continue
        src, drv = d.find("source"), d.find("driver")
        tgt, alias = d.find("target"), d.find("alias")
        path = "" if src is None else (src.get("file") or src.get("dev") or src.get("name") or "")
        out.append(
            DomainDisk(
                target="" if tgt is None else tgt.get("dev", ""),
                path=path,
                fmt="raw" if drv is None else drv.get("type", "raw"),
                alias="" if alias is None else alias.get("name", ""),
            )
        )
    return out


def the_disk(xml: str, name: str) -> DomainDisk | None:
    """The domain's one replicated disk (None: it has none); GuestError for what mirror
    cannot replicate (domaincheck says the same before pairing)."""
    disks = writable_disks(xml)
    if not disks:
        return None
    if len(disks) > 1:
        raise GuestError(
            f"domain {name!r} has {len(disks)} writable disks "
            f"({', '.join(d.target for d in disks)}): mirror replicates one per domain"
        )
    d = disks[0]
    if d.fmt not in FORMATS or not d.path.startswith("/"):
        raise GuestError(f"domain {name!r}: its disk {d.target} is not a raw or qcow2 file")
    return d


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of a disk in use (``-U``: shared, read only)."""
    try:
        r = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", path],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except FileNotFoundError:
        raise GuestError("qemu-img is not installed (Debian: apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"qemu-img info {path}: no answer in 60 s") from None
    if r.returncode:
        raise GuestError(f"qemu-img info {path}: {r.stderr.strip() or 'failed'}")
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def export_size(disk: DomainDisk) -> int:
    """The NBD export's size for ``disk`` (GuestError if its image cannot be replicated):
    a raw file's own size; for qcow2 the file's size plus the whole virtual disk plus
    its metadata (an L2 entry per cluster, refcounts), rounded up to MiB, so that the
    image can grow into it."""
    info = image_info(disk.path)
    fmt = info.get("format")
    if fmt != disk.fmt:
        raise GuestError(
            f"the disk {disk.target} ({disk.path}) is {fmt}, its <driver type> says {disk.fmt}"
        )
    if info.get("backing-filename"):
        raise GuestError(
            f"the disk {disk.target} ({disk.path}) has a backing file "
            f"({info['backing-filename']}): mirror replicates one file; flatten it first "
            f"(virsh blockpull {disk.target}, or qemu-img convert)"
        )
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise GuestError(
            f"the disk {disk.target} ({disk.path}) keeps its data in an external file "
            f"({specific['data-file']}): mirror replicates one file; convert it"
        )
    size = os.stat(disk.path).st_size
    if fmt == "raw":
        return size
    virtual = int(info["virtual-size"])
    cluster = int(info.get("cluster-size") or 65536)
    meta = virtual // cluster * 8 * 2 + (16 << 20)  # L2 tables and refcounts, with room
    mib = 1 << 20
    return (size + virtual + meta + mib - 1) // mib * mib


def disk_sizes(xml: str) -> dict[str, int]:
    """What both hosts of a pair must agree on about the domain's disk (the host agent
    sends it with the standby's XML): its export's size and its virtual size; empty
    without a disk.  GuestError for a disk mirror cannot replicate."""
    root = ET.fromstring(xml)
    d = the_disk(xml, (root.findtext("name") or "").strip())
    if d is None:
        return {}
    virtual = int(image_info(d.path)["virtual-size"])
    return {"disk_bytes": export_size(d), "disk_virtual": virtual}


def grow(path: str, size: int) -> None:
    """Extend ``path`` to ``size`` bytes (sparse), never shrink it."""
    try:
        if os.stat(path).st_size < size:
            os.truncate(path, size)
    except OSError as e:
        raise GuestError(f"cannot extend {path} to {size} bytes: {e.strerror}") from None


def placeholder(path: str, like: str, virtual: int) -> None:
    """A new replica of a qcow2 disk: the header of an empty image of ``virtual`` bytes
    at its start, so that the standby QEMU can open it (the initial copy overwrites
    it).  ``like``: where to make the empty image (a directory of this host's)."""
    tmp = Path(like) / "placeholder.qcow2"
    try:
        r = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), str(virtual)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if r.returncode:
            raise GuestError(f"qemu-img create: {r.stderr.strip()}")
        data = tmp.read_bytes()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise GuestError(f"cannot prepare the replica {path}: {e.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def is_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except OSError:
        return False


# ---- QEMU's side: the format node's file, through the server and back ----------------


def format_node(monitor: Any, pid: int, disk: DomainDisk, name: str) -> dict[str, Any]:
    """The options libvirt gave the disk's format node (``-blockdev`` on QEMU's command
    line), found through ``query-block`` by the disk's device alias."""
    node = ""
    for b in monitor.execute("query-block"):
        qdev = str(b.get("qdev", ""))
        if disk.alias and (qdev == disk.alias or f"/{disk.alias}/" in qdev):
            node = str((b.get("inserted") or {}).get("node-name", ""))
    if not node:
        raise GuestError(f"domain {name!r}: QEMU has no block node for its disk {disk.target}")
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as e:
        raise GuestError(f"domain {name!r}: QEMU's command line: {e.strerror}") from None
    for flag, value in itertools.pairwise(args):
        if flag != b"-blockdev" or not value.startswith(b"{"):
            continue
        try:
            opts = json.loads(value)
        except ValueError:
            continue
        if opts.get("node-name") == node:
            if opts.get("driver") not in FORMATS or not isinstance(opts.get("file"), str):
                break
            return dict(opts)
    raise GuestError(
        f"domain {name!r}: its disk {disk.target} (node {node}) was not defined at QEMU's start "
        f"as a raw or qcow2 node over a file (hot-plugged?): mirror cannot put itself below it"
    )


def ours(monitor: Any) -> list[str]:
    """The NBD nodes mirror's roles added to this QEMU (a role that died leaves its own)."""
    return [
        str(n["node-name"]) for n in monitor.execute("query-named-block-nodes", {"flat": True})
        if str(n.get("node-name", "")).startswith(PREFIX)
    ]  # fmt: skip


def _drop(monitor: Any, names: list[str]) -> None:
    for name in names:
        try:
            monitor.execute("blockdev-del", {"node-name": name})
        except GuestError as e:
            log.warning("QEMU kept the block node %s: %s", name, e)


def through(monitor: Any, opts: dict[str, Any], nbd_path: Path) -> None:
    """The format node's file becomes the disk server's NBD export (a socket connected
    here and passed to QEMU: no path QEMU must be allowed to open).  A node left by a
    role that died (its server serves on until its client lets go, then exits) is
    replaced."""
    node = f"{PREFIX}{os.getpid()}"
    stale = [n for n in ours(monitor) if n != node]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(nbd_path))
        monitor.execute("getfd", {"fdname": node}, fd=s.fileno())
    except OSError as e:
        raise GuestError(f"cannot connect to the disk server at {nbd_path}: {e.strerror}") from None
    finally:
        s.close()
    nbd: dict[str, Any] = {
        "driver": "nbd", "node-name": node, "server": {"type": "fd", "str": node},
    }  # fmt: skip
    if "discard" in opts:  # the guest's discards reach the server (TRIM, replicated)
        nbd["discard"] = opts["discard"]
    monitor.execute("blockdev-add", nbd)
    try:
        monitor.execute("blockdev-reopen", {"options": [{**opts, "file": node}]})
    except GuestError:
        _drop(monitor, [node])
        raise
    _drop(monitor, stale)


def restore(monitor: Any, opts: dict[str, Any], path: str) -> None:
    """The format node on libvirt's own file node again; the NBD node goes.  The file
    node first learns the file's size: it still has the size the file had at QEMU's start,
    and QEMU's block layer reads zeros past a node's end (a qcow2 image that grew while on
    the server would lose its new metadata: clusters allocated twice)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise GuestError(f"the disk's file {path}: {e.strerror}") from None
    monitor.execute("block_resize", {"node-name": opts["file"], "size": size})
    monitor.execute("blockdev-reopen", {"options": [opts]})
    _drop(monitor, ours(monitor))
