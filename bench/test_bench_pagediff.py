"""pytest-benchmark suite of the page-diff engine beside its ceilings.

Each group holds the engine and the baselines for one share of dirty pages,
so pytest-benchmark's table shows them side by side:
    pytest bench/test_bench_pagediff.py --bench-ram-mib 256
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench.workloads import DeltaWorkload, Workload
from mirror.replication import pagediff as pd

ROUNDS = 7


@pytest.fixture(scope="module")
def workload(request: pytest.FixtureRequest) -> Workload:
    return Workload(int(request.config.getoption("--bench-ram-mib")))


CASES: dict[str, Callable[[Workload, int], Callable[[], object]]] = {
    "exact": lambda w, t: lambda: pd.scan_exact(w.ram, w.shadow, threads=t),
    "hashed": lambda w, t: lambda: pd.scan_hashed(w.ram, w.table, threads=t),
    "memcmp_ceiling": lambda w, t: lambda: pd.memcmp_ceiling(w.ram, w.shadow, threads=t),
    "read_ceiling": lambda w, t: lambda: pd.read_ceiling(w.ram, threads=t),
    "numpy": lambda w, t: w.numpy_scan,
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dirty_pct", [0, 1, 10])
@pytest.mark.parametrize("case", list(CASES))
def test_scan(benchmark: Any, workload: Workload, case: str, dirty_pct: int, threads: int) -> None:
    if case == "numpy" and threads > 1:
        pytest.skip("numpy compares on one thread")
    benchmark.group = f"scan {workload.ram_mib} MiB, {dirty_pct}% dirty"
    benchmark.extra_info.update(ram_mib=workload.ram_mib, dirty_pct=dirty_pct, threads=threads)

    def setup() -> None:
        pd.scan_hashed(workload.ram, workload.table)
        pd.scan_exact(workload.ram, workload.shadow)  # shadow and table in step
        workload.dirty(dirty_pct)

    benchmark.pedantic(
        CASES[case](workload, threads), setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1
    )


@pytest.mark.parametrize("npages", [2048, 16384])
def test_delta_encode(benchmark: Any, npages: int) -> None:
    wl = DeltaWorkload(npages)
    benchmark.group = "delta encode (realistic page changes)"
    benchmark.pedantic(wl.encode, setup=wl.reset, rounds=ROUNDS, iterations=1)
    wl.reset()
    encoded = len(wl.encode().data)
    benchmark.extra_info.update(npages=npages, size_ratio=encoded / (npages * pd.PAGE_SIZE))
