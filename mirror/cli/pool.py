"""`mirror pool ...`: the pool's state on etcd, what-if plans, changes under admission control.

mirror pool status                       hosts, VMs, placements, tolerated failures
mirror pool plan [--failures N]          what-if: where every VM goes after each failure set
mirror pool config [--failures N] [--allow-overcommit yes|no]
mirror pool host add NAME --mem MIB --vcpus N
mirror pool host remove NAME
mirror pool host maintenance NAME on|off
mirror pool vm add NAME --mem MIB [--vcpus N] --priority mirrored|restart|best-effort
                   [--order N] [--host H] [--standby H]
                   [--observer HOST:PORT [--link-ports D,H] [--guest-ram-mib MIB]]
mirror pool vm remove NAME
mirror pool vm resize NAME --mem MIB [--vcpus N]
mirror pool agent --host NAME [--ttl S] [--run-dir DIR] [--mem MIB --vcpus N]
                   [--promote-wait S] [--metrics-listen HOST:PORT]

Every command takes --etcd URL (default $MIRROR_ETCD or http://127.0.0.1:2379),
--prefix P (the pool's etcd key prefix: default $MIRROR_POOL_PREFIX or /mirror/pool/;
several pools share one etcd under different prefixes) and --json (every outcome, errors
included, is one JSON object on stdout).  Exit status: 0 done, 1 refused (admission
control, or no room for the change), 2 error (bad input, unknown name, etcd unreachable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import within
from mirror.pool import PAIR_PORTS_FROM, PREFIX, PRIORITIES

if TYPE_CHECKING:  # the commands import them (etcd3gw, numpy): not `mirror pool --help`
    from mirror.pool import admission
    from mirror.pool.analysis import Analysis
    from mirror.pool.model import PairSpec, Pool
    from mirror.pool.store import Snapshot, Store

DEFAULT_ETCD = "http://127.0.0.1:2379"


def add_parser(sub: Any) -> None:
    """Register `pool` on the `mirror` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--etcd", default=os.environ.get("MIRROR_ETCD", DEFAULT_ETCD),
                        metavar="URL", help="etcd client URL (default $MIRROR_ETCD or "
                        f"{DEFAULT_ETCD})")
    common.add_argument("--prefix", default=os.environ.get("MIRROR_POOL_PREFIX", PREFIX),
                        metavar="P", help="the pool's etcd key prefix (default "
                        f"$MIRROR_POOL_PREFIX or {PREFIX}): pools with different prefixes "
                        "share one etcd")
    common.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout, whatever the outcome")

    pool = sub.add_parser("pool", help="pool HA: hosts, VMs, failure plans (state on etcd)",
                          description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    ps = pool.add_subparsers(dest="pool_command", required=True, metavar="POOL_COMMAND",
                             parser_class=output.JsonErrorParser)
    ps.add_parser("status", parents=[common], help="hosts, VMs, placements, tolerated failures")
    p = ps.add_parser("plan", parents=[common], help="what-if: the plan for N host failures")
    p.add_argument("--failures", type=within(int, 0, 64), metavar="N",
                   help="failures to plan for (default: the pool's failures_to_tolerate)")
    p = ps.add_parser("config", parents=[common], help="failures to tolerate, overcommit")
    p.add_argument("--failures", type=within(int, 0, 64), metavar="N",
                   help="failures_to_tolerate: host failures every protected VM must survive")
    p.add_argument("--allow-overcommit", choices=["yes", "no"],
                   help="yes: changes that break the guarantee go through with a warning")

    hp = ps.add_parser("host", help="add, remove, maintenance").add_subparsers(
        dest="host_command", required=True, metavar="HOST_COMMAND")
    p = hp.add_parser("add", parents=[common], help="a host joins the pool")
    p.add_argument("name")
    p.add_argument("--mem", type=within(int, 1, 1 << 30), required=True, metavar="MIB")
    p.add_argument("--vcpus", type=within(int, 1, 1 << 16), required=True, metavar="N")
    p = hp.add_parser("remove", parents=[common], help="an empty host leaves the pool")
    p.add_argument("name")
    p = hp.add_parser("maintenance", parents=[common],
                      help="on: move its VMs away (as if it failed); off: take VMs again")
    p.add_argument("name")
    p.add_argument("mode", choices=["on", "off"])

    vp = ps.add_parser("vm", help="add, remove, resize").add_subparsers(
        dest="vm_command", required=True, metavar="VM_COMMAND")
    p = vp.add_parser("add", parents=[common], help="start a VM (a mirrored one is a pair)")
    p.add_argument("name")
    p.add_argument("--mem", type=within(int, 1, 1 << 30), required=True, metavar="MIB")
    p.add_argument("--vcpus", type=within(int, 1, 1 << 16), default=1, metavar="N",
                   help="vCPUs (default 1)")
    p.add_argument("--priority", required=True, metavar="P",
                   help=f"one of {', '.join(PRIORITIES)}")
    p.add_argument("--order", type=within(int, 0, 1 << 20), default=0, metavar="N",
                   help="restart order within its priority: lower first (default 0)")
    p.add_argument("--host", help="run it on this host (default: the planner chooses)")
    p.add_argument("--standby", help="mirrored: its standby's host (default: planner)")
    p.add_argument("--observer", metavar="HOST:PORT",
                   help="mirrored: run it as a real mirror pair whose outputs go to this "
                   "observer (without it a mirrored VM runs as a stand-in process)")
    p.add_argument("--link-ports", metavar="D,H",
                   help="the pair's interconnect data and heartbeat ports (default: the "
                   f"lowest two free from {PAIR_PORTS_FROM})")
    p.add_argument("--guest-ram-mib", type=within(int, 1, 1 << 20), default=16, metavar="MIB",
                   help="the pair's synthetic guest's RAM (default 16)")
    p = vp.add_parser("remove", parents=[common], help="stop and forget a VM")
    p.add_argument("name")
    p = vp.add_parser("resize", parents=[common], help="change a VM's memory or vCPUs")
    p.add_argument("name")
    p.add_argument("--mem", type=within(int, 1, 1 << 30), required=True, metavar="MIB")
    p.add_argument("--vcpus", type=within(int, 1, 1 << 16), metavar="N")

    p = ps.add_parser("agent", parents=[common],
                      help="run this host's pool agent (and the pool controller, if elected)")
    p.add_argument("--host", required=True, help="this host's name in the pool")
    p.add_argument("--ttl", type=within(int, 1, 600), default=3, metavar="S",
                   help="lease TTL: the host is dead S seconds after its pool agent stops "
                        "(default 3)")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="this pool agent's directory: its interconnect key pair (keys/), its "
                   "pairs' roles (pairs/) and the VM stand-ins' starts and stops (vms.log); "
                   "default /var/lib/mirror/pool-HOST as root, else "
                   "$XDG_STATE_HOME/mirror/pool-HOST")
    p.add_argument("--mem", type=within(int, 1, 1 << 30), metavar="MIB",
                   help="add the host with this memory if the pool does not know it")
    p.add_argument("--vcpus", type=within(int, 1, 1 << 16), metavar="N")
    p.add_argument("--promote-wait", type=within(int, 1, 3600), default=10, metavar="S",
                   help="pool controller: a pair's standby that has not promoted S seconds after "
                   "its primary's host was found dead never will: the VM restarts as a "
                   "fresh pair (default 10)")
    p.add_argument("--metrics-listen", default="", metavar="HOST:PORT",
                   help="serve the metrics of this host's pair roles here (/metrics, each "
                   "series labelled by pair); default none: a pool's hosts share one machine "
                   "today, so each agent needs a port of its own, e.g. 127.0.0.1:9471 (the "
                   "host agent's is 9470)")


