"""The pool planner and admission control, against brute force and simulation."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mirror.pool import admission
from mirror.pool.analysis import analyse
from mirror.pool.model import VM, Host, Placement, Pool, PoolError
from mirror.pool.planner import Planner

# -- an independent brute force ------------------------------------------------------------


def brute_survives(pool: Pool, failed: tuple[str, ...]) -> bool:
    """Does ANY placement exist for what failure set ``failed`` leaves without a place?"""
    ups = [h for h, x in pool.hosts.items() if x.state == "up"]
    alive = [h for h in ups if h not in failed]
    free = {h: [pool.hosts[h].mem_mb, pool.hosts[h].vcpus] for h in alive}
    for name, p in pool.placements.items():
        vm = pool.vms[name]
        for h in (p.host, p.standby):
            if h in free:
                free[h][0] -= vm.mem_mb
                free[h][1] -= vm.vcpus
    # slots: (vm, forbid-host or None, pair-with-previous-slot)
    slots: list[tuple[VM, str | None, bool]] = []
    for name, vm in sorted(pool.vms.items()):
        p = pool.placements.get(name, Placement(None))
        host_ok = p.host in alive
        if vm.priority == "restart" and not host_ok:
            slots.append((vm, None, False))
        elif vm.priority == "mirrored":
            sb_ok = p.standby in alive
            if host_ok and not sb_ok:
                slots.append((vm, p.host, False))
            elif sb_ok and not host_ok:
                slots.append((vm, p.standby, False))
            elif not host_ok and not sb_ok:
                slots.append((vm, None, False))
                slots.append((vm, None, True))

    chosen: list[str] = []

    def rec(j: int) -> bool:
        if j == len(slots):
            return True
        vm, forbid, paired = slots[j]
        if paired:
            forbid = chosen[-1]
        for h in alive:
            if h == forbid or free[h][0] < vm.mem_mb or free[h][1] < vm.vcpus:
                continue
            free[h][0] -= vm.mem_mb
            free[h][1] -= vm.vcpus
            chosen.append(h)
            if rec(j + 1):
                return True
            chosen.pop()
            free[h][0] += vm.mem_mb
            free[h][1] += vm.vcpus
        return False

    return rec(0)


def brute_tolerated(pool: Pool) -> int:
    ups = sorted(h for h, x in pool.hosts.items() if x.state == "up")
    best = -1
    for size in range(len(ups) + 1):
        if not all(brute_survives(pool, fs) for fs in itertools.combinations(ups, size)):
            break
        best = size
    return best


def simulate(pool: Pool, failed: tuple[str, ...], moves: list[Any]) -> list[str]:
    """Carry a plan out on a copy; return what is wrong with the result (empty: nothing)."""
    after = pool.copy()
    for h in failed:
        after.set_host_state(h, "dead")
    errors: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for m in moves:
        key = (m.vm, "standby" if m.kind == "standby" else "run")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            errors.append(f"{m.vm} placed twice ({m.kind})")
        if m.to in failed or after.hosts[m.to].state != "up":
            errors.append(f"{m.vm} sent to a failed host {m.to}")
    admission.apply_plan(after, _plan_of(failed, moves))
    for h in failed:  # what stays on dead hosts is gone
        for v in after.vms_on(h):
            p = after.placements[v]
            after.place(v, None if p.host == h else p.host, None if p.standby == h else p.standby)
    for name, vm in after.vms.items():
        p = after.placements.get(name, Placement(None))
        if vm.guaranteed and p.host is None:
            errors.append(f"{name} not running")
        if vm.priority == "mirrored" and (p.standby is None or p.standby == p.host):
            errors.append(f"{name} not protected")
    for h, (m, c) in after.free().items():
        if after.hosts[h].state == "up" and (m < 0 or c < 0):
            errors.append(f"{h} over capacity")
    return errors


def _plan_of(failed: tuple[str, ...], moves: list[Any]) -> Any:
    from mirror.pool.planner import FailurePlan

    return FailurePlan(failed, moves, [], 0, [])


# -- random small pools ------------------------------------------------------------------------


@st.composite
def pools(draw: st.DrawFn, max_hosts: int = 5, max_vms: int = 7, min_vms: int = 0) -> Pool:
    nh = draw(st.integers(2, max_hosts))
    pool = Pool(failures_to_tolerate=draw(st.integers(0, 2)))
    for i in range(nh):
        pool.hosts[f"h{i}"] = Host(f"h{i}", draw(st.integers(2, 10)), draw(st.integers(1, 6)))
    for j in range(draw(st.integers(min_vms, max_vms))):
        vm = VM(f"v{j}", draw(st.integers(1, 5)), draw(st.integers(1, 3)),
                draw(st.sampled_from(["mirrored", "restart", "best-effort"])),
                draw(st.integers(0, 2)))
        free = pool.free()
        fits = [h for h in sorted(pool.hosts) if free[h][0] >= vm.mem_mb and free[h][1] >= vm.vcpus]
        if not fits:
            continue
        host = draw(st.sampled_from(fits))
        standby = None
        if vm.priority == "mirrored":
            others = [h for h in fits if h != host]
            if not others:
                continue
            standby = draw(st.sampled_from(others))
        pool.vms[vm.name] = vm
        pool.place(vm.name, host, standby)
    pool.check()
    return pool


# MIRROR_POOL_EXAMPLES=N multiplies the examples for a longer search (default 1)
SCALE = int(os.environ.get("MIRROR_POOL_EXAMPLES", "1"))
FAST = settings(max_examples=150 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(pools())
def test_tolerated_failures_equal_brute_force(pool: Pool) -> None:
    a = analyse(pool, keep="none")
    assert a.tolerated_exact
    assert a.tolerated == brute_tolerated(pool)
    # k larger than the hosts: every set of up hosts (all of them included) must survive
    assert a.survives == (a.tolerated >= min(pool.failures_to_tolerate, len(pool.up_hosts())))
    assert (a.breaking is None) == a.survives


@FAST
@given(pools())
def test_every_plan_survives_its_failure_set_in_simulation(pool: Pool) -> None:
    a = analyse(pool, keep="all")
    for fs, fp in a.plans.items():  # every plan the planner calls good, surviving k or not
        if fp.ok:
            assert simulate(pool, fs, fp.moves) == [], (fs, fp.moves)
    if not a.survives:
        return
    k = pool.failures_to_tolerate
    ups = pool.up_hosts()
    want = {fs for s in range(k + 1) for fs in itertools.combinations(ups, s)}
    assert set(a.plans) >= {fs for fs in want if len(fs) <= max(k, 1)}
    for fs in want:
        fp = a.plans[fs]
        assert fp.ok
        assert simulate(pool, fs, fp.moves) == [], (fs, fp.moves)


@FAST
@given(pools(), st.data())
def test_refusals_are_exactly_the_changes_that_break_k(pool: Pool, data: st.DataObject) -> None:
    if brute_tolerated(pool) < pool.failures_to_tolerate:
        pool.failures_to_tolerate = max(0, brute_tolerated(pool))
    op = data.draw(st.sampled_from(["add", "resize", "maintenance"]))
    ups = pool.up_hosts()
    after = pool.copy()
    try:
        if op == "add":
            pr = data.draw(st.sampled_from(["mirrored", "restart", "best-effort"]))
            vm = VM("new", data.draw(st.integers(1, 4)), 1, pr)
            host = data.draw(st.sampled_from(ups))
            sb = data.draw(st.sampled_from([h for h in ups if h != host])) if pr == "mirrored" \
                else None
            after.vms["new"] = vm
            after.place("new", host, sb)
            after.check()
            call = lambda: admission.add_vm(pool, "new", vm.mem_mb, 1, pr, host=host, standby=sb)  # noqa: E731
        elif op == "resize":
            if not pool.vms:
                return
            name = data.draw(st.sampled_from(sorted(pool.vms)))
            mem = pool.vms[name].mem_mb + data.draw(st.integers(1, 3))
            after.vms[name] = VM(name, mem, pool.vms[name].vcpus, pool.vms[name].priority)
            after.check()
            call = lambda: admission.resize_vm(pool, name, mem)  # noqa: E731
        else:
            host = data.draw(st.sampled_from(ups))
            fp = Planner(pool).plan((host,))
            if not fp.ok:
                with pytest.raises(admission.Refused, match="cannot all be moved"):
                    admission.maintenance(pool, host, True)
                return
            admission.apply_plan(after, fp)
            after.set_host_state(host, "maintenance")
            for v in fp.lost:
                after.place(v, None)
            call = lambda: admission.maintenance(pool, host, True)  # noqa: E731
    except PoolError:
        return  # does not fit at all: not an admission question
    # k larger than the up hosts: every set of them, all included, must survive
    breaks = brute_tolerated(after) < min(pool.failures_to_tolerate, len(after.up_hosts()))
    try:
        out = call()
    except admission.Refused as r:
        assert breaks, str(r)
        a = r.analysis
        assert a is not None and a.breaking is not None, str(r)
        # the message names the failure set that breaks, each VM with the memory it lacks
        assert "if " in str(r) or "with no host failed" in str(r), str(r)
        assert f"short by {a.breaking.shortfall_mb} MiB" in str(r), str(r)
        for v in a.breaking.unplaced:
            assert f"{v} (" in str(r) and f"{a.breaking.needs[v]} MiB" in str(r), str(r)
        assert a.breaking.shortfall_mb == sum(a.breaking.needs.values()) > 0
        return
    assert not breaks
    assert out.warning is None


def small_pool() -> Pool:
    pool = Pool(failures_to_tolerate=1)
    for h in ("a", "b", "c"):
        pool.hosts[h] = Host(h, 16384, 8)
    pool.vms["web"] = VM("web", 4096, 2, "mirrored")
    pool.place("web", "a", "b")
    pool.vms["db"] = VM("db", 8192, 4, "restart")
    pool.place("db", "c")
    pool.vms["batch"] = VM("batch", 2048, 1, "best-effort")
    pool.place("batch", "a")
    return pool


def test_plan_of_a_small_pool() -> None:
    a = analyse(small_pool())
    assert a.survives and a.tolerated == 1 and a.tolerated_exact
    fp = a.plans[("a",)]
    kinds = [(m.vm, m.kind, m.to) for m in fp.moves]
    assert kinds[0] == ("web", "promote", "b")  # the pair fails over first
    assert kinds[1][:2] == ("web", "standby") and kinds[1][2] == "c"
    assert ("batch", "best-effort", "b") in kinds or ("batch", "best-effort", "c") in kinds
    assert a.breaking is None  # the pool survives k = 1: nothing of size <= 1 breaks
    assert a.breaks_beyond is not None and len(a.breaks_beyond.failed) == 2


def test_refusal_names_the_failure_set_and_the_shortfall() -> None:
    pool = small_pool()
    with pytest.raises(admission.Refused) as e:
        admission.add_vm(pool, "big", 12288, 2, "restart", host="b")
    msg = str(e.value)
    assert "if " in msg and "short by" in msg and "MiB" in msg and "big" in msg, msg
    assert "allow_overcommit" in msg
    pool.allow_overcommit = True
    out = admission.add_vm(pool, "big", 12288, 2, "restart", host="b")
    assert out.warning is not None and out.warning.startswith("WARNING: overcommitted")
    assert out.analysis.breaking is not None and out.analysis.breaking.unplaced


def test_bad_input_is_a_clear_error_and_changes_nothing() -> None:
    pool = small_pool()
    before = pool.to_json()
    with pytest.raises(PoolError, match="unknown host 'zz'"):
        admission.add_vm(pool, "x", 1024, 1, "restart", host="zz")
    with pytest.raises(PoolError, match="larger than every host"):
        admission.add_vm(pool, "x", 65536, 1, "restart")
    with pytest.raises(PoolError, match="bad priority 'gold'"):
        admission.add_vm(pool, "x", 1024, 1, "gold")
    with pytest.raises(PoolError, match="still holds"):
        admission.remove_host(pool, "a")
    assert pool.to_json() == before


def test_maintenance_moves_the_host_s_vms() -> None:
    pool = small_pool()
    with pytest.raises(admission.Refused,
                       match=r"if a fails.*web \(runs unprotected: needs 4096 MiB for a "
                       r"standby\); short by 4096 MiB"):
        admission.maintenance(pool, "c", True)  # two hosts left: web could not be re-protected
    pool.failures_to_tolerate = 0
    out = admission.maintenance(pool, "c", True)
    assert out.pool.hosts["c"].state == "maintenance"
    assert out.pool.vms_on("c") == []
    assert out.pool.placements["db"].host in ("a", "b")
    assert pool.placements["db"].host == "c"  # the input is untouched


def test_large_pool_plan_is_checked_for_every_set() -> None:
    pool = Pool(failures_to_tolerate=2)
    for i in range(24):
        pool.hosts[f"h{i:02}"] = Host(f"h{i:02}", 65536, 64)
    for j in range(240):
        h = f"h{j % 24:02}"
        pr = ["mirrored", "restart", "best-effort"][j % 3]
        pool.vms[f"v{j}"] = VM(f"v{j}", 1024 + 256 * (j % 7), 1 + (j // 24) % 3, pr)
        pool.place(f"v{j}", h, f"h{(j + 5) % 24:02}" if pr == "mirrored" else None)
    pool.check()
    a = analyse(pool, keep="all")
    assert a.survives and a.checked >= 1 + 24 + 276
    for fs, fp in a.plans.items():
        assert simulate(pool, fs, fp.moves) == []


@FAST
@given(pools())
def test_the_plan_made_before_a_failure_is_the_one_carried_out_after_it(pool: Pool) -> None:
    """The controller plans the empty failure set once the host is marked dead: same moves."""
    for h in pool.up_hosts():
        before = Planner(pool).plan((h,))
        dead = pool.copy()
        dead.set_host_state(h, "dead")
        after = Planner(dead).plan(())
        assert [(m.vm, m.kind, m.to) for m in after.moves] == [
            (m.vm, m.kind, m.to) for m in before.moves
        ]
        assert (after.unplaced, after.lost) == (before.unplaced, before.lost)


@settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(max_hosts=8, max_vms=14))
def test_composed_checks_agree_with_planning_every_set(pool: Pool) -> None:
    """Failure sets of size >= 2 proved by composing single-failure plans: same answers."""
    fast = analyse(pool, keep="none", max_k=4)
    full = analyse(pool, keep="none", max_k=4, compose=False)
    assert (fast.tolerated, fast.survives) == (full.tolerated, full.survives)
    assert (fast.breaking is None) == (full.breaking is None)
    if fast.breaking is not None and full.breaking is not None:
        assert fast.breaking.failed == full.breaking.failed  # the first failing set, in order


def test_composed_check_on_a_large_pool_matches_planning_every_set() -> None:
    from bench.pool import make_pool

    pool = make_pool(24, 400, 3, seed=7)
    fast = analyse(pool, keep="none", max_k=3)
    full = analyse(pool, keep="none", max_k=3, compose=False)
    assert fast.survives == full.survives and fast.tolerated == full.tolerated
    assert fast.checked == full.checked == sum(math.comb(24, s) for s in range(4))


@settings(max_examples=100 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(max_hosts=7, max_vms=12))
def test_every_composed_plan_survives_its_failure_set_in_simulation(pool: Pool) -> None:
    """The composition of ring plans, used when greedy packing fails: checked in simulation."""
    pl = Planner(pool)
    if pl.always:
        return
    for size in (2, 3):
        for fs in itertools.combinations(pl.up, size):
            failed = {pl.index[h] for h in fs}
            fm, fc = pl.free_m[:], pl.free_c[:]
            placed = pl._composed(failed, fm, fc)
            if placed is None:
                continue
            units, _ = pl._units(failed)
            moves = pl._moves(units, placed, [], failed)
            assert simulate(pool, fs, moves) == [], (fs, moves)


# -- beyond the guarantee: failure sets of size k+1 and k+2 ----------------------------------

RANK = {"mirrored": 0, "restart": 1, "best-effort": 2}
RUNS = ("promote", "restart", "best-effort")


def _beyond_sets(pool: Pool) -> list[tuple[str, ...]]:
    """Every failure set of size k+1 and k+2 (k: the tolerated failures, by brute force)."""
    ups = pool.up_hosts()
    k = brute_tolerated(pool)
    return [fs for size in (k + 1, k + 2) if 1 <= size <= len(ups)
            for fs in itertools.combinations(ups, size)]


def check_beyond(pool: Pool, fs: tuple[str, ...], fp: Any) -> list[str]:
    """What is wrong with plan ``fp`` for failure set ``fs`` (empty: nothing)."""
    errors: list[str] = []
    runs: dict[str, int] = {}
    standbys: dict[str, int] = {}
    for m in fp.moves:
        counter = runs if m.kind in RUNS else standbys
        counter[m.vm] = counter.get(m.vm, 0) + 1
        if counter[m.vm] > 1:
            errors.append(f"{m.vm} placed twice ({m.kind})")
        if m.to in fs or pool.hosts[m.to].state != "up":
            errors.append(f"{m.vm} sent to a dead host {m.to}")
    after = pool.copy()
    for h in fs:
        after.set_host_state(h, "dead")
    admission.apply_plan(after, fp)
    for name, vm in pool.vms.items():
        p = pool.placements.get(name, Placement(None))
        q = after.placements.get(name, Placement(None))
        for h in (q.host, q.standby):
            if h is not None and after.hosts[h].state != "up":
                errors.append(f"{name} left on dead host {h}")
        if p.host is not None and p.host not in fs:
            if q.host != p.host:
                errors.append(f"{name} ran on surviving {p.host}, now on {q.host}")
        elif vm.priority == "mirrored" and p.standby is not None and p.standby not in fs \
                and q.host != p.standby:
            errors.append(f"{name}'s standby on {p.standby} survived: not promoted there")
        if vm.guaranteed and (q.host is None) != (name in fp.down):
            errors.append(f"{name} runs on {q.host}, down: {fp.down}")
        if vm.priority == "mirrored" and q.host is not None and (
                q.standby is None) != (name in fp.unprotected):
            errors.append(f"{name} standby {q.standby}, unprotected: {fp.unprotected}")
        if vm.priority == "best-effort" and (q.host is None) != (name in fp.lost) and \
                p.host in (None, *fs):
            errors.append(f"best-effort {name} runs on {q.host}, lost: {fp.lost}")
    for v in fp.unplaced:
        need = pool.vms[v].mem_mb * (2 if v in fp.down and pool.vms[v].priority == "mirrored"
                                     else 1)
        if fp.needs.get(v) != need:
            errors.append(f"{v} needs {fp.needs.get(v)} MiB, not {need}")
    if fp.shortfall_mb != sum(fp.needs.values()):
        errors.append(f"shortfall {fp.shortfall_mb} != {fp.needs}")
    for h, (m, c) in after.free().items():
        if after.hosts[h].state == "up" and (m < 0 or c < 0):
            errors.append(f"{h} over capacity")
    # carried out once: the controller's next tick (hosts dead, plan applied) moves nothing
    again = Planner(after).plan(())
    if again.moves:
        errors.append(f"the plan moves again after it was carried out: {again.moves}")
    return errors


BEYOND = settings(max_examples=300 * SCALE, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])


@BEYOND
@given(pools(min_vms=3))
def test_beyond_k_every_vm_with_a_live_copy_keeps_running(pool: Pool) -> None:
    """Failure sets of size k+1 and k+2: a mirrored VM whose standby survived is promoted
    there, one whose primary survived stays, nothing that runs moves; no VM is placed twice
    or on a dead host, no host goes over capacity, and the plan is carried out once."""
    sets = _beyond_sets(pool)
    event(f"beyond-k failure sets: {'none' if not sets else '1-4' if len(sets) < 5 else '5+'}")
    pl = Planner(pool)
    for fs in sets:
        fp = pl.plan(fs)
        if not fp.ok:
            event("a set the pool cannot fully survive")
            if any(m.kind == "promote" for m in fp.moves):
                event("... with a surviving standby promoted")
            if fp.down:
                event("... with a guaranteed VM down")
        assert check_beyond(pool, fs, fp) == [], (fs, fp)


def oracle_restarts(pool: Pool, failed: tuple[str, ...]) -> list[str]:
    """Independent exhaustive oracle: the guaranteed VMs that lost every copy, taken in rank
    order (mirrored before restart, then order, then smaller, then name), each kept if some
    assignment of it and those kept before it to the surviving hosts' free room exists
    (every assignment tried): the best set of VMs that can run, in priority order."""
    alive = [h for h in pool.up_hosts() if h not in failed]
    free = {h: [pool.hosts[h].mem_mb, pool.hosts[h].vcpus] for h in alive}
    lost: list[VM] = []
    for name, vm in pool.vms.items():
        p = pool.placements.get(name, Placement(None))
        copies = [h for h in (p.host, p.standby) if h in free]
        for h in copies:
            free[h][0] -= vm.mem_mb
            free[h][1] -= vm.vcpus
        if vm.guaranteed and not copies:
            lost.append(vm)
    lost.sort(key=lambda v: (RANK[v.priority], v.order, v.mem_mb, v.name))

    def fits(vms: list[VM]) -> bool:
        if not vms:
            return True
        vm = vms[0]
        for h in alive:
            if free[h][0] >= vm.mem_mb and free[h][1] >= vm.vcpus:
                free[h][0] -= vm.mem_mb
                free[h][1] -= vm.vcpus
                ok = fits(vms[1:])
                free[h][0] += vm.mem_mb
                free[h][1] += vm.vcpus
                if ok:
                    return True
        return False

    kept: list[VM] = []
    for vm in lost:
        if fits([*kept, vm]):
            kept.append(vm)
    return sorted(v.name for v in kept)


@BEYOND
@given(pools(max_hosts=5, max_vms=8, min_vms=3))
def test_beyond_k_the_plan_runs_the_best_set_the_oracle_finds(pool: Pool) -> None:
    """For failure sets of size k+1 and k+2, the VMs the plan restarts are exactly the
    oracle's, unless the planner says it could not prove its choice (``optimal`` False)."""
    pl = Planner(pool)
    for fs in _beyond_sets(pool):
        fp = pl.plan(fs)
        restarted = sorted(m.vm for m in fp.moves if m.kind == "restart")
        if not fp.optimal:
            event("the planner could not prove its choice")
            continue
        want = oracle_restarts(pool, fs)
        if len(want) < len([v for v in pool.vms if pool.vms[v].guaranteed]):
            event("oracle: some guaranteed VM cannot run")
        assert restarted == want, (fs, restarted, want, fp)


