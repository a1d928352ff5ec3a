"""How much of the dirty-page log's scan is the kernel's page-table walk, and does
splitting it over two threads help?

    python -m bench.scanwalk [--ram-mib 8192] [--pages 2000] [--rounds 10]

A shared memfd of ``--ram-mib`` (as a guest's RAM), every page touched, registered for
write-protection in this process with the log's own calls (``dl_uffd_setup``,
``dl_scan``).  Each round writes ``--pages`` random pages, then times, as medians:

- scan: the checkpoint's (PAGEMAP_SCAN returns the written pages, protects them again);
- check: the same walk without protecting (the safety net's);
- clean walk: the scan when nothing was written: the kernel's walk alone;
- two halves: the range split in two, each half scanned by its own thread at once;

beside the baseline, in the same run: the scan of 128 MiB with the same pages written.
About 2 s a GiB here (most of it touching the pages).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median

from mirror._pagediff import ffi, lib

from mirror.replication.dirtylog import PAGE_SIZE, probe

BASELINE_MIB = 128


class Region:
    """``mib`` of shared memory, every page present, its writes logged."""

    def __init__(self, mib: int) -> None:
        self.npages = (mib << 20) // PAGE_SIZE
        fd = os.memfd_create("mirror-bench-scanwalk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.npages * PAGE_SIZE)
            self.mem = mmap.mmap(fd, self.npages * PAGE_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        for off in range(0, self.npages * PAGE_SIZE, PAGE_SIZE):
            self.mem[off] = 1
        self._view = ffi.from_buffer(self.mem)
        self.base = int(ffi.cast("uintptr_t", self._view))
        self.out = ffi.new("uint32_t[]", self.npages)
        self.half = self.npages // 2
        self.out_high = ffi.new("uint32_t[]", self.npages - self.half)  # two halves: the second's
        self.uffd = lib.dl_uffd_create()
        if self.uffd < 0:
            raise OSError(-self.uffd, f"userfaultfd: {os.strerror(-self.uffd)}")
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        rc = lib.dl_uffd_setup(self.uffd, self.base, self.npages * PAGE_SIZE)
        if rc < 0:
            raise OSError(-rc, f"write-protect registration: {os.strerror(-rc)}")
        self.scan(0, self.npages, protect=True)  # the log starts: every page protected

    def scan(self, first: int, count: int, *, protect: bool, out: object = None) -> int:
        n = lib.dl_scan(self.pagemap, self.base + first * PAGE_SIZE, count, int(protect),
                        out if out is not None else self.out, count)  # fmt: skip
        if n < 0:
            raise OSError(-n, f"PAGEMAP_SCAN: {os.strerror(-n)}")
        return int(n)

    def write(self, pages: list[int]) -> None:
        for p in pages:
            self.mem[p * PAGE_SIZE] ^= 0xFF

    def two_halves(self) -> int:
        """The scan split in two, the second half on a thread of its own (its start, about
        0.1 ms, counted: the buffers are allocated beforehand)."""
        got = [0]

        def second() -> None:
            got[0] = self.scan(self.half, self.npages - self.half, protect=True,
                               out=self.out_high)  # fmt: skip

        t = threading.Thread(target=second)  # cffi lets go of the GIL in the call
        t.start()
        n = self.scan(0, self.half, protect=True)
        t.join()
        return n + got[0]

    def close(self) -> None:
        os.close(self.uffd)
        os.close(self.pagemap)
        del self._view
        self.mem.close()


@dataclass(frozen=True)
class WalkResult:
    ram_mib: int
    pages: int
    scan_ms: float
    check_ms: float
    clean_ms: float
    halves_ms: float
    baseline_ms: float  # the scan of BASELINE_MIB, the same pages written

    def lines(self) -> list[str]:
        walked = (self.ram_mib << 20) // PAGE_SIZE
        return [
            f"dirty-page log scan: {self.ram_mib} MiB shared memfd, {self.pages} pages "
            f"written a round (p50 ms)",
            f"  scan (returns and protects)   {self.scan_ms:8.2f}",
            f"  check (no protecting)         {self.check_ms:8.2f}",
            f"  clean walk (nothing written)  {self.clean_ms:8.2f}   "
            f"{self.clean_ms * 1e6 / walked:.1f} ns a page walked",
            f"  two halves, two threads       {self.halves_ms:8.2f}   "
            f"{self.halves_ms / self.scan_ms:.2f}x the scan",
            f"  baseline: scan of {BASELINE_MIB} MiB      {self.baseline_ms:8.2f}   "
            f"{self.ram_mib} MiB / {BASELINE_MIB} MiB: {self.scan_ms / self.baseline_ms:.1f}x",
        ]


def timed(region: Region, pages: int, rounds: int, rng: random.Random,
          scan: Callable[[], int], write: bool = True) -> float:  # fmt: skip
    took = []
    for _ in range(rounds):
        chosen = rng.sample(range(region.npages), pages) if write else []
        region.write(chosen)
        t0 = time.perf_counter()
        n = scan()
        took.append(time.perf_counter() - t0)
        if n != len(chosen):
            raise RuntimeError(f"the scan found {n} written pages, {len(chosen)} were written")
        region.scan(0, region.npages, protect=True)  # (after a check: protected again)
    return median(took) * 1e3


def measure(ram_mib: int, pages: int, rounds: int, seed: int = 1) -> WalkResult:
    rng = random.Random(seed)
    base = Region(BASELINE_MIB)
    try:
        baseline = timed(base, pages, rounds, rng,
                         lambda: base.scan(0, base.npages, protect=True))  # fmt: skip
    finally:
        base.close()
    r = Region(ram_mib)
    try:
        everything = r.npages
        return WalkResult(
            ram_mib, pages,
            scan_ms=timed(r, pages, rounds, rng, lambda: r.scan(0, everything, protect=True)),
            check_ms=timed(r, pages, rounds, rng, lambda: r.scan(0, everything, protect=False)),
            clean_ms=timed(r, pages, rounds, rng, lambda: r.scan(0, everything, protect=True),
                           write=False),
            halves_ms=timed(r, pages, rounds, rng, r.two_halves),
            baseline_ms=baseline,
        )  # fmt: skip
    finally:
        r.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.scanwalk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--ram-mib", type=int, default=8192, help="the region (default 8192)")
    ap.add_argument("--pages", type=int, default=2000, help="pages written a round (2000)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds a way (default 10)")
    args = ap.parse_args(argv)
    if args.ram_mib < BASELINE_MIB or args.rounds < 1:
        ap.error(f"--ram-mib >= {BASELINE_MIB}, --rounds >= 1")
    if not 0 < args.pages <= (BASELINE_MIB << 20) // PAGE_SIZE:
        ap.error(f"--pages from 1 to {(BASELINE_MIB << 20) // PAGE_SIZE}")
    why = probe()
    if why:
        print(f"bench.scanwalk: the dirty-page log does not run here: {why}", file=sys.stderr)
        return 2
    print("\n".join(measure(args.ram_mib, args.pages, args.rounds).lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
