"""Planning time for pools: 16, 64 and 256 hosts, 1,000 to 10,000 VMs, k = 1, 2, 3.

    python -m bench.pool [--quick] [--json PATH] [--seed S]

Each case builds a random pool (hosts of 512 GiB and 256 vCPUs, VMs of 1 to
16 GiB: 30 % mirrored, 50 % restart, 20 % best-effort, placed to fill the
pool to about 55 % of its memory), then times ``analyse(pool, k)`` two ways:
``check``, what admission control and ``mirror pool status`` run (every
failure set of size 0..k proved survivable: sets of size >= 2 by the
verified composition of single-host plans, numpy, the rest planned from
scratch), and ``plans``, what ``mirror pool plan`` runs (a full plan built
and kept for every set; only up to 50,000 sets).  Beside them, in the same
run: the time per set of ``plans``, and a naive baseline that rebuilds the
pool's usage for each failure set (planning without the precomputed
per-host view), timed on the first 200 failure sets and extrapolated.
Targets: 64 hosts, 2,000 VMs, k = 2 under 1 s; 256 hosts, 10,000 VMs,
k = 1 under 5 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from typing import Any

from mirror.pool.analysis import analyse
from mirror.pool.model import VM, Host, Pool
from mirror.pool.planner import Planner

CASES = [
    (16, 1000, 1),
    (16, 1000, 2),
    (16, 1000, 3),
    (64, 2000, 1),
    (64, 2000, 2),
    (64, 2000, 3),
    (64, 5000, 1),
    (64, 5000, 2),
    (64, 5000, 3),
    (256, 10000, 1),
    (256, 10000, 2),
    (256, 10000, 3),
]
PLANS_MAX_SETS = 50_000  # beyond this, building every plan is not timed (minutes)
QUICK = [(16, 1000, 2), (64, 2000, 2), (256, 10000, 1)]


def make_pool(hosts: int, vms: int, k: int, seed: int) -> Pool:
    rnd = random.Random(seed)
    pool = Pool(failures_to_tolerate=k)
    for i in range(hosts):
        pool.hosts[f"h{i:03}"] = Host(f"h{i:03}", 512 * 1024, 256)
    fill = 0.55 * hosts * 512 * 1024
    mean = fill / vms / 1.3  # mirrored VMs take memory twice
    free = {h: [512 * 1024, 256] for h in pool.hosts}
    names = sorted(pool.hosts)
    for j in range(vms):
        mem = max(1024, min(16384, int(rnd.expovariate(1 / mean)) // 256 * 256))
        pr = rnd.choices(["mirrored", "restart", "best-effort"], [3, 5, 2])[0]
        vm = VM(f"vm{j:05}", mem, rnd.choice([1, 2, 2, 4]), pr, rnd.randrange(3))
        cand = [
            h
            for h in rnd.sample(names, min(8, hosts))
            if free[h][0] >= mem and free[h][1] >= vm.vcpus
        ]
        if len(cand) < (2 if pr == "mirrored" else 1):
            continue
        cand.sort(key=lambda h: -free[h][0])
        host, sb = cand[0], (cand[1] if pr == "mirrored" else None)
        for h in (host, sb):
            if h:
                free[h][0] -= mem
                free[h][1] -= vm.vcpus
        pool.vms[vm.name] = vm
        pool.place(vm.name, host, sb)
    pool.check()
    return pool


def naive_per_set(pool: Pool, k: int, sets: int = 200) -> float:
    """Seconds per failure set when every set rebuilds the pool's view from scratch."""
    ups = pool.up_hosts()
    fs_iter = itertools.chain.from_iterable(itertools.combinations(ups, s) for s in range(k + 1))
    chosen = list(itertools.islice(fs_iter, sets))
    t0 = time.perf_counter()
    for fs in chosen:
        Planner(pool).plan(fs)
    return (time.perf_counter() - t0) / len(chosen)


def run_case(hosts: int, vms: int, k: int, seed: int) -> dict[str, Any]:
    pool = make_pool(hosts, vms, k, seed)
    sets = sum(math.comb(hosts, s) for s in range(k + 1))
    t0 = time.perf_counter()
    check = analyse(pool, k, keep="none", max_k=k, budget_s=600)
    t_check = time.perf_counter() - t0
    t_plans = None
    if sets <= PLANS_MAX_SETS:
        t0 = time.perf_counter()
        plans = analyse(pool, k, keep="all", max_k=k, budget_s=600)
        t_plans = time.perf_counter() - t0
        assert plans.survives == check.survives
    naive = naive_per_set(pool, k)
    return {
        "hosts": hosts,
        "vms": len(pool.vms),
        "k": k,
        "failure_sets": sets,
        "survives": check.survives,
        "checked": check.checked,
        "gave_up": check.gave_up,
        "check_s": round(t_check, 3),
        "plans_s": None if t_plans is None else round(t_plans, 3),
        "us_per_set": None if t_plans is None else round(1e6 * t_plans / sets, 1),
        "naive_us_per_set": round(1e6 * naive, 1),
        "naive_s_extrapolated": round(naive * sets, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.pool",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="only the two target cases and 16 hosts")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    rows = []
    print(
        f"{'hosts':>5} {'VMs':>6} {'k':>2} {'sets':>6} {'survives':>8} {'check s':>8} "
        f"{'plans s':>8} {'us/set':>8} {'naive us/set':>12} {'naive s (extrap.)':>17}"
    )
    for hosts, vms, k in QUICK if args.quick else CASES:
        r = run_case(hosts, vms, k, args.seed)
        rows.append(r)
        print(
            f"{r['hosts']:>5} {r['vms']:>6} {r['k']:>2} {r['failure_sets']:>6} "
            f"{r['survives']!s:>8} {r['check_s']:>8} {r['plans_s'] or '-':>8} "
            f"{r['us_per_set'] or '-':>8} "
            f"{r['naive_us_per_set']:>12} {r['naive_s_extrapolated']:>17}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
