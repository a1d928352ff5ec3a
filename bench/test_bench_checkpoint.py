"""pytest-benchmark suite: one checkpoint of a running synthetic guest, to the standby's ack,
beside the floor (a plain scan of the same RAM plus a memcpy of the same dirty bytes).

    pytest bench/test_bench_checkpoint.py --bench-ram-mib 256
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.checkpoint import dirty_rate_for
from bench.workloads import Workload
from mirror import pagediff as pd
from mirror.checkpoint import CheckpointEngine
from mirror.config import CheckpointConfig, Config, GuestConfig
from mirror.demo import Host, pair_configs, wait_for
from mirror.guests.synthetic import SHM_DIR, SyntheticGuest
from mirror.link import Endpoint, Link
from mirror.outputs import OutputBuffer

PS = pd.PAGE_SIZE


@pytest.fixture(scope="module", params=[1, 10], ids=lambda p: f"{p}pct")
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[CheckpointEngine, int]]:
    ram_mib = int(request.config.getoption("--bench-ram-mib"))
    npages = (ram_mib << 20) // PS
    base = replace(
        Config(),
        guest=replace(
            GuestConfig(),
            ram_mib=ram_mib,
            dirty_pages_per_s=dirty_rate_for(npages, request.param, 50),
        ),
        checkpoint=replace(CheckpointConfig(), epoch_ms=50),
    )
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        cfg_a, cfg_b = pair_configs(Path(tmp), base, "127.0.0.1:9")
        secondary = Host("hostB", "secondary", cfg_b, Path(tmp))
        guest = link = None
        try:
            wait_for("the secondary", secondary.status, 60, [secondary])
            outputs = OutputBuffer(lambda outs: None)
            guest = SyntheticGuest.boot(
                cfg_a.guest.synthetic(), SHM_DIR / "mirror-bench-ckpt.ram", outputs.add
            )
            link = Link.client(
                Endpoint("127.0.0.1", cfg_a.link.data_port, cfg_a.link.heartbeat_port), "hostA"
            )
            eng = CheckpointEngine(
                guest, link, cfg_a.checkpoint, outputs, pair="mirror", generation=1, node="hostA"
            )
            eng.handshake()
            guest.resume()
            eng.precopy()
            yield eng, request.param
        finally:
            if guest:
                guest.stop()
            if link:
                link.close()
            secondary.stop()


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
    recs = eng.stats.records[-15:]
    benchmark.extra_info.update(
        pause_ms_p50=sorted(r.pause_ms for r in recs)[len(recs) // 2],
        dirty_pages_p50=sorted(r.pages for r in recs)[len(recs) // 2],
    )


def test_floor(benchmark: Any, engine: tuple[CheckpointEngine, int]) -> None:
    """A plain memcmp scan of the same RAM size plus a memcpy of the same dirty bytes."""
    eng, pct = engine
    benchmark.group = group(eng, pct)
    recent = sorted(r.pages for r in eng.stats.records[-15:]) or [1]
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
