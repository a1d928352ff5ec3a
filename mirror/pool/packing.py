"""Packing: placing what a failure set displaces onto the hosts that survive it.

The planner (:mod:`mirror.pool.planner`) states a failure set's demands as
*units* ``(mem, kind, vm, forbid)``: kind ``RUN`` (a VM starts), ``STBY`` (a new
standby reservation) or ``PAIR`` (a VM starts and gets a standby on another
host); ``forbid`` is a host the unit may not take (-1: none), e.g. the host
a mirrored VM runs on for its new standby.  VMs and hosts are indices:
``cpu`` gives each VM's vCPUs (and ``mem`` its memory, for :func:`pack_runs`),
``fm``/``fc`` each host's free memory and vCPUs (a placement found takes its
room from them), and ``alive`` the hosts that may take units (first fit tries
them in that order).  A placement is a list of ``(vm, kind, host)``, kind
``RUN`` or ``STBY``.

The searches: :func:`greedy` (worst fit by free memory, a heap, or first
fit), :func:`exact` (exhaustive, when the units are at most
``EXACT_MAX_UNITS``, within ``EXACT_MAX_NODES`` nodes: it proves that no
placement exists, or gives up), and :func:`pack_runs`, which tries them in
turn for a set of VMs to start.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

EXACT_MAX_UNITS = 14  # exhaustive search when a failure set's guaranteed demands are this few
EXACT_MAX_NODES = 200_000  # nodes of exhaustive search per failure set

# kinds of unit
RUN, PAIR, STBY = 0, 1, 2


def fitter(
    fm: list[int], fc: list[int], alive: list[int], worst: bool
) -> Callable[[int, int, int], int]:
    """fit(mem, cpu, forbid) -> host taken (-1: none): worst fit by memory or first fit."""
    if worst:
        heap = [(-fm[h], h) for h in alive]
        heapq.heapify(heap)

        def fit_worst(mem: int, c: int, forbid: int) -> int:
            skipped = []
            found = -1
            while heap:
                negm, h = heapq.heappop(heap)
                if -negm < mem:  # the most free memory left is too little: nobody fits
                    skipped.append((negm, h))
                    break
                if h != forbid and fc[h] >= c:
                    found = h
                    fm[h] -= mem
                    fc[h] -= c
                    heapq.heappush(heap, (-fm[h], h))
                    break
                skipped.append((negm, h))
            for item in skipped:
                heapq.heappush(heap, item)
            return found

        return fit_worst

    def fit_first(mem: int, c: int, forbid: int) -> int:
        for h in alive:
            if h != forbid and fm[h] >= mem and fc[h] >= c:
                fm[h] -= mem
                fc[h] -= c
                return h
        return -1

    return fit_first


def greedy(
    units: list[tuple[int, int, int, int]], cpu: list[int], fm: list[int], fc: list[int],
    alive: list[int], worst: bool,
) -> list[tuple[int, int, int]] | None:
    """Place every unit or return None; on success fm/fc hold what is left."""
    out: list[tuple[int, int, int]] = []  # (vm, kind, host): kind RUN or STBY
    fit = fitter(fm, fc, alive, worst)
    for mem, kind, i, forbid in units:
        c = cpu[i]
        h = fit(mem, c, forbid)
        if h < 0:
            return None
        if kind == PAIR:
            out.append((i, RUN, h))
            h2 = fit(mem, c, h)
            if h2 < 0:
                return None
            out.append((i, STBY, h2))
        else:
            out.append((i, kind, h))
    return out


def exact(
    units: list[tuple[int, int, int, int]], cpu: list[int], fm: list[int], fc: list[int],
    alive: list[int], budget: list[int] | None = None,
) -> tuple[list[tuple[int, int, int]] | None, bool]:
    """Exhaustive search: (placement, True) / (None, True: none exists) / (None, False).
    ``budget``: [nodes left], shared by calls and decreased by the nodes visited."""
    special = {u[3] for u in units if u[3] >= 0}
    nodes = 0
    out: list[tuple[int, int, int]] = []
    need_m = [0] * (len(units) + 1)
    need_c = [0] * (len(units) + 1)
    for j in range(len(units) - 1, -1, -1):
        mult = 2 if units[j][1] == PAIR else 1
        need_m[j] = need_m[j + 1] + mult * units[j][0]
        need_c[j] = need_c[j + 1] + mult * cpu[units[j][2]]

    class Budget(Exception):
        pass

    def choices(mem: int, c: int, forbid: int) -> list[int]:
        seen: set[tuple[int, int, int]] = set()
        res = []
        for h in alive:
            if h == forbid or fm[h] < mem or fc[h] < c:
                continue
            key = (fm[h], fc[h], h if h in special else -1)
            if key in seen:
                continue
            seen.add(key)
            res.append(h)
        return res

    limit = EXACT_MAX_NODES if budget is None else budget[0]

    def rec(j: int) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > limit:
            raise Budget
        if j == len(units):
            return True
        if sum(fm[h] for h in alive) < need_m[j] or sum(fc[h] for h in alive) < need_c[j]:
            return False
        mem, kind, i, forbid = units[j]
        c = cpu[i]
        for h in choices(mem, c, forbid):
            fm[h] -= mem
            fc[h] -= c
            if kind == PAIR:
                for h2 in choices(mem, c, h):
                    fm[h2] -= mem
                    fc[h2] -= c
                    out.append((i, RUN, h))
                    out.append((i, STBY, h2))
                    if rec(j + 1):
                        return True
                    out.pop()
                    out.pop()
                    fm[h2] += mem
                    fc[h2] += c
            else:
                out.append((i, kind, h))
                if rec(j + 1):
                    return True
                out.pop()
            fm[h] += mem
            fc[h] += c
        return False

    try:
        return (list(out) if rec(0) else None), True
    except Budget:
        return None, False
    finally:
        if budget is not None:
            budget[0] -= nodes


def pack_runs(
    vms: list[int], mem: list[int], cpu: list[int], fm: list[int], fc: list[int],
    alive: list[int], budget: list[int],
) -> tuple[list[tuple[int, int, int]] | None, bool]:
    """Can ``vms`` all start on ``alive`` (free fm/fc, left untouched)?  (placement, True),
    (None, True): proved impossible, (None, False): not found, not proved impossible."""
    units = sorted(((mem[i], RUN, i, -1) for i in vms), key=lambda u: (-u[0], u[2]))
    for worst in (True, False):
        m, c = fm[:], fc[:]
        placed = greedy(units, cpu, m, c, alive, worst)
        if placed is not None:
            return placed, True
    if sum(mem[i] for i in vms) > sum(fm[h] for h in alive) or \
            sum(cpu[i] for i in vms) > sum(fc[h] for h in alive):
        return None, True
    if len(units) > EXACT_MAX_UNITS or budget[0] <= 0:
        return None, False
    m, c = fm[:], fc[:]
    placed, proven = exact(units, cpu, m, c, alive, budget)
    return placed, proven
