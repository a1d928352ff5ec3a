"""The NIC gate's two tc programs (mirror/replication/nicgate.py), assembled here and
loaded with the bpf() syscall: no compiler, no ELF, no libbpf.

- :func:`hold_program` (the guest's tap's ingress, direct action): a frame carrying
  :data:`RELEASE_MARK` goes on into the bridge with its mark cleared; any other frame
  is redirected to the egress of mirror's tap (dropped if that tap is gone).
- :func:`release_program` (mirror's tap's ingress, classifier): marks the frame and
  matches, so the filter's ``mirred ingress redirect`` hands it to the guest's tap.

tc attaches a program by a pinned path (``bpf object-pinned``): :func:`pin_dir`
gives a bpf filesystem for as long as that takes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Released frames carry this skb mark from mirror's tap to the guest's tap's ingress,
# where it is cleared: it never reaches the bridge or the host's stack.
RELEASE_MARK = 0x6E676174  # "ngat"


class BpfError(RuntimeError):
    """The kernel refused a program, or there is no bpf filesystem to pin it in."""


_SYS_BPF = {"x86_64": 321, "aarch64": 280}  # the bpf() syscall's number
_BPF_PROG_LOAD, _BPF_OBJ_PIN = 5, 6
_PROG_SCHED_CLS = 3
_SKB_MARK = 8  # offsetof(struct __sk_buff, mark)
_FN_REDIRECT = 23  # bpf_redirect(ifindex, flags)
BPF_FS = Path("/sys/fs/bpf")


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xB7, dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def hold_program(gate_ifindex: int) -> bytes:
    """vnetN ingress, direct action: a released frame (its mark) goes on, mark cleared;
    every other frame goes to mirror's tap (TC_ACT_REDIRECT, or dropped if it is gone)."""
    return b"".join([
        _insn(0x61, 2, 1, _SKB_MARK),          # r2 = skb->mark
        _insn(0x55, 2, 0, 4, RELEASE_MARK),    # if r2 != MARK goto +4
        _mov_imm(3, 0),
        _insn(0x63, 1, 3, _SKB_MARK),          # skb->mark = 0
        _mov_imm(0, 0),                        # TC_ACT_OK: on into the bridge
        _insn(0x95),                           # exit
        _mov_imm(1, gate_ifindex),
        _mov_imm(2, 0),                        # egress of mirror's tap
        _insn(0x85, imm=_FN_REDIRECT),         # r0 = bpf_redirect(gate, 0)
        _insn(0x95),
    ])  # fmt: skip


def release_program() -> bytes:
    """mgateI ingress, classifier mode: mark the frame, match (the mirred action runs)."""
    return b"".join([
        _mov_imm(2, RELEASE_MARK),
        _insn(0x63, 1, 2, _SKB_MARK),          # skb->mark = MARK
        _mov_imm(0, -1),                       # match, default class
        _insn(0x95),
    ])  # fmt: skip


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(f"mirror knows no bpf() syscall number for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def load_program(name: str, insns: bytes) -> int:
    """BPF_PROG_LOAD a SCHED_CLS program; its fd.  The verifier's log goes in the error."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "<IIQQIIQII16s", attr, 0, _PROG_SCHED_CLS, len(insns) // 8,
        ctypes.addressof(code), ctypes.addressof(lic), 1, len(log), ctypes.addressof(log),
        0, 0, name.encode()[:15],
    )  # fmt: skip
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        detail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise BpfError(
            f"the kernel refused mirror's tc program {name}: {e.strerror}"
            + (f" ({' / '.join(detail)})" if detail else "")
            + " (needs root and a kernel with eBPF and cls_bpf)"
        ) from e


def pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(str(path).encode())
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, ctypes.addressof(p), fd)
    _bpf(_BPF_OBJ_PIN, attr)


@contextlib.contextmanager
def pin_dir() -> Iterator[Path]:
    """A bpf filesystem to pin programs in for as long as tc needs them: /sys/fs/bpf
    where it is one (systemd mounts it), else a private mount, unmounted after."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1:3] == [str(BPF_FS), "bpf"] for line in f):
            yield BPF_FS
            return
    d = Path(tempfile.mkdtemp(prefix="mirror-bpf-"))
    try:
        _mount("mount", "-t", "bpf", "bpf", str(d))
        try:
            yield d
        finally:
            _mount("umount", str(d))
    finally:
        d.rmdir()


def _mount(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise BpfError(f"{' '.join(cmd)}: {r.stderr.strip()} (a bpf filesystem to pin in)")
