"""Admission control: every change to the pool is planned before it is made.

An operation returns the new pool and its analysis, or raises
:class:`Refused` (nothing changes) when the new pool would no longer survive
every failure set of size ``failures_to_tolerate``, naming the failure set
that breaks and by how much memory.  With ``allow_overcommit`` the operation
goes through and the result carries a warning that names the VMs that would
not restart.

Operations that can only free room (removing a VM, ending maintenance,
adding a host) are never refused.  A change the pool has no room for at all (a
VM that fits on no up host, a resize its host cannot hold, a maintenance whose
VMs cannot all be moved, removing a host that still holds VMs) is refused too
(:class:`Refused`, exit 1); bad input is a :class:`PoolError` (exit 2).

Best-effort VMs are admission-checked like any VM: a running best-effort VM
keeps its memory when hosts fail (a failover never preempts it), so starting or
growing one takes room the guarantee may need.  "Best effort" is about its own
restart: after a failure it restarts only where room is left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mirror.pool.analysis import Analysis, analyse
from mirror.pool.model import PRIORITIES, VM, Host, Pool, PoolError
from mirror.pool.planner import FailurePlan, Planner


class Refused(PoolError):
    """Admission control refused the operation; the message explains which failure breaks."""

    def __init__(self, message: str, analysis: Analysis | None = None) -> None:
        super().__init__(message)
        self.analysis = analysis  # None: refused for room before any failure was planned


@dataclass
class Outcome:
    pool: Pool
    analysis: Analysis
    warning: str | None = None  # set when allow_overcommit let a breaking change through
    summary: str = ""


# `vm add` without --host tries this many hosts (most free memory first), and for a mirrored
# VM this many standby hosts for each: at most PLACEMENT_CHOICES ** 2 placements are planned
PLACEMENT_CHOICES = 6


def describe_vms(fp: FailurePlan) -> str:
    """The VMs a failing plan leaves without room, each with the memory it lacks."""
    parts = []
    for v in fp.unplaced:
        need = fp.needs.get(v, 0)
        if v in fp.down:
            parts.append(f"{v} (does not run: needs {need} MiB)")
        else:
            parts.append(f"{v} (runs unprotected: needs {need} MiB for a standby)")
    return ", ".join(parts)


def describe_break(a: Analysis) -> str:
    fp = a.breaking
    if a.gave_up:
        return (
            f"the planner could not check every failure set of size <= {a.k} within its "
            f"budget ({a.checked} checked), so it cannot prove {a.k}"
        )
    if fp is None:
        return f"the pool tolerates {a.tolerated} host failure(s), not {a.k}"
    what = "with no host failed" if not fp.failed else "if " + ", ".join(fp.failed) + (
        " fails" if len(fp.failed) == 1 else " fail"
    )
    proof = "" if fp.proven else " (the planner found no placement; it cannot prove none exists)"
    return (
        f"{what}, {len(fp.unplaced)} protected VM(s) find no room: "
        f"{describe_vms(fp)}; short by {fp.shortfall_mb} MiB{proof}. "
        f"The pool would tolerate {a.tolerated} host failure(s), not {a.k}"
    )


def _admit(after: Pool, what: str, may_break: bool, *, subject: str | None = None,
           **kw: Any) -> Outcome:
    """Plan ``after``; refuse it (or warn, with allow_overcommit) if it breaks k and the
    change may break it.  ``subject``: the VM the change starts or grows."""
    after.check()
    a = analyse(after, **kw)
    if a.survives or not may_break:
        return Outcome(after, a, None, what)
    msg = f"{what}: {describe_break(a)}"
    if subject is not None and after.vms[subject].priority == "best-effort":
        msg += (" (a running best-effort VM keeps its memory when hosts fail: failed-over VMs "
                "never preempt it, so it needs room like any VM)")
    if after.allow_overcommit:
        return Outcome(after, a, f"WARNING: overcommitted: {msg}", what)
    raise Refused(f"refused: {msg} (allow_overcommit is off)", a)


def _need_host(pool: Pool, name: str) -> Host:
    h = pool.hosts.get(name)
    if h is None:
        known = ", ".join(sorted(pool.hosts)) or "none"
        raise PoolError(f"unknown host {name!r} (hosts: {known})")
    return h


def _need_vm(pool: Pool, name: str) -> VM:
    v = pool.vms.get(name)
    if v is None:
        raise PoolError(f"unknown VM {name!r}")
    return v


def _check_size(what: str, mem_mb: int, vcpus: int) -> None:
    if not 1 <= mem_mb <= 1 << 30:
        raise PoolError(f"{what}: memory must be 1..{1 << 30} MiB, got {mem_mb}")
    if not 1 <= vcpus <= 1 << 16:
        raise PoolError(f"{what}: vCPUs must be 1..{1 << 16}, got {vcpus}")


def _check_name(kind: str, name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise PoolError(f"bad {kind} name {name!r}: 1..64 letters, digits, '-', '_' or '.'")


def add_host(pool: Pool, name: str, mem_mb: int, vcpus: int, **kw: Any) -> Outcome:
    _check_name("host", name)
    _check_size(f"host {name}", mem_mb, vcpus)
    if name in pool.hosts:
        raise PoolError(f"host {name} already exists")
    after = pool.copy()
    after.hosts[name] = Host(name, mem_mb, vcpus)
    return _admit(after, f"add host {name}", may_break=False, **kw)


def remove_host(pool: Pool, name: str, **kw: Any) -> Outcome:
    _need_host(pool, name)
    on = pool.vms_on(name)
    if on:
        raise Refused(
            f"refused: host {name} still holds {len(on)} VM(s) or standby(s) "
            f"({', '.join(on[:8])}): put it into maintenance first (that moves them), or "
            f"remove them"
        )
    after = pool.copy()
    del after.hosts[name]
    return _admit(after, f"remove host {name}", may_break=True, **kw)


def maintenance(pool: Pool, name: str, on: bool, **kw: Any) -> Outcome:
    """Enter maintenance: move the host's VMs and standbys as if it had failed."""
    h = _need_host(pool, name)
    after = pool.copy()
    if not on:
        if h.state != "maintenance":
            raise PoolError(f"host {name} is not in maintenance (it is {h.state})")
        after.set_host_state(name, "up")
        return _admit(after, f"end maintenance of {name}", may_break=False, **kw)
    if h.state != "up":
        raise PoolError(f"host {name} is {h.state}: only an up host can enter maintenance")
    fp = Planner(pool).plan((name,))
    if not fp.ok:
        raise Refused(
            f"refused: maintenance of {name}: its VMs cannot all be moved: "
            f"{describe_vms(fp)} find no room (short by {fp.shortfall_mb} MiB)"
        )
    apply_plan(after, fp)
    after.set_host_state(name, "maintenance")
    for v in fp.lost:  # best-effort VMs with no room stop
        after.place(v, None)
    return _admit(after, f"maintenance of {name}", may_break=True, **kw)


