"""The failure planner: for one set of failed hosts, where does every VM it displaces go?

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

Packing (:mod:`mirror.pool.packing`): guaranteed demands largest first onto
the surviving host with the most free memory (worst-fit decreasing, a heap),
then first-fit decreasing if that fails; if both fail and the failure set's
demands are few (small pools) an exhaustive search decides exactly.  So on
small pools a failure set is called unsurvivable only when no placement
exists, and on large ones the planner may say "cannot prove" but every plan
it returns has been built and checked against capacity for that exact
failure set.  The plan (:class:`FailurePlan`) lists its :class:`Move` s in the
order the pool controller carries them out.  Whether the pool survives ANY k
host failures is :mod:`mirror.pool.analysis`: every failure set of size <= k
is enumerated, there is no sampling and no pruning of sets.

A failure set that cannot be fully survived (beyond what the pool tolerates)
still gets a plan (:meth:`Planner._failing`): every VM with a live copy
keeps running (a surviving standby is promoted), then what lost every copy
restarts in priority and restart order where it fits, then re-protection,
then best-effort VMs; what finds no room is named with the memory it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mirror.pool.model import Pool
from mirror.pool.packing import (
    EXACT_MAX_NODES,
    EXACT_MAX_UNITS,
    PAIR,
    RUN,
    STBY,
    exact,
    fitter,
    greedy,
    pack_runs,
)

# kinds of move
PROMOTE = "promote"  # the standby host runs the VM now (the pair's own failover)
STANDBY = "standby"  # a new standby reservation
RESTART = "restart"  # a guaranteed VM starts on the host
BEST_EFFORT = "best-effort"  # a best-effort VM starts on the host

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
                    units.append((self.mem[i], PAIR, i, -1))
                elif pdead:
                    units.append((self.mem[i], STBY, i, b))  # promoted on b; standby elsewhere
                elif sdead:
                    units.append((self.mem[i], STBY, i, a))
            elif pdead:
                if pr == "restart":
                    units.append((self.mem[i], RUN, i, -1))
                else:
                    be.append(i)
        # largest first; at equal size pairs first (two placements), then by name
        units.sort(key=lambda u: (-u[0], u[1] != PAIR, u[2]))
        be.sort(key=lambda i: (self.order[i], -self.mem[i], i))
        return units, be

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
            self._rings[x] = greedy(units, self.cpu, fm, fc, order, worst=False)
        return self._rings[x]

    def _composed(
        self, failed: set[int], fm: list[int], fc: list[int]
    ) -> list[tuple[int, int, int]] | None:
        """Every failed host's ring plan at once, if they do not touch (see analysis._Composer)."""
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
            out += [(i, RUN, run), (i, STBY, standby)]
        return out

    def plan(self, failed_names: tuple[str, ...] | list[str], moves: bool = True) -> FailurePlan:
        failed = {self.index[h] for h in failed_names} | self.down
        alive = [h for h in range(len(self.hosts)) if h not in failed]
        units, be = self._units(failed)
        fm, fc = self.free_m[:], self.free_c[:]
        placed = greedy(units, self.cpu, fm, fc, alive, worst=True)
        proven = True
        if placed is None:
            fm, fc = self.free_m[:], self.free_c[:]
            placed = greedy(units, self.cpu, fm, fc, alive, worst=False)
        if placed is None and len(failed) >= 2 and not self.always:
            fm, fc = self.free_m[:], self.free_c[:]
            placed = self._composed(failed, fm, fc)
        if placed is None:
            fm, fc = self.free_m[:], self.free_c[:]
            need = sum(u[0] * (2 if u[1] == PAIR else 1) for u in units)
            if need > sum(fm[h] for h in alive):
                proven = True  # not enough memory in total: no placement exists
            elif len(units) <= EXACT_MAX_UNITS:
                placed, proven = exact(units, self.cpu, fm, fc, alive)
            else:
                proven = False
        failed_t = tuple(sorted(failed_names))
        if placed is None:
            return self._failing(failed_t, failed, units, alive, proven, moves)
        # best-effort VMs in restart order, wherever room is left (most free memory first)
        lost = []
        be_out = []
        if be:
            fit = fitter(fm, fc, alive, True)
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
            if kind == RUN:
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

    def _rank(self, i: int) -> tuple[int, int, int, str]:
        """The order VMs get room in beyond the guarantee: mirrored, then restart, then
        best-effort; within a priority by restart order, then smaller first (so that more
        VMs run), then by name."""
        return (_PRIO_RANK[self.prio[i]], self.order[i], self.mem[i], self.names[i])

    def _failing(
        self, failed: tuple[str, ...], failed_idx: set[int],
        units: list[tuple[int, int, int, int]], alive: list[int], proven: bool, moves: bool,
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
            if kind == STBY:
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
            fit = fitter(left_m, left_c, alive, True)
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
            placed, sure = pack_runs([*chosen, i], self.mem, self.cpu, fm, fc, alive, budget)
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
            h = fitter(left_m, left_c, alive, True)(self.mem[i], self.cpu[i], -1)
            if h >= 0:
                chosen.append(i)
                where[i] = h
            else:
                still_down.append(i)
        for i in chosen:
            if self.prio[i] == "mirrored":
                protect[i] = where[i]
        standby: dict[int, int] = {}
        fit = fitter(left_m, left_c, alive, True)
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
        return FailurePlan(failed, out, sorted(needs), sum(needs.values()), lost, proven,
                           down=sorted(self.names[i] for i in still_down), needs=needs,
                           optimal=optimal)
