"""The pool controller: the work of whichever pool agent leads (mirror/pool/poolagent.py).

Every tick: a host with a pool agent, ``up``, whose member key has gone is declared dead
(one transaction); then it carries out the plan for what lost its place, VM by VM in
priority order (mirrored pairs first: the pair's own failover rules promote the standby,
the pool records the promotion, for a real pair only once the standby has won the
pair's promotion claim on etcd, and reserves the new standby on the planned host, where
the pool agent starts ``mirror secondary`` and the promoted primary pairs with it under the
next generation; a standby that has not promoted in time never will: the pool takes
its generation's "restart" claim, mirror/ha/claims.py, and the pair restarts fresh; then
``restart`` VMs by their order; then best-effort ones if room is left).  Each VM's move
is one transaction that also creates ``claims/VM/EPOCH``: it commits only if nobody
moved that VM away from that placement before, so a VM is never placed twice, even
across a change of leader in mid-recovery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import replace

from mirror.ha import claims
from mirror.ha.etcd import absent, put_op
from mirror.pool import admission
from mirror.pool.analysis import analyse
from mirror.pool.model import PairSpec
from mirror.pool.planner import FailurePlan, Planner
from mirror.pool.store import Conflict, Snapshot, Store

log = logging.getLogger("mirror.pool.poolagent")  # the pool agent's log, as before the split

PROMOTE_WAIT_S = 10.0  # a real pair's standby that has not promoted by then never will


class PoolController:
    """The pool controller's work for one tick (run by the leading pool agent)."""

    def __init__(self, store: Store, me: str, waits: dict[str, float] | None = None,
                 promote_wait: float = PROMOTE_WAIT_S) -> None:
        self.store = store
        self.me = me
        self.waits = {} if waits is None else waits  # VM -> since when (monotonic)
        self.promote_wait = promote_wait

    def step(self, snap: Snapshot) -> None:
        pool = snap.pool
        dead = [h for h in pool.up_hosts() if pool.hosts[h].agent and h not in snap.members]
        if dead:
            after = pool.copy()
            for h in dead:
                after.set_host_state(h, "dead")
            planned = (snap.plan or {}).get("single_failure_plans", {})
            events = [self.store.event_op({"event": "host-dead", "host": h, "by": self.me,
                                           "planned": planned.get(h)}) for h in dead]
            self.store.commit(snap, after, None, extra=events)
            log.warning("controller %s: host(s) %s declared dead", self.me, ", ".join(dead))
            snap = self.store.load()
        snap = self.note_handovers(snap)
        fp = Planner(snap.pool).plan(())
        if fp.moves or fp.unplaced or fp.lost:
            snap = self.carry_out(snap, fp)
        if snap.plan is None or snap.plan.get("version") != snap.version:
            a = analyse(snap.pool, keep="single")
            self.store.commit(snap, snap.pool, a)

    def carry_out(self, snap: Snapshot, fp: FailurePlan) -> Snapshot:
        order: list[str] = []
        for m in fp.moves:
            if m.vm not in order:
                order.append(m.vm)
        for vm in order + [v for v in fp.unplaced + fp.lost if v not in order]:
            moves = [m for m in fp.moves if m.vm == vm]
            p = snap.pool.placements.get(vm)
            if p is None:
                continue
            after = snap.pool.copy()
            gone = tuple(h for h in (p.host, p.standby)
                         if h is not None and after.hosts.get(h) is not None
                         and after.hosts[h].state != "up")
            admission.apply_plan(after, FailurePlan(gone, moves, [], 0, []))
            if not moves:  # no room: it stops running where it was (a dead host)
                after.place(vm, None if p.host in gone else p.host,
                            None if p.standby in gone else p.standby)
            q = after.placements[vm]
            if (q.host, q.standby) == (p.host, p.standby):
                continue
            pair = snap.pool.pairs.get(vm)
            # no-room: beyond what the pool tolerates, it stays down (a guaranteed VM with no
            # live copy left, or a best-effort one) or runs on without a standby
            what = "moved" if moves else "no-room"
            if pair is not None and p.host in gone:
                if p.standby is not None and p.standby not in gone:
                    # the pair's own controller promotes its standby: record it only once
                    # the standby has won the promotion claim on the arbiter
                    g = self.promotion(pair, p.standby)
                    if g is None:
                        since = self.waits.setdefault(vm, time.monotonic())
                        if time.monotonic() - since < self.promote_wait:
                            log.info("controller %s: %s waits for its standby on %s to "
                                     "promote", self.me, vm, p.standby)
                            continue
                        g, promoted = claims.preempt(self.store.etcd, self.store.arbiter,
                                                     pair.pair, p.standby)
                        if not promoted:  # it never will: restart the VM as a fresh pair
                            after = snap.pool.copy()
                            after.place(vm, None, None)
                            moves, what = [], "pair-not-promoted"
                            log.warning("controller %s: %s: its standby on %s did not promote "
                                        "in %.0f s; the pool took claim generation-%d: it "
                                        "restarts as a fresh pair", self.me, vm, p.standby,
                                        self.promote_wait, g)
                    self.waits.pop(vm, None)
                    after.pairs[vm] = replace(pair, seen_generation=g)
                else:  # both hosts lost: it restarts as a fresh pair
                    after.pairs[vm] = replace(pair, seen_generation=max(
                        [pair.seen_generation, *claims.held(self.store.etcd, self.store.arbiter,
                                                            pair.pair)]))
            claim = self.store.key("claims", vm, str(p.epoch))
            body = json.dumps({"node": self.me, "action": "move", "time": time.time()})
            ev = self.store.event_op({
                "event": what, "vm": vm, "by": self.me,
                "from": {"host": p.host, "standby": p.standby, "epoch": p.epoch},
                "moves": [m.to_json() for m in moves],
                **({"down": vm in fp.down or vm in fp.lost, "needs_mb": fp.needs.get(vm)}
                   if vm in fp.unplaced or vm in fp.lost else {}),
            })
            try:
                self.store.commit(snap, after, None, extra=[put_op(claim, body), ev],
                                  compares=[absent(claim)])
            except Conflict:
                log.info("controller %s: pool changed under the move of %s", self.me, vm)
                return self.store.load()
            log.warning("controller %s: %s %s", self.me, vm,
                        ", ".join(f"{m.kind} on {m.to}" for m in moves) or what)
            snap = self.store.load()
        return snap


    def note_handovers(self, snap: Snapshot) -> Snapshot:
        """A pair whose standby took over where the pool had already placed it (a handover
        on maintenance): note the promotion's generation as seen."""
        after = None
        for vm, pair in snap.pool.pairs.items():
            p = snap.pool.placements.get(vm)
            if p is None or p.host is None or snap.pool.hosts[p.host].state != "up":
                continue
            g = self.promotion(pair, p.host)
            if g is not None:
                after = after or snap.pool.copy()
                after.pairs[vm] = replace(pair, seen_generation=g)
        if after is None:
            return snap
        with contextlib.suppress(Conflict):
            self.store.commit(snap, after, None)
        return self.store.load()

    def promotion(self, pair: PairSpec, standby: str) -> int | None:
        """The generation whose promotion ``standby`` won, if it won one the pool has not
        acted on yet; else None (it has not promoted, or not yet)."""
        won = claims.unrecorded_promotion(self.store.etcd, self.store.arbiter, pair.pair,
                                          pair.seen_generation, standby)
        return None if won is None else won[0]
