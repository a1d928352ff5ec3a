"""The NIC gate's tc programs as assembled (mirror/replication/tcprog.py): decoded back
and walked, without a kernel.  tests/nicgate loads and runs them (root)."""

from __future__ import annotations

import struct

from mirror.replication import tcprog


def decode(prog: bytes) -> list[tuple[int, int, int, int, int]]:
    assert len(prog) % 8 == 0
    out = []
    for i in range(0, len(prog), 8):
        code, regs, off, imm = struct.unpack("<BBhi", prog[i : i + 8])
        out.append((code, regs & 0xF, regs >> 4, off, imm))
    return out


def run(prog: bytes, mark: int) -> tuple[int, dict[str, int]]:
    """A tiny interpreter of the instructions used: returns (r0 or 'redirect' code, the
    skb fields written, and the redirect's ifindex) for a frame with ``mark``."""
    insns, pc, regs = decode(prog), 0, {1: -1}
    skb = {"mark": mark}
    calls: dict[str, int] = {}
    for _ in range(100):
        code, dst, src, off, imm = insns[pc]
        pc += 1
        if code == 0xB7:
            regs[dst] = imm
        elif code == 0x61:
            assert src == 1 and off == 8
            regs[dst] = skb["mark"]
        elif code == 0x63:
            assert dst == 1 and off == 8
            skb["mark"] = regs[src] & 0xFFFFFFFF
        elif code == 0x55:
            if regs[dst] != imm:
                pc += off
        elif code == 0x85:
            assert imm == 23  # bpf_redirect
            calls["redirect_to"], calls["flags"] = regs[1], regs[2]
            regs[0] = 7  # TC_ACT_REDIRECT
        elif code == 0x95:
            return regs[0], {**skb, **calls}
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("no exit")


def test_hold_redirects_the_guest_s_frames_to_mirror_s_tap() -> None:
    r0, out = run(tcprog.hold_program(42), mark=0)
    assert r0 == 7 and out["redirect_to"] == 42 and out["flags"] == 0  # egress
    r0, out = run(tcprog.hold_program(42), mark=0x1234)
    assert r0 == 7 and out["redirect_to"] == 42


def test_hold_lets_a_released_frame_through_with_its_mark_cleared() -> None:
    r0, out = run(tcprog.hold_program(42), mark=tcprog.RELEASE_MARK)
    assert r0 == 0 and out["mark"] == 0 and "redirect_to" not in out  # TC_ACT_OK


def test_release_marks_and_matches() -> None:
    r0, out = run(tcprog.release_program(), mark=0)
    assert r0 == -1 and out["mark"] == tcprog.RELEASE_MARK  # -1: match, default class