def run(args: argparse.Namespace) -> int:
    from mirror.config import ConfigError
    from mirror.ha.etcd import Etcd, EtcdError
    from mirror.pool import admission
    from mirror.pool.model import PoolError
    from mirror.pool.store import Conflict, Store

    try:
        store = Store(Etcd(args.etcd), args.prefix)
        cmd = args.pool_command
        if cmd == "agent":
            import logging

            from mirror.pool.poolagent import PoolAgent, stop_event

            logging.getLogger("mirror.pool").setLevel(logging.INFO)
            return PoolAgent(args.etcd, args.host, args.ttl, args.run_dir, args.mem,
                             args.vcpus, promote_wait=args.promote_wait,
                             prefix=store.prefix,
                             metrics_listen=args.metrics_listen).run(stop_event())
        if cmd == "status":
            return status(store, args.json)
        if cmd == "plan":
            return plan(store, args.failures, args.json)
        return change(store, args)
    except admission.Refused as r:
        if args.json:
            output.json_outcome(r, output.FAILED, refused=str(r), analysis=None
                                if r.analysis is None else r.analysis.to_json(False))
        return output.fail(str(r), prog="mirror pool")
    except (PoolError, EtcdError, Conflict, ConfigError, OSError) as e:
        return output.error(e, prog="mirror pool", as_json=args.json)
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
        return output.OK


