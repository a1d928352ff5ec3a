"""Guest-RAM workloads shared by the report and the pytest-benchmark suites.

A workload is RAM filled with realistic content (random data with a share of
zero pages), a shadow copy and a hash table already in step with it, and a
way to dirty a given share of the pages the way a running guest would.
Every measured case is a function of no arguments, so the report can time
the engine and its ceilings round-robin in one run on a noisy machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import median

import numpy as np

from mirror.replication import pagediff as pd

PS = pd.PAGE_SIZE
ZERO_PAGE_SHARE = 0.2  # guests hold a good share of zero pages


@dataclass
class Workload:
    ram_mib: int
    seed: int = 1
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.npages = self.ram_mib * 1024 * 1024 // PS
        self.rng = np.random.default_rng(self.seed)
        self.ram = pd.alloc_pages(self.npages)
        self.shadow = pd.alloc_pages(self.npages)
        ram = np.frombuffer(self.ram, dtype=np.uint8)
        ram[:] = self.rng.integers(0, 256, size=ram.size, dtype=np.uint8)
        zero = self.rng.random(self.npages) < ZERO_PAGE_SHARE
        ram.reshape(self.npages, PS)[zero] = 0
        np.frombuffer(self.shadow, dtype=np.uint8)[:] = ram
        self.table = bytearray(pd.hash_table_size(len(self.ram)))
        pd.scan_hashed(self.ram, self.table)
        self._words = np.frombuffer(self.ram, dtype=np.uint64)

    def dirty(self, pct: float) -> np.ndarray:
        """Change one 8-byte word in pct% of the pages; returns their indices."""
        count = round(self.npages * pct / 100)
        pages = np.sort(self.rng.choice(self.npages, size=count, replace=False))
        words = pages * (PS // 8) + self.rng.integers(0, PS // 8, size=count)
        self._words[words] += np.uint64(1)
        return pages

    def numpy_scan(self) -> np.ndarray:
        """What a Python user would write: compare in chunks, then copy dirty pages."""
        ram = np.frombuffer(self.ram, dtype=np.uint8).reshape(self.npages, PS)
        shadow = np.frombuffer(self.shadow, dtype=np.uint8).reshape(self.npages, PS)
        chunk = 16384  # 64 MiB at a time keeps the temporary small
        found = []
        for start in range(0, self.npages, chunk):
            part = (
                np.flatnonzero(
                    (ram[start : start + chunk] != shadow[start : start + chunk]).any(axis=1)
                )
                + start
            )
            shadow[part] = ram[part]
            found.append(part)
        return np.concatenate(found)


def realistic_page_changes(old: np.ndarray, rng: np.random.Generator) -> None:
    """Rewrite pages the way guests do: mostly a few fields, some buffers, some whole pages.

    60% of pages get 1 to 4 writes of 8 to 64 bytes (counters, pointers,
    struct fields), 25% a run of 256 to 1024 bytes (a buffer filled), 15%
    are rewritten whole (these fall back to raw).
    """
    for page in old:
        kind = rng.random()
        if kind < 0.60:
            for _ in range(rng.integers(1, 5)):
                n = int(rng.integers(8, 65))
                at = int(rng.integers(0, PS - n))
                page[at : at + n] = rng.integers(0, 256, size=n, dtype=np.uint8)
        elif kind < 0.85:
            n = int(rng.integers(256, 1025))
            at = int(rng.integers(0, PS - n))
            page[at : at + n] = rng.integers(0, 256, size=n, dtype=np.uint8)
        else:
            page[:] = rng.integers(0, 256, size=PS, dtype=np.uint8)


@dataclass
class DeltaWorkload:
    """Pages of old content, their realistic new content, and a scratch shadow."""

    npages: int
    seed: int = 2

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.ram = pd.alloc_pages(self.npages)
        self.shadow = pd.alloc_pages(self.npages)
        self.old = pd.alloc_pages(self.npages)
        old = np.frombuffer(self.old, dtype=np.uint8).reshape(self.npages, PS)
        old[:] = rng.integers(0, 256, size=old.shape, dtype=np.uint8)
        new = np.frombuffer(self.ram, dtype=np.uint8).reshape(self.npages, PS)
        new[:] = old
        realistic_page_changes(new, rng)
        self.index = list(range(self.npages))
        self.out = bytearray(self.npages * PS)

    def reset(self) -> None:
        self.shadow[:] = self.old

    def encode(self) -> pd.EncodedPages:
        return pd.encode_pages(self.ram, self.shadow, self.index, out=self.out)


def time_round_robin(
    cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
    repeat: int,
) -> dict[str, float]:
    """Median seconds of each case, timed in turn so that noise hits all alike.

    Each case is (timed function, untimed set-up run before every timing).
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, (fn, setup) in cases.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: median(s) for name, s in samples.items()}
