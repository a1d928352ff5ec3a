"""The QEMU backend's parts that need no running QEMU: the NIC relay's framing, the
initramfs archive, the configuration, the version check, the example configs."""

from __future__ import annotations

import gzip
import lzma
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirror.config import ConfigError, from_dict, load
from mirror.guests import image
from mirror.guests.base import GuestError, GuestOutput
from mirror.guests.qemu import NetRelay, fingerprint, qemu_version
from mirror.lab import qemudemo

EXAMPLES = Path(__file__).parents[2] / "examples" / "host_kill_failover"


class _Running:
    returncode = None

    def poll(self) -> None:
        return None


def _framed(frame: bytes) -> bytes:
    return len(frame).to_bytes(4, "big") + frame


def test_relay_hands_over_whole_frames_in_order_and_drain_takes_what_is_waiting(
    tmp_path: Path,
) -> None:
    relay = NetRelay(tmp_path / "net.sock", "", "")
    got: list[GuestOutput] = []
    lock = threading.Lock()

    def on_output(out: GuestOutput) -> None:
        with lock:
            got.append(out)

    relay.on_output = on_output
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu.connect(str(tmp_path / "net.sock"))
    relay.accept(_Running(), timeout=5)  # type: ignore[arg-type]
    try:
        frames = [bytes([i]) * (60 + i * 7) for i in range(50)]
        stream = b"".join(_framed(f) for f in frames)
        for i in range(0, len(stream), 37):  # frames split across reads
            qemu.sendall(stream[i : i + 37])
        relay.drain()
        deadline = time.monotonic() + 5
        while len(got) < len(frames) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [o.payload for o in got] == frames
        assert [o.seq for o in got] == list(range(1, 51))
        # the other way: a frame for the guest arrives framed
        relay.to_guest(b"\x01\x02\x03")
        qemu.settimeout(5)
        assert qemu.recv(100) == _framed(b"\x01\x02\x03")
    finally:
        qemu.close()
        relay.close()
    assert not (tmp_path / "net.sock").exists()


def test_initramfs_archive_lists_in_busybox_cpio(tmp_path: Path) -> None:
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed (scripts/setup installs it)")
    data = image.cpio_newc(
        [("bin", 0o40755, b""), ("bin/sh", 0o120777, b"busybox"), ("init", 0o100755, b"#!x\n")]
    )
    (tmp_path / "a.cpio").write_bytes(data)
    listing = subprocess.run(
        ["/bin/busybox", "cpio", "-t", "-F", str(tmp_path / "a.cpio")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listing == ["bin", "bin/sh", "init"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["/bin/busybox", "cpio", "-i", "-F", str(tmp_path / "a.cpio")],
                   cwd=out, check=True, capture_output=True)  # fmt: skip
    assert (out / "init").read_bytes() == b"#!x\n"
    assert (out / "bin" / "sh").is_symlink() and str((out / "bin" / "sh").readlink()) == "busybox"


def _elf(note_type: int) -> bytes:
    """A 64-bit ELF with one PT_NOTE segment holding one note named "Xen"."""
    note = struct.pack("<III", 4, 8, note_type) + b"Xen\0" + (0x1000000).to_bytes(8, "little")
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return header + phdr + note + b"\0" * 64


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    """A bzImage's layout: the setup header, then the protected-mode code whose
    ``payload_offset`` bytes in is the compressed kernel."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, 100, len(payload))
    return bytes(setup) + b"\x90" * 100 + payload + struct.pack("<I", 1234)


@pytest.mark.parametrize("compress", [
    lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    lambda b: gzip.compress(b, mtime=0),
], ids=["xz", "gzip"])  # fmt: skip
def test_the_pvh_kernel_is_unpacked_from_a_bzimage_only_when_it_has_the_entry(
    compress: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    pvh = _elf(image.XEN_ELFNOTE_PHYS32_ENTRY)
    assert image.pvh_kernel(_bzimage(compress(pvh))) == pvh
    assert image.pvh_kernel(_bzimage(compress(pvh), setup_sects=31)) == pvh
    # no PVH entry (another Xen note), an unknown compression, a truncated or no bzImage
    assert image.pvh_kernel(_bzimage(compress(_elf(17)))) is None
    assert image.pvh_kernel(_bzimage(b"\x02\x21\x4c\x18" + pvh)) is None
    assert image.pvh_kernel(_bzimage(compress(pvh)[:40])) is None
    assert image.pvh_kernel(pvh) is None
    # the image folder boots vmlinux where the build unpacked one, else vmlinuz
    (tmp_path / "vmlinuz").write_bytes(b"bz")
    assert image.kernel(tmp_path) == tmp_path / "vmlinuz"
    (tmp_path / "vmlinux").write_bytes(pvh)
    assert image.kernel(tmp_path) == tmp_path / "vmlinux"


def test_qemu_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"\[qemu\]\.tap: length must be within 0..15"):
        from_dict({"qemu": {"tap": "a-very-long-tap-name"}})
    with pytest.raises(ConfigError, match=r"\[qemu\]\.accel: must be one of tcg, kvm"):
        from_dict({"qemu": {"accel": "hvf"}})
    with pytest.raises(ConfigError, match=r"\[guest\]\.kind: must be one of synthetic, qemu"):
        from_dict({"guest": {"kind": "xen"}})


def test_missing_qemu_binary_is_named() -> None:
    with pytest.raises(GuestError, match="QEMU not found: `/nope/qemu` is not on PATH"):
        qemu_version("/nope/qemu")


def test_fingerprint_names_version_and_machine() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/setup installs it)")
    cfg = from_dict({}).qemu
    a = fingerprint(cfg, 128)
    assert a.startswith(f"qemu {qemu_version(cfg.binary)} machine=q35 accel=tcg")
    assert fingerprint(cfg, 256) != a
    b = fingerprint(from_dict({"qemu": {"machine": "pc"}}).qemu, 128)
    assert b != a and "machine=pc" in b


def test_example_configs_are_what_the_demo_runs(tmp_path: Path) -> None:
    a, b = (load(EXAMPLES / f"host{x}.toml") for x in "AB")
    img = Path("/var/cache/mirror/guest")
    da, db = qemudemo.configs(tmp_path, qemudemo.default_base(), img, "demo-qemu")
    for mine, demo in ((a, da), (b, db)):
        assert mine.guest.kind == demo.guest.kind == "qemu"
        assert mine.guest.ram_mib == demo.guest.ram_mib
        assert (mine.link.host, mine.link.peer_host) == (demo.link.host, demo.link.peer_host)
        assert (mine.qemu.tap, mine.qemu.bridge, mine.qemu.mac, mine.qemu.append) == (
            demo.qemu.tap, demo.qemu.bridge, demo.qemu.mac, demo.qemu.append)  # fmt: skip
        assert mine.checkpoint.scan == demo.checkpoint.scan
        assert mine.node.name == demo.node.name