def _op(args: argparse.Namespace) -> Callable[[Pool], admission.Outcome]:
    from mirror.pool import admission
    from mirror.pool.model import PoolError

    kw: dict[str, Any] = {"keep": "single"}
    cmd = args.pool_command
    if cmd == "config":
        over = None if args.allow_overcommit is None else args.allow_overcommit == "yes"
        if args.failures is None and over is None:
            raise PoolError("config: give --failures and/or --allow-overcommit")
        return lambda p: admission.configure(p, args.failures, over, **kw)
    if cmd == "host":
        hc = args.host_command
        if hc == "add":
            return lambda p: admission.add_host(p, args.name, args.mem, args.vcpus, **kw)
        if hc == "remove":
            return lambda p: admission.remove_host(p, args.name, **kw)
        return lambda p: admission.maintenance(p, args.name, args.mode == "on", **kw)
    vc = args.vm_command
    if vc == "add":
        if args.observer is None:
            if args.link_ports is not None:
                raise PoolError("--link-ports is only for a pair (give --observer)")
            return lambda p: admission.add_vm(p, args.name, args.mem, args.vcpus,
                                              args.priority, args.order, args.host,
                                              args.standby, **kw)
        return lambda p: _add_pair(p, args, **kw)
    if vc == "remove":
        return lambda p: admission.remove_vm(p, args.name, **kw)
    return lambda p: admission.resize_vm(p, args.name, args.mem, args.vcpus, **kw)


def _add_pair(pool: Pool, args: argparse.Namespace, **kw: Any) -> admission.Outcome:
    """`vm add --observer`: a mirrored VM that runs as a real pair (``pairs/NAME``)."""
    from mirror.config import ConfigError, parse_hostport
    from mirror.pool import admission
    from mirror.pool.model import PairSpec, PoolError, pair_name

    if args.priority != "mirrored":
        raise PoolError("--observer is only for mirrored VMs (they run as pairs)")
    try:
        parse_hostport(args.observer, "--observer")
    except ConfigError as e:
        raise PoolError(str(e)) from None
    if args.link_ports is not None:
        parts = args.link_ports.split(",")
        if len(parts) != 2 or not all(x.isdigit() and 1 <= int(x) <= 65535 for x in parts) \
                or parts[0] == parts[1]:
            raise PoolError(f"--link-ports: expected two different ports D,H, got "
                            f"{args.link_ports!r}")
        data, hb = int(parts[0]), int(parts[1])
        for vm, s in pool.pairs.items():
            if {data, hb} & {s.data_port, s.heartbeat_port}:
                raise PoolError(f"--link-ports {args.link_ports}: pair of VM {vm} uses them")
    else:
        data, hb = pool.free_pair_ports()
    out = admission.add_vm(pool, args.name, args.mem, args.vcpus, args.priority, args.order,
                           args.host, args.standby, **kw)
    out.pool.pairs[args.name] = PairSpec(pair_name(args.name), data, hb, args.observer,
                                         args.guest_ram_mib)
    return out


