"""The pool's host agent and, in whichever agent leads, the pool controller.

Each host runs ``mirror pool agent --host NAME``.  It

- registers the host: a lease, and ``members/NAME`` attached to it, written
  in the same transaction that marks the host as having an agent; it keeps
  the lease alive.  A host whose lease expires is dead;
- runs the VMs placed on it: one process per VM (``mirror.pool.vmproc``, a
  stand-in for the hypervisor's VM), started when a placement names this
  host, stopped when it no longer does, restarted if it exits.  A host that
  is not ``up`` (declared dead, or in maintenance) runs nothing.  Before it
  starts a VM it creates ``running/VM`` attached to its lease, in a
  transaction that fails if another host holds it: a VM moved away from a
  live host starts on its new host only once the old one has stopped it
  (a dead host's key goes with its lease).  An agent that cannot renew its
  lease for 70 % of its TTL stops its VMs (it may be declared dead);
- takes part in electing the controller: ``leader`` is created, attached to
  the agent's lease, by whoever gets there first (a transaction), and
  passes to another agent when the leader's lease expires.

The controller (leader only), every tick: a host with an agent, ``up``, whose
member key has gone is declared dead (one transaction); then it carries out
the plan for what lost its place, VM by VM in priority order (mirrored pairs
first: the pair's own controller promotes the standby, the pool records the
promotion and reserves the new standby on the planned host; then ``restart``
VMs by their order; then best-effort ones if room is left).  Each VM's move
is one transaction that also creates ``claims/VM/EPOCH``: it commits only if
nobody moved that VM away from that placement before, so a VM is never
placed twice, even across a change of leader in mid-recovery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.pool import admission
from mirror.pool.etcd import Etcd, EtcdError, absent, delete_op, mod_is, put_op, range_op
from mirror.pool.model import Pool, PoolError
from mirror.pool.planner import FailurePlan, Planner, analyse
from mirror.pool.store import Conflict, Snapshot, Store

log = logging.getLogger("mirror.pool.agent")


class HostAgent:
    def __init__(
        self, etcd_url: str, host: str, ttl: int = 3, run_dir: Path | None = None,
        mem_mb: int | None = None, vcpus: int | None = None, interval: float | None = None,
    ) -> None:
        self.etcd = Etcd(etcd_url, timeout=max(1.0, ttl / 2))
        self.store = Store(self.etcd)
        self.host = host
        self.ttl = ttl
        self.run_dir = run_dir
        self.mem_mb, self.vcpus = mem_mb, vcpus
        self.interval = interval if interval is not None else min(1.0, ttl / 4)
        self.lease = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.leader = False

    # -- membership ----------------------------------------------------------------------------

    def register(self) -> None:
        lease = self.etcd.grant(self.ttl)
        member = json.dumps({"pid": os.getpid(), "since": time.time()})

        def change(snap: Snapshot) -> tuple[Pool, Any, None]:
            pool = snap.pool
            if self.host not in pool.hosts:
                if self.mem_mb is None or self.vcpus is None:
                    raise PoolError(
                        f"unknown host {self.host!r}: add it with `mirror pool host add` "
                        f"or give the agent --mem and --vcpus"
                    )
                pool = admission.add_host(pool, self.host, self.mem_mb, self.vcpus,
                                          keep="single").pool
            else:
                pool = pool.copy()
            h = pool.hosts[self.host]
            state = "up" if h.state == "dead" else h.state
            pool.hosts[self.host] = replace(h, agent=True, state=state)
            return pool, analyse(pool, keep="single"), None

        self.store.mutate(change, extra=[put_op(self.store.key("members", self.host), member,
                                                lease)])
        self.lease = lease
        log.info("host %s registered (lease %x, ttl %d s)", self.host, lease, self.ttl)

    def keepalive(self) -> None:
        if self.etcd.keepalive(self.lease) <= 0:
            log.warning("host %s lost its lease: registering again", self.host)
            self.leader = False
            self.register()

    def try_lead(self, snap: Snapshot) -> None:
        key = self.store.key("leader")
        if snap.leader == self.host:
            kv = self.etcd.get(key)
            self.leader = kv is not None and kv.lease == self.lease
            return
        if snap.leader is not None:
            self.leader = False
            return
        body = json.dumps({"host": self.host, "pid": os.getpid()})
        ok, _ = self.etcd.txn([absent(key)], [put_op(key, body, self.lease)])
        if ok:
            log.info("host %s leads the pool controller", self.host)
        self.leader = ok

    # -- VMs on this host ----------------------------------------------------------------------

    def reconcile(self, snap: Snapshot) -> None:
        pool = snap.pool
        me = pool.hosts.get(self.host)
        mine: set[str] = set()
        if me is not None and me.state == "up":
            mine = {v for v, p in pool.placements.items() if p.host == self.host}
        for vm in sorted(set(self.procs) - mine):
            self._stop(vm)
        for vm in sorted(mine):
            p = self.procs.get(vm)
            if p is not None and p.poll() is None:
                continue
            if p is not None:
                log.warning("VM %s exited (%s): starting it again", vm, p.returncode)
            self._start(vm)

    def _start(self, vm: str) -> None:
        # runtime guard against running a VM twice: running/VM, attached to this host's
        # lease, is created only if nobody holds it (a dead host's key goes with its lease)
        key = self.store.key("running", vm)
        body = json.dumps({"host": self.host, "time": time.time()})
        ok, resp = self.etcd.txn([absent(key)], [put_op(key, body, self.lease)],
                                 [range_op(key)])
        if not ok:
            kvs = Etcd.range_kvs(resp[0]) if resp else []
            holder = json.loads(kvs[0].value).get("host") if kvs else None
            if not kvs or holder != self.host or kvs[0].lease != self.lease:
                log.info("VM %s: waiting for %s to stop it", vm, holder)
                return
        cmd = [sys.executable, "-m", "mirror.pool.vmproc", vm, self.host]
        if self.run_dir is not None:
            cmd.append(str(self.run_dir / "vms.log"))
        self.procs[vm] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        log.info("VM %s started on %s (pid %d)", vm, self.host, self.procs[vm].pid)

    def _stop(self, vm: str, release: bool = True) -> None:
        p = self.procs.pop(vm)
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.info("VM %s stopped on %s", vm, self.host)
        if release:
            key = self.store.key("running", vm)
            kv = self.etcd.get(key)
            if kv is not None and kv.lease == self.lease:
                self.etcd.txn([mod_is(key, kv.mod_revision)], [delete_op(key)])

    def stop_all(self, release: bool = True) -> None:
        for vm in list(self.procs):
            self._stop(vm, release)

    def fence(self) -> None:
        """No lease renewed for most of its TTL: it may have expired and the controller
        may be restarting this host's VMs elsewhere, so stop them here now."""
        if self.procs:
            log.warning("host %s cannot renew its lease: stopping its %d VM(s)",
                        self.host, len(self.procs))
            self.stop_all(release=False)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self.register()
        next_keepalive = 0.0
        renewed = time.monotonic()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now - renewed > 0.7 * self.ttl:
                    self.fence()
                try:
                    if now >= next_keepalive:
                        self.keepalive()
                        renewed = time.monotonic()
                        next_keepalive = now + self.ttl / 3
                    snap = self.store.load()
                    self.reconcile(snap)
                    self.try_lead(snap)
                    if self.leader:
                        Controller(self.store, self.host).step(snap)
                except (EtcdError, Conflict) as e:
                    log.warning("host %s: %s", self.host, e)
                stop.wait(self.interval)
        finally:
            with contextlib.suppress(EtcdError):
                self.stop_all()
            if self.lease:
                with contextlib.suppress(EtcdError):
                    self.etcd.revoke(self.lease)
        return 0


class Controller:
    """The pool controller's work for one tick (run by the leading agent)."""

    def __init__(self, store: Store, me: str) -> None:
        self.store = store
        self.me = me

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
            claim = self.store.key("claims", vm, str(p.epoch))
            body = json.dumps({"node": self.me, "action": "move", "time": time.time()})
            ev = self.store.event_op({
                "event": "moved" if moves else "no-room", "vm": vm, "by": self.me,
                "from": {"host": p.host, "standby": p.standby, "epoch": p.epoch},
                "moves": [m.to_json() for m in moves],
            })
            try:
                self.store.commit(snap, after, None, extra=[put_op(claim, body), ev],
                                  compares=[absent(claim)])
            except Conflict:
                log.info("controller %s: pool changed under the move of %s", self.me, vm)
                return self.store.load()
            log.warning("controller %s: %s %s", self.me, vm,
                        ", ".join(f"{m.kind} on {m.to}" for m in moves) or "has no room")
            snap = self.store.load()
        return snap


def stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
