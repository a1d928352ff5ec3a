"""The failure planner: after ANY k host failures, does every protected VM have a place?

For each failure set F (a set of up hosts that die together) the VMs that
lose something need room on the surviving up hosts:

- a ``restart`` VM that ran on a host of F restarts elsewhere;
- a ``mirrored`` VM whose primary host dies fails over to its standby (whose
  memory and vCPUs are already reserved there: nothing new is needed) and
  then needs a NEW standby reservation on another surviving host; if its
  standby host dies it needs a new standby; if both die it restarts like a
  ``restart`` VM and needs a new standby as well, on another host than the
  one it restarts on.  After any k failures a mirrored VM therefore runs
  AND is protected again, or the pool does not tolerate k;
- a ``best-effort`` VM restarts only if room is left once every guaranteed
  VM is placed (it never displaces one).  VMs that already run where
  nothing failed stay where they are (nothing is preempted).

VMs that are not running now (or mirrored VMs without a standby) need room
in every failure set, including the empty one: the plan for the empty set
is the repair plan.

Packing: guaranteed demands largest first onto the surviving host with the
most free memory (worst-fit decreasing, a heap), then first-fit decreasing
if that fails; if both fail and the failure set's demands are few (small
pools) an exhaustive search decides exactly.  So on small pools a failure
set is called unsurvivable only when no placement exists, and on large ones
the planner may say "cannot prove" but every plan it returns has been built
and checked against capacity for that exact failure set: every failure set
of size <= k is enumerated, there is no sampling and no pruning of sets.

A failure set that cannot be fully survived (beyond what the pool tolerates)
still gets a plan (:meth:`Planner._failing`): every VM with a live copy
keeps running (a surviving standby is promoted), then what lost every copy
restarts in priority and restart order where it fits, then re-protection,
then best-effort VMs; what finds no room is named with the memory it lacks.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mirror.pool.model import Pool

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional: the composed check is skipped
    np = None  # type: ignore[assignment]

# kinds of move
PROMOTE = "promote"  # the standby host runs the VM now (the pair's own failover)
STANDBY = "standby"  # a new standby reservation
RESTART = "restart"  # a guaranteed VM starts on the host
BEST_EFFORT = "best-effort"  # a best-effort VM starts on the host

EXACT_MAX_UNITS = 14  # exhaustive search when a failure set's guaranteed demands are this few
EXACT_MAX_NODES = 200_000  # nodes of exhaustive search per failure set
REPACK_MAX = 64  # beyond the guarantee: VMs restarted above which no repacking is tried
_PRIO_RANK = {"mirrored": 0, "restart": 1, "best-effort": 2}


class Move(NamedTuple):
    vm: str
    kind: str
    to: str | None  # None: no room found
    mem_mb: int

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "kind": self.kind, "to": self.to, "mem_mb": self.mem_mb}


@dataclass
class FailurePlan:
    failed: tuple[str, ...]
    moves: list[Move]
    unplaced: list[str]  # guaranteed VMs (or their standbys) that find no room
    shortfall_mb: int  # memory of what found no room
    lost: list[str]  # best-effort VMs that are not restarted
    proven: bool = True  # for a failing set: True when no placement exists at all
    # a failing set (beyond the guarantee): the guaranteed VMs that do not run after it (the
    # others in ``unplaced`` run without a standby), the memory each one in ``unplaced``
    # lacks, and whether the VMs the plan runs were proved the best possible (see _failing)
    down: list[str] = field(default_factory=list)
    needs: dict[str, int] = field(default_factory=dict)
    optimal: bool = True

    @property
    def ok(self) -> bool:
        return not self.unplaced

    @property
    def unprotected(self) -> list[str]:
        """Mirrored VMs that run after this plan, but without a standby."""
        return [v for v in self.unplaced if v not in self.down]

    def to_json(self) -> dict[str, Any]:
        return {
            "failed": list(self.failed),
            "ok": self.ok,
            "moves": [m.to_json() for m in self.moves],
            "unplaced": self.unplaced,
            "down": self.down,
            "unprotected": self.unprotected,
            "needs_mb": self.needs,
            "shortfall_mb": self.shortfall_mb,
            "lost_best_effort": self.lost,
            "proven": self.proven,
            "optimal": self.optimal,
        }


@dataclass
class Analysis:
    """What the planner proved about every failure set of size 0..k (and beyond, while its
    budget lasts).

    "The pool tolerates k" means: every set of at most k up hosts failing together (every
    set, if k is larger than the number of up hosts) leaves a placement where every
    guaranteed VM runs and every mirrored VM is protected again.  ``tolerated``: the largest
    such k proved (-1: not even with no failure; equal to ``up_hosts`` when every set
    survives, as in a pool with nothing guaranteed or no host at all: then any k is
    tolerated).  The pool is overcommitted when it does not tolerate its
    ``failures_to_tolerate``."""

    k: int  # failures asked about
    survives: bool  # proved: every failure set of size <= k is survivable
    tolerated: int  # largest k' proved (-1: the pool is broken already)
    tolerated_exact: bool  # False: larger sizes were not all checked (budget)
    breaking: FailurePlan | None  # the first failure set of size <= k that cannot be survived
    plans: dict[tuple[str, ...], FailurePlan] = field(default_factory=dict)
    checked: int = 0  # failure sets planned
    seconds: float = 0.0
    up_hosts: int = 0
    gave_up: bool = False  # the budget ran out before every set of size <= k was checked
    # the first failure set of size k+1.. found not survivable (what bounds ``tolerated``
    # when the pool survives k)
    breaks_beyond: FailurePlan | None = None

    @property
    def tolerates_all(self) -> bool:
        """Every set of up hosts, all of them included, can fail: any k is tolerated."""
        return self.tolerated_exact and self.tolerated == self.up_hosts

    def to_json(self, with_plans: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "failures": self.k,
            "survives": self.survives,
            "tolerated": self.tolerated,
            "tolerated_exact": self.tolerated_exact,
            "tolerates_any_number": self.tolerates_all,
            "up_hosts": self.up_hosts,
            "breaking": None if self.breaking is None else self.breaking.to_json(),
            "breaks_beyond": None if self.breaks_beyond is None else self.breaks_beyond.to_json(),
            "checked_failure_sets": self.checked,
            "seconds": round(self.seconds, 4),
            "gave_up": self.gave_up,
        }
        if with_plans:
            d["plans"] = [p.to_json() for p in self.plans.values()]
        return d


_RUN, _PAIR, _STBY, _BE = 0, 1, 2, 3


def _fitter(
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


class Planner:
    """Precomputed view of a pool; plans any failure set of its up hosts."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        # up and dead hosts are indexed alike (a dead host's VMs are still placed on it, and
        # the controller's plan once it is marked dead equals the plan made before); dead
        # hosts are in every failure set.  Hosts in maintenance hold nothing.
        self.hosts = sorted(h.name for h in pool.hosts.values() if h.state in ("up", "dead"))
        self.up = [h for h in self.hosts if pool.hosts[h].state == "up"]
        self.index = {h: i for i, h in enumerate(self.hosts)}
        self.down = {self.index[h] for h in self.hosts if pool.hosts[h].state == "dead"}
        n = len(self.hosts)
        self._rings: dict[int, list[tuple[int, int, int]] | None] = {}
        self.cap_m = [pool.hosts[h].mem_mb for h in self.hosts]
        self.cap_c = [pool.hosts[h].vcpus for h in self.hosts]
        fm, fc = self.cap_m[:], self.cap_c[:]
        names = sorted(pool.vms)
        self.names = names
        self.mem = [pool.vms[v].mem_mb for v in names]
        self.cpu = [pool.vms[v].vcpus for v in names]
        self.prio = [pool.vms[v].priority for v in names]
        self.order = [pool.vms[v].order for v in names]
        self.prim: list[int] = []
        self.stby: list[int] = []
        self.by_host: list[list[int]] = [[] for _ in range(n)]
        self.always: list[int] = []  # VMs that need room whatever fails
        for i, v in enumerate(names):
            p = pool.placements.get(v)
            a = -1 if p is None or p.host is None else self.index.get(p.host, -1)
            mirrored = self.prio[i] == "mirrored"
            b = (
                -1
                if p is None or p.standby is None or not mirrored
                else self.index.get(p.standby, -1)
            )
            self.prim.append(a)
            self.stby.append(b)
            for h in (a, b):
                if h >= 0:
                    fm[h] -= self.mem[i]
                    fc[h] -= self.cpu[i]
                    self.by_host[h].append(i)
            if a < 0 or (mirrored and b < 0):
                self.always.append(i)
        self.free_m, self.free_c = fm, fc

    # -- demands -------------------------------------------------------------------------------

    def _units(self, failed: set[int]) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """Guaranteed units (mem, kind, vm, forbid) and best-effort VMs, for failure set."""
        units: list[tuple[int, int, int, int]] = []
        be: list[int] = []
        seen: set[int] = set()
        cands = list(self.always)
        for h in failed:
            cands.extend(self.by_host[h])
        for i in cands:
            if i in seen:
                continue
            seen.add(i)
            a, b = self.prim[i], self.stby[i]
            pdead = a < 0 or a in failed
            pr = self.prio[i]
            if pr == "mirrored":
                sdead = b < 0 or b in failed
                if pdead and sdead:
                    units.append((self.mem[i], _PAIR, i, -1))
                elif pdead:
                    units.append((self.mem[i], _STBY, i, b))  # promoted on b; standby elsewhere
                elif sdead:
                    units.append((self.mem[i], _STBY, i, a))
            elif pdead:
                if pr == "restart":
                    units.append((self.mem[i], _RUN, i, -1))
                else:
                    be.append(i)
        # largest first; at equal size pairs first (two placements), then by name
        units.sort(key=lambda u: (-u[0], u[1] != _PAIR, u[2]))
        be.sort(key=lambda i: (self.order[i], -self.mem[i], i))
        return units, be

    # -- packing -------------------------------------------------------------------------------

    def _greedy(
        self,
        units: list[tuple[int, int, int, int]],
        fm: list[int],
        fc: list[int],
        alive: list[int],
        worst: bool,
    ) -> list[tuple[int, int, int]] | None:
        """Place every unit or return None; on success fm/fc hold what is left."""
        out: list[tuple[int, int, int]] = []  # (vm, kind, host): kind _RUN or _STBY
        cpu = self.cpu
        fit = _fitter(fm, fc, alive, worst)
        for mem, kind, i, forbid in units:
            c = cpu[i]
            h = fit(mem, c, forbid)
            if h < 0:
                return None
            if kind == _PAIR:
                out.append((i, _RUN, h))
                h2 = fit(mem, c, h)
                if h2 < 0:
                    return None
                out.append((i, _STBY, h2))
            else:
                out.append((i, kind, h))
        return out

    def _exact(
        self,
        units: list[tuple[int, int, int, int]],
        fm: list[int],
        fc: list[int],
        alive: list[int],
        budget: list[int] | None = None,
    ) -> tuple[list[tuple[int, int, int]] | None, bool]:
        """Exhaustive search: (placement, True) / (None, True: none exists) / (None, False).
        ``budget``: [nodes left], shared by calls and decreased by the nodes visited."""
        special = {u[3] for u in units if u[3] >= 0}
        cpu = self.cpu
        nodes = 0
        out: list[tuple[int, int, int]] = []
        need_m = [0] * (len(units) + 1)
        need_c = [0] * (len(units) + 1)
        for j in range(len(units) - 1, -1, -1):
            mult = 2 if units[j][1] == _PAIR else 1
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
                if kind == _PAIR:
                    for h2 in choices(mem, c, h):
                        fm[h2] -= mem
                        fc[h2] -= c
                        out.append((i, _RUN, h))
                        out.append((i, _STBY, h2))
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

    # -- composition of single-failure plans ---------------------------------------------------

    def ring(self, x: int) -> list[tuple[int, int, int]] | None:
        """Host x's VMs placed as if x alone failed (every other indexed host alive), first
        fit around the ring x+1, x+2, ...: each host's VMs land on few hosts, so that single
        plans of most sets of hosts can be combined.  None: no room that way."""
        if x not in self._rings:
            n = len(self.hosts)
            order = [(x + d) % n for d in range(1, n)]
            fm, fc = self.free_m[:], self.free_c[:]
            units, _ = self._units({x})
            self._rings[x] = self._greedy(units, fm, fc, order, worst=False)
        return self._rings[x]

    def _composed(
        self, failed: set[int], fm: list[int], fc: list[int]
    ) -> list[tuple[int, int, int]] | None:
        """Every failed host's ring plan at once, if they do not touch (see _Composer)."""
        out: list[tuple[int, int, int]] = []
        both: dict[int, list[int]] = {}  # mirrored VMs whose two hosts fail: [run, standby]
        for x in sorted(failed):
            r = self.ring(x)
            if r is None:
                return None
            for i, kind, h in r:
                if h in failed:
                    return None
                fm[h] -= self.mem[i]
                fc[h] -= self.cpu[i]
                a, b = self.prim[i], self.stby[i]
                if b >= 0 and a in failed and b in failed:
                    # a's plan reserved a new standby for it, b's plan one more: it restarts
                    # on the one from its primary's plan, and is mirrored to the other
                    both.setdefault(i, [-1, -1])[0 if x == a else 1] = h
                else:
                    out.append((i, kind, h))
        if any(v < 0 for v in fm) or any(v < 0 for v in fc):
            return None
        for i, (run, standby) in both.items():
            if run == standby:
                return None
            out += [(i, _RUN, run), (i, _STBY, standby)]
        return out

    def plan(self, failed_names: tuple[str, ...] | list[str], moves: bool = True) -> FailurePlan:
        failed = {self.index[h] for h in failed_names} | self.down
        alive = [h for h in range(len(self.hosts)) if h not in failed]
        units, be = self._units(failed)
        fm, fc = self.free_m[:], self.free_c[:]
        placed = self._greedy(units, fm, fc, alive, worst=True)
        proven = True
        if placed is None:
            fm, fc = self.free_m[:], self.free_c[:]
            placed = self._greedy(units, fm, fc, alive, worst=False)
        if placed is None and len(failed) >= 2 and not self.always:
            fm, fc = self.free_m[:], self.free_c[:]
            placed = self._composed(failed, fm, fc)
        if placed is None:
            fm, fc = self.free_m[:], self.free_c[:]
            need = sum(u[0] * (2 if u[1] == _PAIR else 1) for u in units)
            if need > sum(fm[h] for h in alive):
                proven = True  # not enough memory in total: no placement exists
            elif len(units) <= EXACT_MAX_UNITS:
                placed, proven = self._exact(units, fm, fc, alive)
            else:
                proven = False
        failed_t = tuple(sorted(failed_names))
        if placed is None:
            return self._failing(failed_t, failed, units, alive, proven, moves)
        # best-effort VMs in restart order, wherever room is left (most free memory first)
        lost = []
        be_out = []
        if be:
            fit = _fitter(fm, fc, alive, True)
            for i in be:
                h = fit(self.mem[i], self.cpu[i], -1)
                if h < 0:
                    lost.append(self.names[i])
                else:
                    be_out.append((i, h))
        out: list[Move] = []
        if moves:
            out = self._moves(units, placed, be_out, failed)
        return FailurePlan(failed_t, out, [], 0, lost, True)

    def _moves(
        self,
        units: list[tuple[int, int, int, int]],
        placed: list[tuple[int, int, int]],
        be_out: list[tuple[int, int]],
        failed: set[int],
    ) -> list[Move]:
        """The moves in the order the controller carries them out: priority, then order."""
        hosts, names, mem = self.hosts, self.names, self.mem
        out: list[tuple[tuple[int, int, str], Move]] = []
        for i, kind, h in placed:
            rank = 0 if self.prio[i] == "mirrored" else 1
            if kind == _RUN:
                mk = RESTART
            else:
                a, b = self.prim[i], self.stby[i]
                if (a < 0 or a in failed) and b >= 0 and b not in failed:
                    out.append(
                        ((rank, self.order[i], names[i]), Move(names[i], PROMOTE, hosts[b], mem[i]))
                    )
                mk = STANDBY
            out.append(((rank, self.order[i], names[i]), Move(names[i], mk, hosts[h], mem[i])))
        for i, h in be_out:
            move = Move(names[i], BEST_EFFORT, hosts[h], mem[i])
            out.append(((2, self.order[i], names[i]), move))
        out.sort(key=lambda t: t[0])  # stable: promote before its new standby
        return [m for _, m in out]

    def _rank(self, i: int) -> tuple[int, int, int, str]:
        """The order VMs get room in beyond the guarantee: mirrored, then restart, then
        best-effort; within a priority by restart order, then smaller first (so that more
        VMs run), then by name."""
        return (_PRIO_RANK[self.prio[i]], self.order[i], self.mem[i], self.names[i])

    def _pack_runs(
        self, vms: list[int], fm: list[int], fc: list[int], alive: list[int], budget: list[int]
    ) -> tuple[list[tuple[int, int, int]] | None, bool]:
        """Can ``vms`` all start on ``alive`` (free fm/fc, left untouched)?  (placement, True),
        (None, True): proved impossible, (None, False): not found, not proved impossible."""
        units = sorted(((self.mem[i], _RUN, i, -1) for i in vms), key=lambda u: (-u[0], u[2]))
        for worst in (True, False):
            m, c = fm[:], fc[:]
            placed = self._greedy(units, m, c, alive, worst)
            if placed is not None:
                return placed, True
        if sum(self.mem[i] for i in vms) > sum(fm[h] for h in alive) or sum(
            self.cpu[i] for i in vms
        ) > sum(fc[h] for h in alive):
            return None, True
        if len(units) > EXACT_MAX_UNITS or budget[0] <= 0:
            return None, False
        m, c = fm[:], fc[:]
        placed, proven = self._exact(units, m, c, alive, budget)
        return placed, proven

    def _failing(
        self,
        failed: tuple[str, ...],
        failed_idx: set[int],
        units: list[tuple[int, int, int, int]],
        alive: list[int],
        proven: bool,
        moves: bool,
    ) -> FailurePlan:
        """A failure set the pool cannot fully survive: best effort, never worse than the
        pairs and VMs would do alone.

        1. Every VM with a live copy keeps running: a mirrored VM whose standby survived is
           promoted there (its pair does it; nothing new is needed), one whose primary
           survived stays; nothing that runs is moved or stopped.
        2. The guaranteed VMs that lost every copy restart in rank order (:meth:`_rank`),
           each one if it fits together with those before it that restart (decided by an
           exhaustive search when few enough; ``optimal`` is False when it could not be
           proved), so a VM only stays down if starting it would need one ranked before it
           to stay down.
        3. Mirrored VMs that run without a standby get a new one, in rank order, where room
           is left (worst fit).
        4. Best-effort VMs, by order, in what is left."""
        fm, fc = self.free_m[:], self.free_c[:]
        promoted: list[int] = []
        protect: dict[int, int] = {}  # mirrored VM -> the host it runs on, needing a standby
        down: list[int] = []  # guaranteed VMs with no live copy
        for _m, kind, i, forbid in units:
            if kind == _STBY:
                a = self.prim[i]
                if a < 0 or a in failed_idx:
                    promoted.append(i)
                protect[i] = forbid  # the host it runs on (its standby's, if promoted)
            else:
                down.append(i)
        down.sort(key=self._rank)
        budget = [EXACT_MAX_NODES]
        chosen: list[int] = []
        where: dict[int, int] = {}
        left_m, left_c = fm[:], fc[:]
        optimal = True
        rejected: list[int] = []
        room_m = sum(fm[h] for h in alive)
        room_c = sum(fc[h] for h in alive)
        for i in down:
            fit = _fitter(left_m, left_c, alive, True)
            h = fit(self.mem[i], self.cpu[i], -1)
            if h >= 0:
                chosen.append(i)
                where[i] = h
                room_m -= self.mem[i]
                room_c -= self.cpu[i]
                continue
            if self.mem[i] > room_m or self.cpu[i] > room_c:
                rejected.append(i)  # not even the total room left: proved
                continue
            if len(chosen) >= REPACK_MAX:  # repacking that many for each VM costs too much
                optimal = False
                rejected.append(i)
                continue
            placed, sure = self._pack_runs([*chosen, i], fm, fc, alive, budget)
            if placed is None:
                optimal = optimal and sure
                rejected.append(i)
                continue
            chosen.append(i)
            room_m -= self.mem[i]
            room_c -= self.cpu[i]
            where = {v: h for v, _k, h in placed}
            left_m, left_c = fm[:], fc[:]
            for v, h in where.items():
                left_m[h] -= self.mem[v]
                left_c[h] -= self.cpu[v]
        still_down = []
        for i in rejected:  # one that was not proved impossible may fit what is left
            h = _fitter(left_m, left_c, alive, True)(self.mem[i], self.cpu[i], -1)
            if h >= 0:
                chosen.append(i)
                where[i] = h
            else:
                still_down.append(i)
        for i in chosen:
            if self.prio[i] == "mirrored":
                protect[i] = where[i]
        standby: dict[int, int] = {}
        fit = _fitter(left_m, left_c, alive, True)
        for i in sorted(protect, key=self._rank):
            h = fit(self.mem[i], self.cpu[i], protect[i])
            if h >= 0:
                standby[i] = h
        _, be = self._units(failed_idx)
        lost: list[str] = []
        be_out: list[tuple[int, int]] = []
        for i in be:
            h = fit(self.mem[i], self.cpu[i], -1)
            if h < 0:
                lost.append(self.names[i])
            else:
                be_out.append((i, h))
        needs: dict[str, int] = {}
        for i in still_down:
            needs[self.names[i]] = self.mem[i] * (2 if self.prio[i] == "mirrored" else 1)
        for i in protect:
            if i not in standby:
                needs[self.names[i]] = self.mem[i]
        out: list[Move] = []
        if moves:
            keyed: list[tuple[tuple[int, int, str], Move]] = []
            names, hosts, mem = self.names, self.hosts, self.mem

            def add(i: int, kind: str, h: int) -> None:
                key = (_PRIO_RANK[self.prio[i]], self.order[i], names[i])
                keyed.append((key, Move(names[i], kind, hosts[h], mem[i])))

            for i in promoted:
                add(i, PROMOTE, self.stby[i])
            for i in chosen:
                add(i, RESTART, where[i])
            for i, h in standby.items():
                add(i, STANDBY, h)
            for i, h in be_out:
                add(i, BEST_EFFORT, h)
            keyed.sort(key=lambda t: t[0])  # stable: promote or restart before the standby
            out = [m for _, m in keyed]
        return FailurePlan(
            failed,
            out,
            sorted(needs),
            sum(needs.values()),
            lost,
            proven,
            down=sorted(self.names[i] for i in still_down),
            needs=needs,
            optimal=optimal,
        )