def change(store: Store, args: argparse.Namespace) -> int:
    op = _op(args)

    def apply(snap: Snapshot) -> tuple[Pool, Analysis, admission.Outcome]:
        out = op(snap.pool)
        return out.pool, out.analysis, out

    out: admission.Outcome = store.mutate(apply)
    a = out.analysis
    if args.json:
        print(json.dumps({"done": out.summary, "warning": out.warning,
                          "analysis": a.to_json(False)}, indent=1))
    else:
        print(f"{out.summary}: done. {_tolerance_line(out.pool, a)}")
    if out.warning:
        print(f"mirror pool: {out.warning}", file=sys.stderr)
    return output.OK


def _tolerance_line(pool: Pool, a: Analysis) -> str:
    at_least = "" if a.tolerated_exact else "at least "
    if a.gave_up:
        return f"cannot prove {a.k} host failure(s) within the planning budget"
    if a.tolerated < 0:
        state = "BROKEN: protected VMs have no place even with no failure"
    elif a.tolerates_all:
        state = (f"tolerates any number of host failures (all {a.up_hosts} up host(s) "
                 "included: nothing guaranteed needs one)" if a.up_hosts else
                 "has no up host and nothing that needs one: it tolerates any number of "
                 "host failures")
    else:
        state = f"tolerates {at_least}{a.tolerated} host failure(s)"
    if a.k == pool.failures_to_tolerate:
        want = f"failures_to_tolerate {a.k}: {'OK' if a.survives else 'OVERCOMMITTED'}"
    else:
        want = f"failures_to_tolerate is {pool.failures_to_tolerate}"
    return f"The pool {state} ({want})."


def _verdict(pool: Pool, a: Analysis, own: Analysis) -> dict[str, Any]:
    """The fields `status --json` and `plan --json` share, with the same meanings: ``a``'s
    (``failures``: the k asked about, the pool's own for status; ``survives``: every set of
    up to k up hosts is survivable; ``breaking``: the first set of size <= k that is not,
    null when it survives; ``tolerated`` ...) and ``overcommitted``: the pool does not
    survive its own failures_to_tolerate (``own``, the analysis for it)."""
    return {
        **a.to_json(with_plans=False),
        "failures_to_tolerate": pool.failures_to_tolerate,
        "allow_overcommit": pool.allow_overcommit,
        "overcommitted": not own.survives,
    }


def _snapshot(store: Store) -> Snapshot:
    """The pool's state; an error if nothing at all is stored under its prefix (a
    mistyped --prefix would otherwise show an empty pool that tolerates anything)."""
    from mirror.pool.model import PoolError

    snap = store.load()
    pool = snap.pool
    if not (snap.version or snap.members or pool.hosts or pool.vms):
        raise PoolError(
            f"no pool under prefix {store.prefix} on etcd at {store.etcd.url} (no key "
            f"there): is --prefix (or $MIRROR_POOL_PREFIX) right? `mirror pool host add` "
            f"or `mirror pool config` starts a pool there")
    pool.check()
    return snap