def test_beyond_k_a_standby_that_survived_is_promoted_even_with_no_room_left() -> None:
    """The case the issue found: hosts a and c die with a pool planned for 1 failure: web
    (primary a, standby b) runs on b; db (on c) cannot restart and says by how much; the
    controller's next plan moves nothing (no standby moved back and forth)."""
    pool = small_pool()
    pool.vms["big"] = VM("big", 12288, 2, "restart")
    pool.place("big", "b")
    fp = Planner(pool).plan(("a", "c"))
    kinds = [(m.vm, m.kind, m.to) for m in fp.moves]
    assert kinds[0] == ("web", "promote", "b"), kinds
    assert fp.down == ["db"] and fp.needs["db"] == 8192
    assert "web" in fp.unprotected  # no third host for its standby
    assert check_beyond(pool, ("a", "c"), fp) == []
    msg = admission.describe_vms(fp)
    assert "db (does not run: needs 8192 MiB)" in msg, msg
    assert "web (runs unprotected: needs 4096 MiB for a standby)" in msg, msg


def test_beyond_k_on_a_large_pool_most_hosts_lost() -> None:
    """A large pool losing most of its hosts: the same checks (live copies kept, nothing
    twice or on a dead host, capacity, carried out once); the planner may not prove its
    choice there (``optimal`` False), but what it keeps running it keeps."""
    from bench.pool import make_pool

    pool = make_pool(64, 2000, 2, seed=3)
    fs = tuple(pool.up_hosts()[:50])
    fp = Planner(pool).plan(fs)
    assert not fp.ok and fp.down and fp.unprotected
    assert check_beyond(pool, fs, fp) == []
