"""`mirror image build`: the demo guest, a Debian kernel plus a busybox initramfs.

Nothing is installed on the host: Debian's kernel package is fetched with
``apt-get download`` and unpacked into a cache folder; the initramfs holds
busybox (from the host's busybox-static), the virtio NIC modules of that
kernel, an /init that brings the NIC up with a static address, and guestd
(mirror/guests/guestd.c, compiled static here), the TCP service whose
answers come from guest memory.

The guest's settings come from its kernel command line, so one image serves
any address: ``mirror.ip=10.0.0.10/24 mirror.port=7000 mirror.interval=100``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

DEFAULT_DIR = Path(
    os.environ.get("MIRROR_IMAGE_DIR")
    or ("/var/cache/mirror/guest" if os.geteuid() == 0 else "~/.cache/mirror/guest")
).expanduser()
BUSYBOX = Path("/bin/busybox")
GUESTD_SRC = Path(__file__).with_name("guestd.c")
# the NIC and disk drivers and what they need, in load order
MODULES = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
IP=10.0.0.10/24 PORT=7000 INTERVAL=100
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    mirror.ip=*) IP=${arg#mirror.ip=} ;;
    mirror.port=*) PORT=${arg#mirror.port=} ;;
    mirror.interval=*) INTERVAL=${arg#mirror.interval=} ;;
    mirror.diskload=*) DISKLOAD=${arg#mirror.diskload=} ;;
    mirror.poweroff=*) POWEROFF=${arg#mirror.poweroff=} ;;
  esac
done
# tests: the guest powers itself off after that many seconds (a shutdown from inside)
[ -n "$POWEROFF" ] && (sleep "$POWEROFF"; sync; poweroff -f) &
for m in %(modules)s; do insmod /lib/modules/$m.ko || echo "mirror-guest: insmod $m failed"; done
ip link set lo up
ip addr add "$IP" dev eth0 && ip link set eth0 up
echo "mirror-guest: eth0 $IP, guestd on port $PORT"
/bin/guestd "$PORT" "$INTERVAL" /dev/vda &
# tests: the guest writes its disk on its own (4 KiB blocks, each synced)
case "$DISKLOAD" in
  seq) (i=0; while true; do dd if=/dev/urandom of=/dev/vda bs=4096 count=16 seek=$((i %% 2048)) \
        conv=notrunc,fsync 2>/dev/null; i=$((i + 16)); done) & ;;
  rand) (while true; do dd if=/dev/urandom of=/dev/vda bs=4096 count=1 \
        seek=$((RANDOM %% 2048)) conv=notrunc,fsync 2>/dev/null; done) & ;;
esac
while true; do sleep 3600; done
"""


class ImageError(RuntimeError):
    """The guest image could not be built; the message says what to do."""


# The kernel QEMU boots: the uncompressed ELF inside Debian's bzImage, by its PVH entry
# point (QEMU's pvh.bin).  It skips the bzImage's decompression, which under TCG took
# about 3 s of a 6 s boot and, under checkpoints, dirtied some 65 MB of guest RAM.
PVH_KERNEL = "vmlinux"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note that makes an ELF kernel bootable by PVH


def kernel(img: Path) -> Path:
    """The kernel to boot in the image folder ``img``: the PVH ``vmlinux`` where the
    build could unpack one, else the ``vmlinuz`` as Debian ships it."""
    pvh = img / PVH_KERNEL
    return pvh if pvh.exists() else img / "vmlinuz"


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if it is compressed with xz or gzip
    and has a PVH entry point; None otherwise (then the bzImage is booted as it is)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return elf if _has_pvh_note(elf) else None