def status(store: Store, as_json: bool) -> int:
    from mirror.pool import admission
    from mirror.pool.analysis import analyse

    snap = _snapshot(store)
    pool = snap.pool
    a = analyse(pool, keep="none")
    used = pool.usage()
    hosts: list[dict[str, Any]] = []
    for name, host in sorted(pool.hosts.items()):
        agent = "alive" if name in snap.members else ("gone" if host.agent else "none")
        hosts.append({
            "name": name, "state": host.state, "agent": agent, "mem_mb": host.mem_mb,
            "vcpus": host.vcpus, "mem_used_mb": used[name][0], "vcpus_used": used[name][1],
            "runs": sorted(v for v, p in pool.placements.items() if p.host == name),
            "standbys": sorted(v for v, p in pool.placements.items() if p.standby == name),
        })
    vms = []
    for name, vm in sorted(pool.vms.items()):
        p = pool.placements.get(name)
        vms.append({"name": name, "priority": vm.priority, "order": vm.order,
                    "mem_mb": vm.mem_mb, "vcpus": vm.vcpus,
                    "host": p.host if p else None, "standby": p.standby if p else None,
                    "running_on": snap.running.get(name),
                    "pair": pool.pairs[name].to_json() if name in pool.pairs else None})
    if as_json:
        print(json.dumps({
            "etcd": store.etcd.url, "prefix": store.prefix, "version": snap.version,
            "leader": snap.leader, **_verdict(pool, a, a), "hosts": hosts, "vms": vms,
        }, indent=1))
        return output.OK
    print(f"pool {store.prefix} on etcd {store.etcd.url} (version {snap.version}, pool controller: "
          f"{snap.leader or 'none'})")
    print(f"failures_to_tolerate {pool.failures_to_tolerate}, allow_overcommit "
          f"{'yes' if pool.allow_overcommit else 'no'}")
    print(_tolerance_line(pool, a))
    if not a.survives and a.breaking is not None:
        print(f"  {admission.describe_break(a)}")
    print()
    print(f"{'HOST':<12} {'STATE':<12} {'AGENT':<6} {'MEM MiB used/total':>20} "
          f"{'VCPUS':>9}  VMS (standbys in brackets)")
    for h in hosts:
        runs = " ".join(h["runs"]) + "".join(f" [{s}]" for s in h["standbys"])
        print(f"{h['name']:<12} {h['state']:<12} {h['agent']:<6} "
              f"{str(h['mem_used_mb']) + '/' + str(h['mem_mb']):>20} "
              f"{str(h['vcpus_used']) + '/' + str(h['vcpus']):>9}  {runs}")
    print()
    print(f"{'VM':<14} {'PRIORITY':<12} {'ORDER':>5} {'MEM MiB':>8} {'VCPUS':>5}  "
          f"{'HOST':<12} {'STANDBY':<12} RUNNING (agent)")
    for v in vms:
        print(f"{v['name']:<14} {v['priority']:<12} {v['order']:>5} {v['mem_mb']:>8} "
              f"{v['vcpus']:>5}  {v['host'] or '-':<12} {v['standby'] or '-':<12} "
              f"{v['running_on'] or '-'}" + _pair_line(pool.pairs.get(str(v["name"]))))
    return output.OK


def _pair_line(spec: PairSpec | None) -> str:
    if spec is None:
        return ""
    return (f"  pair {spec.pair}, link ports {spec.data_port},{spec.heartbeat_port}, "
            f"observer {spec.observer}")


def plan(store: Store, failures: int | None, as_json: bool) -> int:
    from mirror.pool import admission
    from mirror.pool.analysis import analyse

    snap = _snapshot(store)
    pool = snap.pool
    k = pool.failures_to_tolerate if failures is None else failures
    a = analyse(pool, k, keep="all")
    own = a if k == pool.failures_to_tolerate else analyse(pool, keep="none")
    if as_json:
        print(json.dumps({**_verdict(pool, a, own), "plans": [
            fp.to_json() for fp in a.plans.values()]}, indent=1))
        return output.OK
    verdict = "survivable" if a.survives else "NOT survivable"
    print(f"{k} host failure(s): {verdict}. {_tolerance_line(pool, a)}")
    if not a.survives:
        print(f"  {admission.describe_break(a)}")
    print(f"({a.checked} failure sets checked in {a.seconds * 1000:.1f} ms)")
    quiet = []
    for fs, fp in a.plans.items():
        if not fp.moves and fp.ok and not fp.lost:
            if fs:
                quiet.append(", ".join(fs))
            continue
        head = "no failure (repair)" if not fs else "if " + ", ".join(fs) + " fail" + \
            ("s" if len(fs) == 1 else "")
        print(f"\n{head}:" + ("" if fp.ok else " BEYOND WHAT THE POOL TOLERATES"))
        for m in fp.moves:
            print(f"  {m.vm:<14} {m.kind:<12} -> {m.to}")
        if fp.down:
            print("  not running: " + ", ".join(f"{v} (needs {fp.needs[v]} MiB)"
                                                for v in fp.down))
        if fp.unprotected:
            print("  running without a standby: " + ", ".join(
                f"{v} (needs {fp.needs[v]} MiB)" for v in fp.unprotected))
        if not fp.ok:
            print(f"  short by {fp.shortfall_mb} MiB" + (
                "" if fp.optimal else "; the planner could not prove that no more can run"))
        if fp.lost:
            print(f"  best-effort VMs not restarted: {', '.join(fp.lost)}")
    if quiet:
        print(f"\nnothing moves if any one of these fails: {'; '.join(quiet)}")
    return output.OK