class _Composer:
    """Verified composition of single-failure plans, for failure sets of size >= 2.

    Each host's ring plan (:meth:`Planner.ring`) sends its VMs to a few hosts
    after it.  If no two hosts of F are linked (one's ring plan sends a VM to
    the other) and nothing is unplaced before any failure, every VM that F
    displaces is displaced by one host h of F with the same demands as when
    h fails alone, except a mirrored VM whose two hosts are in F: it needs a
    restart and a new standby, and the two ring plans reserved exactly two
    places of its size for it (a new standby each), which serve if they are
    on different hosts (else its two hosts count as linked).  Sending each
    VM where the ring plans send it is then a plan for F, valid iff no
    surviving host receives more memory or vCPUs than it has free.  That sum
    is checked for every set (numpy, in chunks), and :meth:`Planner.plan`
    builds the same composed plan when its greedy packers fail, so the
    controller finds every plan proved here.  Sets that
    are linked or do not fit are planned from scratch.  No set is skipped.
    """

    CHUNK = 16384

    def __init__(self, pl: Planner) -> None:
        n = len(pl.hosts)
        self.pl = pl
        self.lm = np.zeros((n, n), dtype=np.int64)
        self.lc = np.zeros((n, n), dtype=np.int64)
        self.linked = np.zeros((n, n), dtype=bool)
        target: dict[tuple[int, int], int] = {}  # (failed host, VM) -> where its ring sends it
        self.fm = np.array(pl.free_m, dtype=np.int64)
        self.fc = np.array(pl.free_c, dtype=np.int64)

        for h in range(n):
            r = pl.ring(h)
            if r is None:  # no single ring plan: every set with h is planned from scratch
                self.linked[h, :] = self.linked[:, h] = True
                continue
            for i, _kind, t in r:
                self.lm[h, t] += pl.mem[i]
                self.lc[h, t] += pl.cpu[i]
                self.linked[h, t] = self.linked[t, h] = True
                target[h, i] = t
        for i, (a, b) in enumerate(zip(pl.prim, pl.stby, strict=True)):
            # a pair whose two hosts fail restarts where its primary's plan reserved its new
            # standby, mirrored to where its standby's plan did: those must differ
            if a >= 0 and b >= 0 and target.get((a, i), -1) == target.get((b, i), -2):
                self.linked[a, b] = self.linked[b, a] = True

    def unverified(self, size: int) -> Any:
        """Yield, in order, the failure sets (host index tuples) the composition cannot prove."""
        n = len(self.pl.hosts)
        combos = itertools.combinations(range(n), size)
        pairs = list(itertools.combinations(range(size), 2))
        while True:
            flat = np.fromiter(
                itertools.chain.from_iterable(itertools.islice(combos, self.CHUNK)),
                dtype=np.int64,
            )
            if flat.size == 0:
                return
            idx = flat.reshape(-1, size)
            sm = self.lm[idx[:, 0]].copy()
            sc = self.lc[idx[:, 0]].copy()
            for j in range(1, size):
                sm += self.lm[idx[:, j]]
                sc += self.lc[idx[:, j]]
            bad = ~((sm <= self.fm).all(axis=1) & (sc <= self.fc).all(axis=1))
            for p, q in pairs:
                bad |= self.linked[idx[:, p], idx[:, q]]
            for row in idx[bad]:
                yield tuple(int(x) for x in row)