def _has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has Xen's PHYS32_ENTRY note (PT_NOTE segments)."""
    if len(elf) < 64 or elf[:5] != b"\x7fELF\x02" or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            return False
        p_type, = struct.unpack_from("<I", elf, at)
        if p_type != 4:  # PT_NOTE
            continue
        off, = struct.unpack_from("<Q", elf, at + 8)
        size, = struct.unpack_from("<Q", elf, at + 32)
        pos, end = off, min(off + size, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise ImageError(f"{what}: `{cmd[0]}` not found") from None
    if r.returncode != 0:
        raise ImageError(f"{what}: `{' '.join(cmd)}` failed: {r.stderr.strip()[-800:]}")
    return r.stdout


def kernel_package() -> str:
    """The versioned package Debian's linux-image-amd64 points at."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], "finding Debian's kernel")
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m and os.geteuid() == 0:  # a fresh machine's package lists may be empty
        _run(["apt-get", "update", "-qq"], "apt-get update")
        out = _run(["apt-cache", "depends", "linux-image-amd64"], "finding Debian's kernel")
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise ImageError(
            "apt-cache knows no linux-image-amd64: run `apt-get update` first (the package "
            "lists are needed to download the guest kernel)"
        )
    return m.group(1)


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have mode 0o40755,
    symlinks 0o120777 with the target as data."""
    out = io.BytesIO()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        nb = name.encode() + b"\0"
        head = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.write(head.encode() + nb)
        out.write(b"\0" * (-(110 + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, 1):
        put(name, mode, data, ino)
    put("TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe() -> str:
    """A digest of what goes into the image besides the kernel: a changed guestd or
    /init makes :func:`ensure` build again."""
    h = hashlib.sha256(GUESTD_SRC.read_bytes())
    h.update(INIT.encode())
    h.update(" ".join(MODULES).encode())
    h.update(b"kernel: the PVH vmlinux where one unpacks")
    return h.hexdigest()


def build(out: Path = DEFAULT_DIR, *, say: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the guest image in ``out``; returns ``out``.  The kernel
    package download is kept in ``out`` and reused."""
    if not BUSYBOX.exists():
        raise ImageError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    out.mkdir(parents=True, exist_ok=True)
    pkg = kernel_package()
    debs = sorted(out.glob(f"{pkg}_*.deb"))
    if not debs:
        say(f"image: downloading {pkg} (about 70 MB)")
        _run(["apt-get", "download", pkg], f"downloading {pkg}", cwd=out)
        debs = sorted(out.glob(f"{pkg}_*.deb"))
        if not debs:
            raise ImageError(f"apt-get download {pkg} left no .deb in {out}")
    with tempfile.TemporaryDirectory(prefix="mirror-image-") as tmp:
        root = Path(tmp) / "x"
        say(f"image: unpacking {debs[-1].name}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], "unpacking the kernel package")
        vmlinuz = next(iter(sorted((root / "boot").glob("vmlinuz-*"))), None)
        mods = next(iter(sorted((root / "lib" / "modules").glob("*"))), None)
        if vmlinuz is None or mods is None:
            raise ImageError(f"{debs[-1].name} holds no vmlinuz or modules")
        say("image: compiling guestd (static)")
        guestd = Path(tmp) / "guestd"
        _run(
            ["gcc", "-static", "-O2", "-Wall", "-o", str(guestd), str(GUESTD_SRC)],
            "compiling guestd (needs gcc and libc6-dev)",
        )
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")
        ]
        entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
        entries.append(("bin/sh", 0o120777, b"busybox"))
        entries.append(("bin/guestd", 0o100755, guestd.read_bytes()))
        names = []
        for rel in MODULES:
            ko = mods / "kernel" / rel
            if not ko.exists():
                raise ImageError(f"the kernel package has no module {rel}")
            names.append(ko.stem)
            entries.append((f"lib/modules/{ko.name}", 0o100644, ko.read_bytes()))
        init = INIT % {"modules": " ".join(names)}
        entries.append(("init", 0o100755, init.encode()))
        initrd = gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)
        (out / "initramfs.cpio.gz").write_bytes(initrd)
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        say("image: unpacking the kernel for a PVH boot")
        elf = pvh_kernel(vmlinuz.read_bytes())
        (out / PVH_KERNEL).unlink(missing_ok=True)
        if elf is None:
            say("image: the kernel has no PVH entry (or is not xz/gzip): vmlinuz is booted")
        else:
            tmp_elf = out / f".{PVH_KERNEL}.tmp"
            tmp_elf.write_bytes(elf)
            tmp_elf.rename(out / PVH_KERNEL)
    manifest = {
        "kernel_package": debs[-1].name,
        "kernel": kernel(out).name,
        "vmlinuz_sha256": _sha256(out / "vmlinuz"),
        "initramfs_sha256": _sha256(out / "initramfs.cpio.gz"),
        "append": "console=ttyS0 quiet mirror.ip=10.0.0.10/24 mirror.port=7000",
        "recipe": recipe(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"image: {kernel(out)} and {out}/initramfs.cpio.gz ({len(initrd) >> 10} KiB)")
    return out


def ensure(out: Path = DEFAULT_DIR, *, say: Callable[[str], None] = print) -> Path:
    """The image in ``out``, built first if it is not there."""
    try:
        built = json.loads((out / "manifest.json").read_text()).get("recipe")
    except (OSError, ValueError):
        built = None
    if built == recipe() and (out / "vmlinuz").exists() and (out / "initramfs.cpio.gz").exists():
        return out
    return build(out, say=say)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