def apply_plan(pool: Pool, fp: FailurePlan) -> list[str]:
    """Carry out a failure plan on the model; returns the VMs whose placement changed."""
    changed: list[str] = []
    for m in fp.moves:
        p = pool.placements.get(m.vm)
        host, standby = (p.host, p.standby) if p else (None, None)
        if m.kind == "promote":
            host, standby = m.to, None
        elif m.kind == "standby":
            standby = m.to
        else:  # restart, best-effort
            host = m.to
            if pool.vms[m.vm].priority == "mirrored" and standby in fp.failed:
                standby = None
        pool.place(m.vm, host, standby)
        if m.vm not in changed:
            changed.append(m.vm)
    for v in fp.unplaced + fp.lost:
        p = pool.placements.get(v)
        if p is None:
            continue
        host = None if p.host in fp.failed else p.host
        standby = None if p.standby in fp.failed else p.standby
        if (host, standby) != (p.host, p.standby):
            pool.place(v, host, standby)
            changed.append(v)
    return changed


def _choose(pool: Pool, vm: VM, host: str | None, standby: str | None,
            **kw: Any) -> tuple[Pool, Outcome | None, Refused | None]:
    """Try placements for a new VM (largest free memory first); the first admitted wins."""
    free = pool.free()
    ups = [h for h in pool.up_hosts() if free[h][0] >= vm.mem_mb and free[h][1] >= vm.vcpus]
    ups.sort(key=lambda h: (-free[h][0], h))
    hosts = [host] if host else ups[:PLACEMENT_CHOICES]
    if not hosts:
        raise Refused(
            f"refused: VM {vm.name} ({vm.mem_mb} MiB, {vm.vcpus} vCPUs) fits on no up host now "
            + _largest(pool)
        )
    first_refusal: Refused | None = None
    tried = 0
    for h in hosts:
        sbs: list[str | None] = [None]
        if vm.priority == "mirrored":
            sbs = [standby] if standby else list[str | None](
                [x for x in ups if x != h][:PLACEMENT_CHOICES])
            if not sbs:
                raise Refused(
                    f"refused: mirrored VM {vm.name} needs a second up host with "
                    f"{vm.mem_mb} MiB free for its standby: none has it"
                )
        for s in sbs:
            tried += 1
            after = pool.copy()
            after.vms[vm.name] = vm
            after.place(vm.name, h, s)
            try:
                after.check()
            except PoolError as e:
                raise Refused(f"refused: VM {vm.name} does not fit there: {e}") from None
            try:
                return after, _admit(after, f"start VM {vm.name} on {h}"
                                     + (f" (standby on {s})" if s else ""), True, subject=vm.name,
                                     **kw), None
            except Refused as r:
                first_refusal = first_refusal or r
    assert first_refusal is not None
    if host is None or (vm.priority == "mirrored" and standby is None):
        first_refusal = Refused(
            f"{first_refusal} [{tried} placement(s) tried: the up hosts with the most free "
            f"memory, at most {PLACEMENT_CHOICES}" + (f", each with at most {PLACEMENT_CHOICES} "
            "standby hosts" if vm.priority == "mirrored" else "") + "; give --host/--standby "
            "to try others]", first_refusal.analysis)
    return pool, None, first_refusal


