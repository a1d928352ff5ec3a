"""pytest-benchmark suite: one checkpoint of a running synthetic guest, to the standby's ack,
beside the floor (a plain scan of the same RAM plus a memcpy of the same dirty bytes).

    pytest bench/test_bench_checkpoint.py --bench-ram-mib 256
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.checkpoint import case_config, running_engine
from bench.workloads import Workload
from mirror.replication import pagediff as pd
from mirror.replication.checkpoint import CheckpointEngine

PS = pd.PAGE_SIZE


@pytest.fixture(scope="module", params=[1, 10], ids=lambda p: f"{p}pct")
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[CheckpointEngine, int]]:
    base = case_config(int(request.config.getoption("--bench-ram-mib")), request.param)
    with running_engine(base, "mirror-bench-ckpt.ram") as eng:
        yield eng, request.param


def group(engine: CheckpointEngine, pct: int) -> str:
    return f"checkpoint {len(engine.guest.ram) >> 20} MiB, {pct}% dirty"


def test_checkpoint_to_ack(benchmark: Any, engine: tuple[CheckpointEngine, int]) -> None:
    """Pause, scan, state, resume, then gather, send and wait for the standby's ack."""
    eng, pct = engine
    benchmark.group = group(eng, pct)

    def one() -> None:
        eng.checkpoint()
        while eng.in_flight:
            eng.pump(time.monotonic() + 0.01)

    # an epoch of guest time between rounds, so that each checkpoint has its dirty pages
    benchmark.pedantic(one, setup=lambda: time.sleep(0.05), rounds=15, iterations=1)
    recs = list(eng.stats.records)[-15:]
    benchmark.extra_info.update(
        pause_ms_p50=sorted(r.pause_ms for r in recs)[len(recs) // 2],
        dirty_pages_p50=sorted(r.pages for r in recs)[len(recs) // 2],
    )


def test_floor(benchmark: Any, engine: tuple[CheckpointEngine, int]) -> None:
    """A plain memcmp scan of the same RAM size plus a memcpy of the same dirty bytes."""
    eng, pct = engine
    benchmark.group = group(eng, pct)
    recent = sorted(r.pages for r in list(eng.stats.records)[-15:]) or [1]
    dirty = max(1, recent[len(recent) // 2])
    wl = Workload(len(eng.guest.ram) >> 20)
    wl.shadow[:] = wl.ram
    src, dst = pd.alloc_pages(dirty), pd.alloc_pages(dirty)
    src_p = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst_p = ctypes.addressof(ctypes.c_char.from_buffer(dst))

    def floor() -> None:
        pd.memcmp_ceiling(wl.ram, wl.shadow)
        ctypes.memmove(dst_p, src_p, dirty * PS)

    benchmark.pedantic(floor, rounds=15, iterations=1)
