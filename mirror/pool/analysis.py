"""Analysis: does the pool survive ANY k host failures, and how many does it tolerate?

:func:`analyse` plans every failure set of up hosts of size 0..k with the
:class:`~mirror.pool.planner.Planner` (every set is enumerated: no sampling,
no pruning), then, while its time budget lasts, looks further for the largest
k the pool tolerates.  Its answer is an :class:`Analysis`: whether the pool
survives k, the largest k proved, the first failure set that breaks, and the
plans asked for.  Sets of size >= 2 are first checked by composing
single-failure plans (:class:`_Composer`, with numpy when it is installed);
a set the composition cannot prove is planned from scratch.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from mirror.pool.model import Pool
from mirror.pool.planner import FailurePlan, Planner

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional: the composed check is skipped
    np = None  # type: ignore[assignment]


BOUND_NOTE = (
    "a proof that the pool does not tolerate more failures than 'tolerated': one larger "
    "failure set and what finds no room after it, checked without planning moves; not a "
    "plan the controller would carry out (`mirror pool plan --failures N` shows those)")


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
            # a proof of the bound on ``tolerated``, not a plan: planned without moves
            "breaks_beyond": None if self.breaks_beyond is None
            else {"proof_only": True, "note": BOUND_NOTE, **self.breaks_beyond.to_json()},
            "checked_failure_sets": self.checked,
            "seconds": round(self.seconds, 4),
            "gave_up": self.gave_up,
        }
        if with_plans:
            d["plans"] = [p.to_json() for p in self.plans.values()]
        return d


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
        if not broken and size > k and \
                (per_composed if fast else per_set) * count > extra_budget_s:
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
