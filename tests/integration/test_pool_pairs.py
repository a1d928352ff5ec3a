"""A mirrored VM in a pool is a real pair: its primary's host killed, the pair's own
controller promotes the standby (an etcd claim), the pool records it and re-protects
the VM on the planned host.

Four `mirror pool agent` processes on a real etcd, each in its own process group;
the pair's roles (`mirror primary`, `mirror secondary`) are children of the agents
of the VM's hosts.  The VM's observer must see one gapless, duplicate-free sequence
(the synthetic guest's own) across the failover and the re-protection.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import main
from mirror.guests.synthetic import SyntheticParams, reference_outputs
from mirror.ha.etcd import Etcd
from mirror.hoststate import read_json
from mirror.lab.demo import free_ports
from mirror.lab.observer import Observer
from mirror.pool.model import pair_name as vm_pair_name
from mirror.pool.poolagent import pair_config
from mirror.pool.store import Store
from tests.integration.conftest import SHM
from tests.integration.test_pool_kill import Agents, _alive, _pool_cli, _vm_log
from tests.pool_etcd import etcd_server

HOSTS = ["h1", "h2", "h3", "h4"]


@pytest.fixture
def pool_pair(tmp_path: Path, pair_name: str) -> Iterator[tuple[str, Path, Agents, Observer, str]]:
    vm = f"m{pair_name}"  # this test's own: so are its pair's /dev/shm files
    observer = Observer()
    try:
        with etcd_server(tmp_path) as url:
            agents = Agents(url, tmp_path)
            try:
                yield url, tmp_path, agents, observer, vm
            finally:
                agents.stop()
    finally:
        observer.close()
        # the killed host's guest RAM file (a real host's memory dies with it), and anything
        # a failing run left
        for f in SHM.glob(f"mirror-{vm_pair_name(vm)}-*"):
            f.unlink(missing_ok=True)


def _status(root: Path, vm: str, host: str) -> dict[str, Any]:
    try:
        return dict(read_json(root / "pairs" / vm / host / "status.json"))
    except (OSError, ValueError):
        return {}


def _wait(what: str, cond: Any, timeout: float, root: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}"
                     for p in [*root.glob("agent-*.log"), *root.glob("pairs/*/*/agent.log")])
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def test_pool_pair_fails_over_on_its_own_and_is_reprotected_where_planned(
    pool_pair: tuple[str, Path, Agents, Observer, str],
) -> None:
    url, root, agents, observer, vm = pool_pair
    for h in HOSTS:
        _pool_cli(url, "host", "add", h, "--mem", "8192", "--vcpus", "8")
    data, hb = free_ports(2)
    _pool_cli(url, "vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
              "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
              "--link-ports", f"{data},{hb}")
    _pool_cli(url, "vm", "add", "r1", "--mem", "2048", "--priority", "restart", "--host", "h1")
    store = Store(Etcd(url))
    spec = store.load().pool.pairs[vm]
    assert (spec.pair, spec.data_port, spec.heartbeat_port) == (vm_pair_name(vm), data, hb)
    for h in HOSTS:
        agents.start(h)

    _wait("the pair protected on h1/h2", lambda: (s := _status(root, vm, "h1"))
          .get("phase") == "protected" and s.get("acked", 0) >= 10, 40, root)
    _wait("outputs at the observer", lambda: observer.count() > 20, 20, root)
    snap = _wait("a controller and a current plan", lambda: (s := store.load()).leader
                 and s.plan and s.plan["version"] == s.version and s, 20, root)
    planned = {(m["vm"], m["kind"]): m["to"] for m in snap.plan["single_failure_plans"]["h1"]}
    assert planned[(vm, "promote")] == "h2" and planned[(vm, "standby")] not in ("h1", "h2")
    assert snap.running.get(vm) == "h1"
    before_kill = observer.count()
    worst = [0]
    stop = threading.Event()

    def sampler() -> None:  # never two live primaries of the VM (status files and pids)
        while not stop.is_set():
            live = {h for h in HOSTS if (s := _status(root, vm, h)).get("role") == "primary"
                    and _alive(int(s.get("pid", 0)))}
            worst[0] = max(worst[0], len(live))
            stop.wait(0.05)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        _failover_rounds(url, root, agents, observer, vm, store, spec, planned, before_kill)
    finally:
        stop.set()
        th.join()
    assert worst[0] == 1, f"{worst[0]} primaries of {vm} alive at once"


def _failover_rounds(
    url: str, root: Path, agents: Agents, observer: Observer, vm: str, store: Store,
    spec: Any, planned: dict[tuple[str, str], str], before_kill: int,
) -> None:
    new_standby = planned[(vm, "standby")]
    t_kill = time.monotonic()
    os.killpg(agents.procs["h1"].pid, signal.SIGKILL)  # h1 dies: its agent, primary, r1
    agents.procs["h1"].wait()

    # the pair's own controller promotes h2 (its etcd claim), without the pool
    etcd = store.etcd
    prefix = f"/mirror/arbiter/{spec.pair}/"
    claim = _wait("h2 to win the promotion claim",
                  lambda: etcd.get(prefix + "claims/generation-1"), 20, root)
    assert json.loads(claim.value)["node"] == "h2"
    assert json.loads(claim.value)["action"] == "promote"
    t_promoted = time.monotonic()
    # the pool records it, then the new standby on the planned host
    snap2 = _wait("the pool to record the promotion", lambda: (s := store.load())
                  .pool.placements[vm].host == "h2" and s, 20, root)
    t_recorded = time.monotonic()
    p = snap2.pool.placements[vm]
    assert (p.host, p.standby) == ("h2", new_standby)
    assert snap2.pool.hosts["h1"].state == "dead"
    assert snap2.pool.pairs[vm].seen_generation == 1
    # re-protected: the promoted primary on h2 pairs with the new secondary, generation 2
    st = _wait("re-protection on h2", lambda: (s := _status(root, vm, "h2")).get("role")
               == "primary" and s.get("phase") == "protected" and s.get("acked", 0) >= 10
               and s, 40, root)
    t_protected = time.monotonic()
    assert st["generation"] == 2
    sec = _status(root, vm, new_standby)
    assert sec.get("role") == "secondary" and sec.get("generation") == 2
    assert sec.get("committed", 0) > 0
    gen = etcd.get(prefix + "generation")
    assert gen is not None and int(gen.value) == 2
    _wait("running/ to name h2", lambda: store.load().running.get(vm) == "h2", 10, root)
    # the restart VM went where planned
    _wait("r1 restarted", lambda: any(e[0] == "start" and e[1] == "r1" and e[2] == planned[
        ("r1", "restart")] and _alive(e[3]) for e in _vm_log(root / "vms.log")), 20, root)
    after = observer.count()
    _wait("outputs after the re-protection", lambda: observer.count() > after + 30, 20, root)

    moved = [e for e in store.events() if e.get("event") == "moved" and e["vm"] == vm]
    assert len(moved) == 1, moved
    assert sorted((m["kind"], m["to"]) for m in moved[0]["moves"]) == sorted(
        [("promote", "h2"), ("standby", new_standby)])

    # round 2: the standby's host dies; the primary goes unprotected by itself (its claim)
    # and the pool puts a new standby on the planned host, where it pairs (generation 3)
    snap3 = _wait("a current plan", lambda: (s := store.load()).plan
                  and s.plan["version"] == s.version and s, 20, root)
    planned2 = {(m["vm"], m["kind"]): m["to"]
                for m in snap3.plan["single_failure_plans"][new_standby]}
    third = planned2[(vm, "standby")]
    t_kill2 = time.monotonic()
    os.killpg(agents.procs[new_standby].pid, signal.SIGKILL)
    agents.procs[new_standby].wait()
    claim2 = _wait("h2 to win the unprotected claim",
                   lambda: etcd.get(prefix + "claims/generation-2"), 20, root)
    assert json.loads(claim2.value) | {"time": 0} == {"node": "h2", "action": "unprotected",
                                                      "time": 0}
    _wait("the new standby recorded", lambda: store.load().pool.placements[vm].standby
          == third, 20, root)
    st2 = _wait("re-protection with the third standby", lambda: (s := _status(root, vm, "h2"))
                .get("phase") == "protected" and s.get("generation") == 3
                and s.get("acked", 0) >= 10 and s, 40, root)
    t_protected2 = time.monotonic()
    assert _status(root, vm, third).get("generation") == 3
    assert store.load().pool.placements[vm].host == "h2"
    after = observer.count()
    _wait("outputs after the second re-protection", lambda: observer.count() > after + 30, 20,
          root)

    agents.stop()
    seen = observer.seen
    seqs = seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)), (
        f"not one gapless, duplicate-free sequence: {seen.gaps()} gaps, "
        f"{seen.duplicates()} duplicates")
    assert not seen.interleaved(), "two sources interleaved"
    assert seen.malformed == 0
    guest = SyntheticParams.from_config(pair_config(spec, "h1", url, root).guest)
    assert [(s, p) for s, p, _ in seen.outputs] == reference_outputs(guest, len(seqs))
    assert len(set(seen.sources)) == 2  # the first primary, then the promoted one
    print("\nPOOL PAIR TEST:", json.dumps({
        "vm": vm, "pair": spec.pair, "new_standby": new_standby,
        "outputs_before_kill": before_kill, "outputs_total": len(seqs),
        "promotion_claim_s": round(t_promoted - t_kill, 2),
        "pool_recorded_s": round(t_recorded - t_kill, 2),
        "reprotected_s": round(t_protected - t_kill, 2),
        "promoted_from_checkpoint": st.get("promoted_from"),
        "failover_ms": st.get("failover_ms"),
        "standby_killed": new_standby, "third_standby": third,
        "reprotected_after_standby_kill_s": round(t_protected2 - t_kill2, 2),
        "acked_at_end": st2.get("acked"),
    }))


def test_pool_pair_both_hosts_killed_restarts_as_a_fresh_pair(
    pool_pair: tuple[str, Path, Agents, Observer, str],
) -> None:
    """Both of the pair's hosts die at once: nothing can promote, so the pool restarts
    the VM as a fresh pair (its guest boots anew) on the two hosts left.  Their leases
    may lapse a tick apart: then the pool first sees the standby's host dead (a new
    standby, which never pairs) and then the primary's, gives up waiting for that standby
    to promote (--promote-wait) and restarts the VM all the same."""
    url, root, agents, observer, vm = pool_pair
    for h in HOSTS:
        _pool_cli(url, "host", "add", h, "--mem", "8192", "--vcpus", "8")
    data, hb = free_ports(2)
    _pool_cli(url, "vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
              "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
              "--link-ports", f"{data},{hb}")
    store = Store(Etcd(url))
    spec = store.load().pool.pairs[vm]
    for h in HOSTS:
        agents.start(h, "--promote-wait", "3")
    _wait("the pair protected on h1/h2", lambda: (s := _status(root, vm, "h1"))
          .get("phase") == "protected" and s.get("acked", 0) >= 10, 40, root)
    for h in ("h1", "h2"):  # both at once: h2's standby has no time to judge h1
        os.killpg(agents.procs[h].pid, signal.SIGKILL)
    for h in ("h1", "h2"):
        agents.procs[h].wait()
    t_kill = time.monotonic()
    snap = _wait("the pool to restart it", lambda: (s := store.load())
                 .pool.placements[vm].host in ("h3", "h4") and s, 30, root)
    p = snap.pool.placements[vm]
    assert {p.host, p.standby} == {"h3", "h4"}
    st = _wait("the fresh pair protected", lambda: (s := _status(root, vm, str(p.host)))
               .get("phase") == "protected" and s.get("acked", 0) >= 10 and s, 40, root)
    t_protected = time.monotonic()
    assert _status(root, vm, str(p.standby)).get("role") == "secondary"
    claim = store.etcd.get(f"/mirror/arbiter/{spec.pair}/claims/generation-1")
    assert claim is None or json.loads(claim.value)["node"] == "pool"  # nobody promoted
    _wait("running/ to name the new host", lambda: store.load().running.get(vm) == p.host, 10,
          root)
    n = observer.count()
    _wait("outputs of the fresh guest", lambda: observer.count() > n + 30, 20, root)
    agents.stop()
    # the first guest's outputs, then the fresh guest's from 1 (a restart, not a failover):
    # each one connection's gapless sequence
    seen = observer.seen
    by_source: dict[int, list[int]] = {}
    for seq, src in zip(seen.seqs, seen.sources, strict=True):
        by_source.setdefault(src, []).append(seq)
    assert len(by_source) == 2 and not seen.interleaved()
    for seqs in by_source.values():
        assert seqs == list(range(1, len(seqs) + 1))
    print("\nPOOL PAIR RESTART:", json.dumps({
        "restarted_on": p.host, "standby": p.standby, "generation": st.get("generation"),
        "seen_apart": claim is not None,
        "protected_s": round(t_protected - t_kill, 2)}))


def test_pool_pair_standby_that_never_promotes_is_preempted_and_restarted(
    pool_pair: tuple[str, Path, Agents, Observer, str],
) -> None:
    """The primary's host dies before its standby ever paired (so it has nothing to
    promote): after --promote-wait the pool takes the pair's claim itself (the standby can
    never win it now) and restarts the VM as a fresh pair, one generation on."""
    url, root, agents, observer, vm = pool_pair
    for h in HOSTS:
        _pool_cli(url, "host", "add", h, "--mem", "8192", "--vcpus", "8")
    data, hb = free_ports(2)
    _pool_cli(url, "vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
              "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
              "--link-ports", f"{data},{hb}")
    store = Store(Etcd(url))
    spec = store.load().pool.pairs[vm]
    for h in ("h1", "h3", "h4"):  # h2, the standby's host, has no agent yet
        agents.start(h, "--promote-wait", "3")
    _wait("the primary on h1 waiting for its standby",
          lambda: _status(root, vm, "h1").get("phase") == "pairing", 30, root)
    os.killpg(agents.procs["h1"].pid, signal.SIGKILL)
    agents.procs["h1"].wait()
    agents.start("h2", "--promote-wait", "3")  # its standby comes up, never paired
    _wait("h2's unpaired standby", lambda: _status(root, vm, "h2").get("role") == "secondary",
          30, root)
    t0 = time.monotonic()
    snap = _wait("the pool to give up on the promotion", lambda: (s := store.load())
                 .pool.placements[vm].host not in ("h1", None) and s, 40, root)
    waited = time.monotonic() - t0
    prefix = f"/mirror/arbiter/{spec.pair}/"
    claim = store.etcd.get(prefix + "claims/generation-1")
    assert claim is not None and json.loads(claim.value)["node"] == "pool"
    assert [e["event"] for e in store.events() if e.get("vm") == vm][:1] == [
        "pair-not-promoted"]
    assert snap.pool.pairs[vm].seen_generation == 1
    p = snap.pool.placements[vm]
    assert p.host != p.standby and "h1" not in (p.host, p.standby)
    st = _wait("the fresh pair protected", lambda: (s := _status(root, vm, str(p.host)))
               .get("phase") == "protected" and s.get("acked", 0) >= 10 and s, 40, root)
    assert st["generation"] == 2
    n = observer.count()
    _wait("outputs of the fresh pair", lambda: observer.count() > n + 30, 20, root)
    agents.stop()
    seqs = observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1))
    print("\nPOOL PAIR PREEMPTED:", json.dumps({
        "restarted_on": p.host, "standby": p.standby, "generation": st["generation"],
        "gave_up_after_s": round(waited, 2)}))


def test_pool_pair_maintenance_of_its_primary_host_hands_over(
    pool_pair: tuple[str, Path, Agents, Observer, str],
) -> None:
    """Maintenance of a pair's primary host: the pool moves the VM to its standby's host,
    and the agents make that a switchover (the guest goes on there, nothing lost), then
    the new standby is on the planned host."""
    url, root, agents, observer, vm = pool_pair
    for h in HOSTS:
        _pool_cli(url, "host", "add", h, "--mem", "8192", "--vcpus", "8")
    data, hb = free_ports(2)
    _pool_cli(url, "vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
              "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
              "--link-ports", f"{data},{hb}")
    store = Store(Etcd(url))
    spec = store.load().pool.pairs[vm]
    for h in HOSTS:
        agents.start(h)
    _wait("the pair protected on h1/h2", lambda: (s := _status(root, vm, "h1"))
          .get("phase") == "protected" and s.get("acked", 0) >= 10, 40, root)
    _wait("outputs at the observer", lambda: observer.count() > 20, 20, root)
    snap = _wait("a controller and a current plan", lambda: (s := store.load()).leader
                 and s.plan and s.plan["version"] == s.version and s, 20, root)
    planned = {(m["vm"], m["kind"]): m["to"] for m in snap.plan["single_failure_plans"]["h1"]}
    t0 = time.monotonic()
    _pool_cli(url, "host", "maintenance", "h1", "on")
    p = store.load().pool.placements[vm]
    assert p.host == "h2" and p.standby == planned[(vm, "standby")], (p, planned)
    st = _wait("h2 primary and protected again", lambda: (s := _status(root, vm, "h2"))
               .get("role") == "primary" and s.get("phase") == "protected"
               and s.get("acked", 0) >= 10 and s, 40, root)
    t_protected = time.monotonic()
    claim = store.etcd.get(f"/mirror/arbiter/{spec.pair}/claims/generation-1")
    assert claim is not None and json.loads(claim.value)["node"] == "h2"
    _wait("the handover noted", lambda: store.load().pool.pairs[vm].seen_generation == 1, 10,
          root)
    _wait("running/ to name h2", lambda: store.load().running.get(vm) == "h2", 10, root)
    assert _status(root, vm, str(p.standby)).get("role") == "secondary"
    n = observer.count()
    _wait("outputs after the handover", lambda: observer.count() > n + 30, 20, root)
    agents.stop()
    seen = observer.seen
    seqs = seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)), (
        f"{seen.gaps()} gaps, {seen.duplicates()} duplicates")
    assert not seen.interleaved()
    guest = SyntheticParams.from_config(pair_config(spec, "h1", url, root).guest)
    assert [(s, p) for s, p, _ in seen.outputs] == reference_outputs(guest, len(seqs))
    print("\nPOOL PAIR MAINTENANCE:", json.dumps({
        "new_standby": p.standby, "generation": st["generation"], "outputs": len(seqs),
        "protected_again_s": round(t_protected - t0, 2)}))


def test_pool_pair_beyond_k_its_standby_promotes_and_keeps_running(
    pool_pair: tuple[str, Path, Agents, Observer, str],
) -> None:
    """Two hosts of a pool planned for one die at once (the pair's primary's and another):
    the pair's standby promotes by itself, the pool records it (no room is left for a new
    standby: it runs unprotected) and never stops it; the restart VM that cannot restart
    is named with its memory; the controller does nothing more.  The pool lives under its
    own prefix, so its pair's arbiter keys are under PREFIX/arbiter/."""
    url, root, agents, observer, vm = pool_pair
    prefix = "/mirror/pool-b/"

    def cli(*args: str) -> None:
        assert main(["pool", *args, "--etcd", url, "--prefix", prefix]) == 0, args

    for h in HOSTS:
        cli("host", "add", h, "--mem", "4096", "--vcpus", "8")
    data, hb = free_ports(2)
    cli("vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
        "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
        "--link-ports", f"{data},{hb}")
    for name, mem, order, host in (("r1", 3072, 0, "h3"), ("r2", 2560, 1, "h1"),
                                   ("r3", 1024, 0, "h4")):
        cli("vm", "add", name, "--mem", str(mem), "--priority", "restart", "--order",
            str(order), "--host", host)
    cli("vm", "add", "b1", "--mem", "1024", "--priority", "best-effort", "--host", "h2")
    store = Store(Etcd(url), prefix)
    spec = store.load().pool.pairs[vm]
    for h in HOSTS:
        agents.start(h, "--prefix", prefix)
    _wait("the pair protected on h1/h2", lambda: (s := _status(root, vm, "h1"))
          .get("phase") == "protected" and s.get("acked", 0) >= 10, 40, root)
    _wait("outputs at the observer", lambda: observer.count() > 20, 20, root)
    _wait("a controller", lambda: store.load().leader, 20, root)
    standby_pid = int(_status(root, vm, "h2")["pid"])
    for h in ("h1", "h3"):
        os.killpg(agents.procs[h].pid, signal.SIGKILL)
    for h in ("h1", "h3"):
        agents.procs[h].wait()
    t_kill = time.monotonic()
    arb = f"{prefix}arbiter/{spec.pair}/"
    claim = _wait("h2 to win the promotion claim",
                  lambda: store.etcd.get(arb + "claims/generation-1"), 20, root)
    t_claim = time.monotonic()
    assert json.loads(claim.value)["node"] == "h2"
    assert store.etcd.get(f"/mirror/arbiter/{spec.pair}/claims/generation-1") is None

    def recorded() -> Any:
        s = store.load()
        p = s.pool.placements
        # the leases may lapse a tick apart: then the first plan restarts r2 (h1 alone
        # failed) and r1 finds no room once h3 is found dead too; else r1 restarts
        done = all(s.pool.hosts[h].state == "dead" for h in ("h1", "h3")) and \
            p[vm].host == "h2" and p[vm].standby is None and \
            sorted(p[v].host is None for v in ("r1", "r2")) == [False, True]
        return s if done else None

    snap = _wait("the pool to record it, r1 or r2 restarted", recorded, 30, root)
    t_recorded = time.monotonic()
    down = next(v for v in ("r1", "r2") if snap.pool.placements[v].host is None)
    n_events = len(store.events())
    n = observer.count()
    time.sleep(6.0)  # about 8 controller ticks: nothing more happens, the VM runs on
    assert observer.count() > n + 100, "the promoted primary stopped releasing outputs"
    assert store.events()[n_events:] == []
    st = _status(root, vm, "h2")
    assert st.get("role") == "primary" and int(st["pid"]) == standby_pid and _alive(
        standby_pid), st  # the standby that promoted, never stopped
    assert store.load().running.get(vm) == "h2"
    no_room = [e for e in store.events() if e.get("event") == "no-room"]
    assert [(e["vm"], e["needs_mb"], e["down"]) for e in no_room if e["vm"] == down] == [
        (down, {"r1": 3072, "r2": 2560}[down], True)]
    agents.stop()
    seen = observer.seen
    seqs = seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)), (
        f"{seen.gaps()} gaps, {seen.duplicates()} duplicates")
    print("\nPOOL PAIR BEYOND-K:", json.dumps({
        "promotion_claim_s": round(t_claim - t_kill, 2),
        "pool_recorded_s": round(t_recorded - t_kill, 2), "phase": st.get("phase"),
        "outputs": len(seqs), "no_room": [e["vm"] for e in no_room]}))
