"""The checkpoint engine's send buffers: grown and faulted in off the pause."""

from __future__ import annotations

import ctypes
import mmap
import time
import types
from typing import cast

from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.inflight import PS, RESEND_AFTER_S, RESEND_MAX_S, SendBuffers

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(buf: mmap.mmap) -> int:
    """How many pages of ``buf`` are in memory (mincore)."""
    n = len(buf) // PS
    vec = (ctypes.c_ubyte * n)()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(buf)), vec) == 0
    return sum(v & 1 for v in vec)


def test_prepare_gives_the_next_checkpoint_a_faulted_in_buffer_big_enough() -> None:
    bufs = SendBuffers(in_flight=2)
    bufs.prepare(5, 1000)
    prepared = bufs.get(5, 1000)
    assert len(prepared) >= 1000 * PS
    assert resident_pages(prepared) == len(prepared) // PS, "not faulted in"
    assert bufs.get(5, 1100) is prepared, "room to grow: the pause must not reallocate"
    bufs.prepare(5, 900)  # big enough: kept, not replaced
    assert bufs.get(5, 900) is prepared


def test_get_without_prepare_grows_the_slot() -> None:
    bufs = SendBuffers(in_flight=1)
    small = bufs.get(0, 10)
    assert len(small) >= 10 * PS
    assert bufs.get(2, 50) is not small  # the same slot (2 % 2), grown
    assert len(bufs.get(2, 50)) >= 50 * PS


def test_prepare_faults_in_no_more_than_its_cap() -> None:
    bufs = SendBuffers(in_flight=1, prepare_max=64)
    bufs.prepare(1, 10_000)  # a snowballing dirty set: not held N+1 times in memory
    assert len(bufs.get(1, 10)) == 64 * PS
    assert len(bufs.get(1, 10_000)) >= 10_000 * PS  # the pause still gets what it needs


class _Stalled:
    """Just what CheckpointEngine._check_stalled reads, around the real method."""

    def __init__(self) -> None:
        rec = types.SimpleNamespace(sent_at=time.monotonic() - 100)
        self.in_flight = {7: (None, rec)}
        self._resent_at = 0.0
        self._resend_wait = RESEND_AFTER_S
        self.resends: list[float] = []

    def check(self) -> None:
        CheckpointEngine._check_stalled(cast(CheckpointEngine, self))

    def resend(self) -> None:
        self.resends.append(time.monotonic())
        self._resent_at = time.monotonic()


def test_stall_resends_back_off_until_an_ack() -> None:
    eng = _Stalled()
    eng.check()
    assert len(eng.resends) == 1 and eng._resend_wait == 2 * RESEND_AFTER_S
    eng._resent_at -= RESEND_AFTER_S + 0.1  # the first wait has passed, not the doubled one
    eng.check()
    assert len(eng.resends) == 1, "a slow standby was flooded with the same checkpoints"
    for _ in range(10):
        eng._resent_at -= RESEND_MAX_S + 0.1
        eng.check()
    assert len(eng.resends) == 11 and eng._resend_wait == RESEND_MAX_S
