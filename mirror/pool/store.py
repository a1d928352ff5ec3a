"""The pool's state on etcd.

Keys under the pool's prefix, ``/mirror/pool/`` unless ``--prefix`` names another so that
several pools share one etcd (values JSON):

    config              {"failures_to_tolerate": k, "allow_overcommit": false}
    hosts/NAME          {"mem_mb", "vcpus", "state": up|maintenance|dead, "agent"}
    vms/NAME            {"mem_mb", "vcpus", "priority", "order"}
    placements/NAME     {"host", "standby", "epoch"}
    pairs/NAME          a mirrored VM that runs as a real pair: {"pair", "data_port",
                        "heartbeat_port", "observer", "ram_mib", "dirty_pages_per_s",
                        "outputs_per_s", "seen_generation"} (see model.PairSpec)
    version             a counter every change bumps
    plan                the analysis of the current state (and single-failure plans)
    members/NAME        a live host agent, attached to its lease (gone: host dead)
    running/VM          the host whose pool agent runs VM now, attached to that pool agent's lease
    leader              the pool agent whose pool controller acts, attached to its lease
    claims/VM/EPOCH     who moved VM away from placement EPOCH (exactly one)
    events/SEQ          what the controller did, in order

The pairs of a pool keep their arbiter keys under ``/mirror/arbiter/PAIR/`` for the default
prefix and under ``PREFIX/arbiter/PAIR/`` for any other (:func:`arbiter_prefix`), so two
pools' pairs (each named ``vm-VM``) never share keys.  Two pools' prefixes must not be one
inside the other.

Every change is one transaction that compares ``version``'s mod_revision
with the one the change was computed from, so two concurrent changes can
never both commit over each other: the loser re-reads and re-plans.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mirror.config import ConfigError, check_key_prefix
from mirror.ha.etcd import KV, Etcd, delete_op, mod_is, put_op
from mirror.pool.analysis import Analysis
from mirror.pool.model import PREFIX as PREFIX  # the default pool's (model: no etcd to read it)
from mirror.pool.model import VM, Host, PairSpec, Placement, Pool, PoolError

ARBITER_PREFIX = "/mirror/arbiter"  # the default pool's pairs' arbiter keys (a pair's default)
_RESERVED = ("/mirror/arbiter/", PREFIX)


def pool_prefix(text: str) -> str:
    """A pool's key prefix from ``--prefix`` / ``$MIRROR_POOL_PREFIX``, normalised to end in
    ``/``; PoolError if it is malformed or nests with the default pool's or the pairs'."""
    try:
        prefix = check_key_prefix(text, "--prefix")
    except ConfigError as e:
        raise PoolError(str(e)) from None
    for r in _RESERVED:
        if prefix != PREFIX and (prefix.startswith(r) or r.startswith(prefix)):
            raise PoolError(f"--prefix {text!r} nests with {r} (the default pool's keys or "
                            f"its pairs' arbiter keys): choose one beside them, e.g. "
                            f"/mirror/pool-b/")
    return prefix


def arbiter_prefix(prefix: str) -> str:
    """Where the pairs of the pool at ``prefix`` keep their arbiter keys."""
    return ARBITER_PREFIX if prefix == PREFIX else prefix + "arbiter"


class Conflict(PoolError):
    """Someone else changed the pool first: re-read and try again."""


@dataclass
class Snapshot:
    pool: Pool
    version_rev: int  # mod_revision of the version key (0: empty pool)
    version: int
    revision: int  # etcd revision the snapshot was read at
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    leader: str | None = None
    running: dict[str, str] = field(default_factory=dict)  # VM -> host whose pool agent runs it
    hostkeys: dict[str, str] = field(default_factory=dict)  # host -> its public key (z85)


def _j(kv: KV) -> Any:
    return json.loads(kv.value)


class Store:
    def __init__(self, etcd: Etcd, prefix: str = PREFIX) -> None:
        self.etcd = etcd
        self.prefix = pool_prefix(prefix)
        self.arbiter = arbiter_prefix(self.prefix)  # the pairs' EtcdArbiter prefix

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def load(self) -> Snapshot:
        kvs, rev = self.etcd.get_prefix(self.prefix)
        pool = Pool()
        snap = Snapshot(pool, 0, 0, rev)
        n = len(self.prefix)
        try:
            for kv in kvs:
                rel = kv.key[n:]
                kind, _, name = rel.partition("/")
                if kind == "hosts":
                    pool.hosts[name] = Host.from_json(name, _j(kv))
                elif kind == "vms":
                    pool.vms[name] = VM.from_json(name, _j(kv))
                elif kind == "placements":
                    pool.placements[name] = Placement.from_json(_j(kv))
                elif kind == "pairs":
                    pool.pairs[name] = PairSpec.from_json(_j(kv))
                elif kind == "config":
                    c = _j(kv)
                    pool.failures_to_tolerate = int(c.get("failures_to_tolerate", 1))
                    pool.allow_overcommit = bool(c.get("allow_overcommit", False))
                elif kind == "version":
                    snap.version_rev, snap.version = kv.mod_revision, int(kv.value)
                elif kind == "members":
                    snap.members[name] = _j(kv)
                elif kind == "plan":
                    snap.plan = _j(kv)
                elif kind == "running":
                    snap.running[name] = str(_j(kv).get("host"))
                elif kind == "hostkeys":
                    snap.hostkeys[name] = kv.value.decode("ascii", "replace")
                elif kind == "leader":
                    snap.leader = str(_j(kv).get("host"))
        except (ValueError, KeyError, TypeError) as e:
            raise PoolError(f"the pool's state on etcd at {self.etcd.url} is damaged: {e!r}") \
                from None
        return snap

    def diff_ops(self, before: Pool, after: Pool) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        kinds: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
            ("hosts", before.hosts, after.hosts),
            ("vms", before.vms, after.vms),
            ("placements", before.placements, after.placements),
            ("pairs", before.pairs, after.pairs),
        )
        for kind, b, a in kinds:
            for name, obj in a.items():
                if b.get(name) != obj:
                    ops.append(put_op(self.key(kind, name), json.dumps(obj.to_json())))
            for name in b:
                if name not in a:
                    ops.append(delete_op(self.key(kind, name)))
        if (before.failures_to_tolerate, before.allow_overcommit) != (
            after.failures_to_tolerate, after.allow_overcommit
        ) or not before.hosts:
            ops.append(put_op(self.key("config"), json.dumps(
                {"failures_to_tolerate": after.failures_to_tolerate,
                 "allow_overcommit": after.allow_overcommit})))
        return ops

    def plan_json(self, a: Analysis, version: int) -> str:
        d = a.to_json(with_plans=False)
        d["version"] = version
        d["time"] = time.time()
        d["single_failure_plans"] = {
            fs[0]: [m.to_json() for m in fp.moves] for fs, fp in a.plans.items() if len(fs) == 1
        }
        return json.dumps(d)

    def commit(
        self, snap: Snapshot, after: Pool, analysis: Analysis | None,
        extra: list[dict[str, Any]] | None = None,
        compares: list[dict[str, Any]] | None = None,
    ) -> int:
        """Write ``after`` if nothing changed since ``snap``; returns the new version."""
        version = snap.version + 1
        ops = self.diff_ops(snap.pool, after) + list(extra or [])
        ops.append(put_op(self.key("version"), str(version)))
        if analysis is not None:
            ops.append(put_op(self.key("plan"), self.plan_json(analysis, version)))
        cmp = [mod_is(self.key("version"), snap.version_rev), *(compares or [])]
        ok, _ = self.etcd.txn(cmp, ops)
        if not ok:
            raise Conflict("the pool changed while this change was planned")
        return version

    def mutate(self, change: Callable[[Snapshot], tuple[Pool, Analysis | None, Any]],
               tries: int = 8, extra: list[dict[str, Any]] | None = None) -> Any:
        """Read, change, commit; on a conflict read again and re-plan (``tries`` times)."""
        for _ in range(tries):
            snap = self.load()
            after, analysis, result = change(snap)
            try:
                self.commit(snap, after, analysis, extra)
                return result
            except Conflict:
                time.sleep(0.05)
        raise Conflict(f"the pool kept changing: gave up after {tries} tries")

    def event_op(self, what: dict[str, Any]) -> dict[str, Any]:
        what = {"time": time.time(), **what}
        key = self.key("events", f"{time.time_ns():020d}-{os.getpid()}")
        return put_op(key, json.dumps(what))

    def events(self) -> list[dict[str, Any]]:
        kvs, _ = self.etcd.get_prefix(self.key("events") + "/")
        return [_j(kv) for kv in kvs]
