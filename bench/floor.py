"""The floor of a checkpoint pause: one definition for every bench (docs/benchmarks.md).

    floor = the guest's bare checkpoint + one memcpy of the dirty bytes

- the bare checkpoint: the guest stopped, its device state saved and the guest resumed
  through its own interface (``pause``, ``save_state``, ``resume``) with nothing
  between, timed in the same run on the same guest, the median of a few (QEMU: ``stop``
  and the device-state save, ``cont``: what QEMU itself takes, and the QMP round trips);
- the memcpy: a plain copy of as many pages as the checkpoint found dirty.

Any checkpoint must stop the guest, save what is not RAM, let it run again and take the
dirty bytes out at least once: that is the floor.  What a pause spends beyond it
(finding the dirty pages, gathering them, what is not overlapped, the engine's own
bookkeeping) is mirror's to shrink.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

from mirror.guests.base import Guest
from mirror.replication import pagediff as pd


@dataclass(frozen=True)
class Floor:
    bare_ms: float  # the guest's bare checkpoint (stop, device state, resume), median
    copy_ms: float  # a memcpy of the dirty bytes, median
    pages: int

    @property
    def ms(self) -> float:
        return round(self.bare_ms + self.copy_ms, 3)

    def describe(self) -> str:
        return (
            f"floor {self.ms:.2f} ms = bare checkpoint (stop, state, resume) {self.bare_ms:.2f} "
            f"+ memcpy of {self.pages} pages {self.copy_ms:.2f}"
        )


def copier(pages: int) -> Callable[[], object]:
    """One plain memcpy of ``pages`` pages (buffers allocated and touched here)."""
    src, dst = pd.alloc_pages(max(1, pages)), pd.alloc_pages(max(1, pages))
    src[:] = os.urandom(64) * (len(src) // 64)
    dst[:] = src
    src_p = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst_p = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    n = pages * pd.PAGE_SIZE
    return lambda: (src, dst, ctypes.memmove(dst_p, src_p, n))  # the buffers stay alive


def bare_checkpoint(guest: Guest) -> Callable[[], object]:
    """Stop the running guest, save its device state, resume it: nothing between."""
    return lambda: (guest.pause(), guest.save_state(), guest.resume())


def measure(bare: Callable[[], object], pages: int, repeat: int = 9, run_s: float = 0.02) -> Floor:
    """The floor for a checkpoint of ``pages`` dirty pages: ``bare`` (the guest's bare
    checkpoint: :func:`bare_checkpoint`) timed ``repeat`` times, the guest running
    ``run_s`` between, and a memcpy of the pages."""
    copy = copier(pages)
    bares: list[float] = []
    copies: list[float] = []
    for _ in range(repeat):
        time.sleep(run_s)
        t0 = time.perf_counter()
        bare()
        t1 = time.perf_counter()
        copy()
        copies.append(time.perf_counter() - t1)
        bares.append(t1 - t0)
    return Floor(round(median(bares) * 1000, 3), round(median(copies) * 1000, 3), pages)