def _largest(pool: Pool) -> str:
    free = pool.free()
    ups = pool.up_hosts()
    if not ups:
        return "(no host is up)"
    best = max(ups, key=lambda h: free[h][0])
    return f"(most free: {best} with {free[best][0]} MiB, {free[best][1]} vCPUs)"


def add_vm(
    pool: Pool, name: str, mem_mb: int, vcpus: int, priority: str, order: int = 0,
    host: str | None = None, standby: str | None = None, **kw: Any,
) -> Outcome:
    _check_name("VM", name)
    _check_size(f"VM {name}", mem_mb, vcpus)
    if priority not in PRIORITIES:
        raise PoolError(f"bad priority {priority!r}: one of {', '.join(PRIORITIES)}")
    if name in pool.vms:
        raise PoolError(f"VM {name} already exists")
    for h in (host, standby):
        if h is not None and _need_host(pool, h).state != "up":
            raise PoolError(f"host {h} is {pool.hosts[h].state}: VMs start only on up hosts")
    if standby is not None and priority != "mirrored":
        raise PoolError("--standby is only for mirrored VMs")
    if standby is not None and standby == host:
        raise PoolError("a mirrored VM's standby must be on another host than the VM")
    if not any(h.mem_mb >= mem_mb and h.vcpus >= vcpus for h in pool.hosts.values()):
        raise PoolError(
            f"VM {name} ({mem_mb} MiB, {vcpus} vCPUs) is larger than every host of the pool"
        )
    _, out, refusal = _choose(pool, VM(name, mem_mb, vcpus, priority, order), host, standby, **kw)
    if out is None:
        assert refusal is not None
        raise refusal
    return out


def remove_vm(pool: Pool, name: str, **kw: Any) -> Outcome:
    _need_vm(pool, name)
    after = pool.copy()
    del after.vms[name]
    after.placements.pop(name, None)
    after.pairs.pop(name, None)
    return _admit(after, f"remove VM {name}", may_break=False, **kw)


def resize_vm(pool: Pool, name: str, mem_mb: int, vcpus: int | None = None,
              **kw: Any) -> Outcome:
    vm = _need_vm(pool, name)
    vcpus = vm.vcpus if vcpus is None else vcpus
    _check_size(f"VM {name}", mem_mb, vcpus)
    after = pool.copy()
    after.vms[name] = replace(vm, mem_mb=mem_mb, vcpus=vcpus)
    try:
        after.check()
    except PoolError as e:
        raise Refused(f"refused: resize of VM {name}: its host has no room: {e}") from None
    grows = mem_mb > vm.mem_mb or vcpus > vm.vcpus
    return _admit(after, f"resize VM {name} to {mem_mb} MiB, {vcpus} vCPUs", grows, subject=name,
                  **kw)


def configure(pool: Pool, failures: int | None, allow_overcommit: bool | None,
              **kw: Any) -> Outcome:
    after = pool.copy()
    if failures is not None:
        if not 0 <= failures <= 64:
            raise PoolError(f"failures_to_tolerate must be 0..64, got {failures}")
        after.failures_to_tolerate = failures
    if allow_overcommit is not None:
        after.allow_overcommit = allow_overcommit
    grows = (failures or 0) > pool.failures_to_tolerate or (
        allow_overcommit is False and pool.allow_overcommit)
    return _admit(after, "configure the pool", grows, **kw)
