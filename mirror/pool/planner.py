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
EXACT_MAX_NODES = 200_000


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

    @property
    def ok(self) -> bool:
        return not self.unplaced

    def to_json(self) -> dict[str, Any]:
        return {
            "failed": list(self.failed),
            "ok": self.ok,
            "moves": [m.to_json() for m in self.moves],
            "unplaced": self.unplaced,
            "shortfall_mb": self.shortfall_mb,
            "lost_best_effort": self.lost,
            "proven": self.proven,
        }


@dataclass
class Analysis:
    k: int  # failures asked about
    survives: bool  # proved: every failure set of size <= k is survivable
    tolerated: int  # largest k' proved (-1: the pool is broken already)
    tolerated_exact: bool  # False: larger sizes were not all checked (budget)
    breaking: FailurePlan | None  # the first failure set found that cannot be survived
    plans: dict[tuple[str, ...], FailurePlan] = field(default_factory=dict)
    checked: int = 0  # failure sets planned
    seconds: float = 0.0
    up_hosts: int = 0
    gave_up: bool = False  # the budget ran out before every set of size <= k was checked

    def to_json(self, with_plans: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "failures": self.k,
            "survives": self.survives,
            "tolerated": self.tolerated,
            "tolerated_exact": self.tolerated_exact,
            "breaking": None if self.breaking is None else self.breaking.to_json(),
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
            b = -1 if p is None or p.standby is None or not mirrored else self.index.get(
                p.standby, -1
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
        self, units: list[tuple[int, int, int, int]], fm: list[int], fc: list[int],
        alive: list[int], worst: bool,
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
        self, units: list[tuple[int, int, int, int]], fm: list[int], fc: list[int],
        alive: list[int],
    ) -> tuple[list[tuple[int, int, int]] | None, bool]:
        """Exhaustive search: (placement, True) / (None, True: none exists) / (None, False)."""
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

        def rec(j: int) -> bool:
            nonlocal nodes
            nodes += 1
            if nodes > EXACT_MAX_NODES:
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
        self, units: list[tuple[int, int, int, int]], placed: list[tuple[int, int, int]],
        be_out: list[tuple[int, int]], failed: set[int],
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
                    out.append(((rank, self.order[i], names[i]),
                                Move(names[i], PROMOTE, hosts[b], mem[i])))
                mk = STANDBY
            out.append(((rank, self.order[i], names[i]), Move(names[i], mk, hosts[h], mem[i])))
        for i, h in be_out:
            move = Move(names[i], BEST_EFFORT, hosts[h], mem[i])
            out.append(((2, self.order[i], names[i]), move))
        out.sort(key=lambda t: t[0])  # stable: promote before its new standby
        return [m for _, m in out]

    def _failing(
        self, failed: tuple[str, ...], failed_idx: set[int],
        units: list[tuple[int, int, int, int]], alive: list[int], proven: bool, moves: bool,
    ) -> FailurePlan:
        """What a failing set leaves out: place greedily in priority order, name the rest."""
        fm, fc = self.free_m[:], self.free_c[:]
        ordered = sorted(units, key=lambda u: (self.prio[u[2]] != "mirrored", self.order[u[2]],
                                               -u[0], u[2]))
        unplaced: list[str] = []
        short = 0
        out: list[Move] = []
        for mem, kind, i, forbid in ordered:
            c = self.cpu[i]
            need = [forbid] if kind != _PAIR else [-1, -2]
            got: list[int] = []
            for fb in need:
                fb2 = got[0] if fb == -2 else fb
                h = -1
                for x in alive:
                    if x != fb2 and fm[x] >= mem and fc[x] >= c and (h < 0 or fm[x] > fm[h]):
                        h = x
                if h < 0:
                    break
                fm[h] -= mem
                fc[h] -= c
                got.append(h)
            if len(got) < len(need):
                for h in got:
                    fm[h] += mem
                    fc[h] += c
                unplaced.append(self.names[i])
                short += mem * (len(need) - len(got))
                continue
            if moves:
                kinds = [RESTART, STANDBY] if kind == _PAIR else [
                    RESTART if kind == _RUN else STANDBY]
                for kk, h in zip(kinds, got, strict=True):
                    out.append(Move(self.names[i], kk, self.hosts[h], mem))
        # the shortfall is at least what the totals say is missing
        need_total = sum(u[0] * (2 if u[1] == _PAIR else 1) for u in units)
        short = max(short, need_total - sum(max(0, self.free_m[h]) for h in alive))
        _, be = self._units(failed_idx)
        return FailurePlan(failed, out, sorted(unplaced), short,
                           [self.names[i] for i in be], proven)


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

    for size in range(0, limit + 1):
        count = math.comb(n, size)
        fast = composer is not None and size >= 2
        if size > k and (per_composed if fast else per_set) * count > extra_budget_s:
            res.tolerated_exact = False
            break
        ok = True
        t_size = time.perf_counter()
        sets: Any = (
            (tuple(hosts[i] for i in fs) for fs in composer.unverified(size))  # type: ignore[union-attr]
            if fast else itertools.combinations(hosts, size)
        )
        planned = 0
        for fs in sets:
            if time.perf_counter() - t0 > budget_s and size <= k:
                return gave_up()
            want = keep == "all" or (keep == "single" and size <= 1)
            fp = pl.plan(fs, moves=want)
            planned += 1
            if want and size <= max(k, 1):
                res.plans[fp.failed] = fp
            if not fp.ok:
                res.breaking = fp
                ok = False
                break
        res.checked += count if fast and ok else planned
        if not ok:
            break
        res.tolerated = size
        spent = time.perf_counter() - t0
        if fast:
            per_composed = max(per_composed, (time.perf_counter() - t_size) / max(1, count))
        else:
            per_set = spent / max(1, res.checked)
    res.survives = res.tolerated >= k
    res.seconds = time.perf_counter() - t0
    return res
