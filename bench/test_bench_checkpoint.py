"""pytest-benchmark suite: one checkpoint of a running synthetic guest, to the standby's ack,
beside the floor (bench/floor.py: the guest's bare checkpoint plus a memcpy of the same
dirty bytes).

    pytest bench/test_bench_checkpoint.py --bench-ram-mib 256
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench import floor
from bench.checkpoint import case_config, running_engine
from mirror.replication.checkpoint import CheckpointEngine


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
    """The guest's bare checkpoint (stop, device state, resume) plus a memcpy of the same
    dirty bytes: bench/floor.py, the floor of every bench."""
    eng, pct = engine
    benchmark.group = group(eng, pct)
    recent = sorted(r.pages for r in list(eng.stats.records)[-15:]) or [1]
    bare, copy = floor.bare_checkpoint(eng.guest), floor.copier(recent[len(recent) // 2])
    benchmark.pedantic(
        lambda: (bare(), copy()), setup=lambda: time.sleep(0.02), rounds=15, iterations=1
    )