def analyse(
    pool: Pool,
    k: int | None = None,
    *,
    keep: str = "all",
    max_k: int | None = None,
    budget_s: float = 60.0,
    extra_budget_s: float = 2.0,
    compose: bool = True,
) -> Analysis:
    """Check every failure set of size 0..k; then look further for the largest k tolerated.

    ``keep``: which plans to return: "all", "single" (sets of size <= 1) or "none".
    Unless every plan is kept, sets of size >= 2 are first checked by
    composing single-failure plans (:class:`_Composer`; ``compose=False``
    plans every set from scratch).  Sizes beyond k are explored while the
    estimated time stays within ``extra_budget_s`` (the answer then says "at
    least").  If checking up to k itself exceeds ``budget_s`` the analysis
    gives up: it never claims k.
    """
    t0 = time.perf_counter()
    k = pool.failures_to_tolerate if k is None else k
    pl = Planner(pool)
    hosts = pl.up
    n = len(hosts)
    limit = n if max_k is None else min(n, max_k)
    res = Analysis(k, False, -1, True, None, up_hosts=n)
    composer = (
        _Composer(pl)
        if compose and keep != "all" and np is not None and not pl.always and not pl.down
        else None
    )
    per_set = 0.0  # seconds per set planned from scratch
    per_composed = 2e-6  # seconds per set checked by composition (first guess)

    def gave_up() -> Analysis:
        res.gave_up = True
        res.tolerated_exact = False
        res.seconds = time.perf_counter() - t0
        return res

    broken = False  # a set failed: the sizes left are planned only for the plans kept
    for size in range(0, limit + 1):
        count = math.comb(n, size)
        want = keep == "all" or (keep == "single" and size <= 1)
        keep_plans = want and size <= max(k, 1)
        fast = composer is not None and size >= 2 and not broken
        if broken and not keep_plans:
            break
        if not broken and size > k and (per_composed if fast else per_set) * count > extra_budget_s:
            res.tolerated_exact = False
            break
        ok = True
        t_size = time.perf_counter()
        sets: Any = (
            (tuple(hosts[i] for i in fs) for fs in composer.unverified(size))  # type: ignore[union-attr]
            if fast
            else itertools.combinations(hosts, size)
        )
        planned = 0
        for fs in sets:
            if time.perf_counter() - t0 > budget_s:
                if broken:  # what was asked is answered; only plans are missing
                    break
                if size <= k:
                    return gave_up()
            fp = pl.plan(fs, moves=want)
            planned += 1
            if keep_plans:
                res.plans[fp.failed] = fp
            if not fp.ok and ok and not broken:
                ok = False
                if size <= k:
                    res.breaking = fp
                else:
                    res.breaks_beyond = fp
                if not keep_plans:
                    break
        res.checked += count if fast and ok else planned
        if broken or not ok:
            broken = True
            continue
        res.tolerated = size
        spent = time.perf_counter() - t0
        if fast:
            per_composed = max(per_composed, (time.perf_counter() - t_size) / max(1, count))
        else:
            per_set = spent / max(1, res.checked)
    res.survives = res.breaking is None and not res.gave_up and res.tolerated >= min(k, n)
    res.seconds = time.perf_counter() - t0
    return res
