"""The pool's model: hosts, VMs, placements, and the pool's guarantee settings.

A host has memory (MiB) and vCPUs and a state: ``up`` (runs VMs and can take
more), ``maintenance`` (being emptied or empty; takes no VM) or ``dead``
(its lease expired).  A VM has memory, vCPUs, a priority and a restart order:

- ``mirrored``: a pair.  It runs on ``host`` and its standby holds memory
  and vCPUs reserved on ``standby`` (as everRun does), so a failover needs
  nothing new where the standby is; the pair then needs a new standby.
- ``restart``: guaranteed to be restarted on another host after a failure.
- ``best-effort``: restarted only if room is left once the others are placed.

Within a priority, VMs with a lower ``order`` are restarted first.

Every resource is counted as a hard limit: a host's VMs and standby
reservations never add up to more memory or vCPUs than it has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

# defined in mirror/pool/__init__.py (light, for `mirror pool --help`), re-exported here
from mirror.pool import PAIR_PORTS_FROM as PAIR_PORTS_FROM
from mirror.pool import PREFIX as PREFIX
from mirror.pool import PRIORITIES as PRIORITIES

GUARANTEED = ("mirrored", "restart")


class PoolError(ValueError):
    """An operation on the pool is invalid; the message says why.  Nothing changed."""


@dataclass(frozen=True)
class Host:
    name: str
    mem_mb: int
    vcpus: int
    state: str = "up"
    agent: bool = False  # a pool agent has registered for it (so a lapsed lease means dead)

    def to_json(self) -> dict[str, Any]:
        return {"mem_mb": self.mem_mb, "vcpus": self.vcpus, "state": self.state,
                "agent": self.agent}

    @staticmethod
    def from_json(name: str, d: dict[str, Any]) -> Host:
        return Host(name, int(d["mem_mb"]), int(d["vcpus"]), str(d.get("state", "up")),
                    bool(d.get("agent", False)))


@dataclass(frozen=True)
class VM:
    name: str
    mem_mb: int
    vcpus: int
    priority: str = "restart"
    order: int = 0

    @property
    def guaranteed(self) -> bool:
        return self.priority in GUARANTEED

    def to_json(self) -> dict[str, Any]:
        return {"mem_mb": self.mem_mb, "vcpus": self.vcpus, "priority": self.priority,
                "order": self.order}

    @staticmethod
    def from_json(name: str, d: dict[str, Any]) -> VM:
        return VM(name, int(d["mem_mb"]), int(d["vcpus"]), str(d["priority"]),
                  int(d.get("order", 0)))


@dataclass(frozen=True)
class Placement:
    host: str | None  # where the VM runs (None: not running)
    standby: str | None = None  # mirrored VMs: where the standby's reservation is
    epoch: int = 0  # bumped each time the placement changes (claims are per epoch)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "standby": self.standby, "epoch": self.epoch}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Placement:
        h, s = d.get("host"), d.get("standby")
        return Placement(None if h is None else str(h), None if s is None else str(s),
                         int(d.get("epoch", 0)))


def over(free_mb: int, free_vcpus: int) -> str:
    """What a negative free amount means, e.g. "2048 MiB over" (only what is over)."""
    parts = [f"{-free_mb} MiB" if free_mb < 0 else "", f"{-free_vcpus} vCPUs" if free_vcpus < 0
             else ""]
    return " and ".join(p for p in parts if p) + " over"




def pair_name(vm: str) -> str:
    """The mirror pair name of a pool VM: ``vm-NAME``, unique in the pool, within the pair
    name's 64 characters (a long name is cut and made unique by a hash of the whole)."""
    name = f"vm-{vm}"
    if len(name) <= 64:
        return name
    return f"{name[:47]}-{hashlib.sha256(vm.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class PairSpec:
    """How a ``mirrored`` VM runs as a real mirror pair (``pairs/VM``): the pair's name, its
    interconnect ports, the observer its outputs go to, and its (synthetic) guest.
    ``seen_generation``: the highest generation whose arbiter claim the pool has acted on
    (a promotion claim of a later generation naming the standby means it promoted)."""

    pair: str
    data_port: int
    heartbeat_port: int
    observer: str  # HOST:PORT
    ram_mib: int = 16
    dirty_pages_per_s: int = 2000
    outputs_per_s: int = 100
    seen_generation: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"pair": self.pair, "data_port": self.data_port,
                "heartbeat_port": self.heartbeat_port, "observer": self.observer,
                "ram_mib": self.ram_mib, "dirty_pages_per_s": self.dirty_pages_per_s,
                "outputs_per_s": self.outputs_per_s, "seen_generation": self.seen_generation}

    @staticmethod
    def from_json(d: dict[str, Any]) -> PairSpec:
        return PairSpec(str(d["pair"]), int(d["data_port"]), int(d["heartbeat_port"]),
                        str(d["observer"]), int(d.get("ram_mib", 16)),
                        int(d.get("dirty_pages_per_s", 2000)), int(d.get("outputs_per_s", 100)),
                        int(d.get("seen_generation", 0)))


@dataclass
class Pool:
    hosts: dict[str, Host] = field(default_factory=dict)
    vms: dict[str, VM] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    failures_to_tolerate: int = 1
    allow_overcommit: bool = False
    pairs: dict[str, PairSpec] = field(default_factory=dict)  # mirrored VMs run as pairs

    def copy(self) -> Pool:
        return Pool(dict(self.hosts), dict(self.vms), dict(self.placements),
                    self.failures_to_tolerate, self.allow_overcommit, dict(self.pairs))

    def free_pair_ports(self, start: int = PAIR_PORTS_FROM) -> tuple[int, int]:
        """The lowest two consecutive ports from ``start`` that no pair of the pool uses."""
        used = {p for s in self.pairs.values() for p in (s.data_port, s.heartbeat_port)}
        port = start
        while port in used or port + 1 in used:
            port += 2
        if port + 1 > 65535:
            raise PoolError("no interconnect ports left for another pair")
        return port, port + 1

    def up_hosts(self) -> list[str]:
        return sorted(h.name for h in self.hosts.values() if h.state == "up")

    def usage(self) -> dict[str, tuple[int, int]]:
        """Memory and vCPUs each host has taken (running VMs plus standby reservations)."""
        used = {h: (0, 0) for h in self.hosts}
        for name, p in self.placements.items():
            vm = self.vms[name]
            for h in (p.host, p.standby):
                if h is not None and h in used:
                    m, c = used[h]
                    used[h] = (m + vm.mem_mb, c + vm.vcpus)
        return used

    def free(self) -> dict[str, tuple[int, int]]:
        used = self.usage()
        return {h.name: (h.mem_mb - used[h.name][0], h.vcpus - used[h.name][1])
                for h in self.hosts.values()}

    def vms_on(self, host: str) -> list[str]:
        """VMs that run on, or hold a standby on, ``host``."""
        return sorted(n for n, p in self.placements.items() if host in (p.host, p.standby))

    def place(self, vm: str, host: str | None, standby: str | None = None) -> None:
        old = self.placements.get(vm)
        self.placements[vm] = Placement(host, standby, (old.epoch + 1) if old else 1)

    def set_host_state(self, host: str, state: str) -> None:
        self.hosts[host] = replace(self.hosts[host], state=state)

    def check(self) -> None:
        """Raise PoolError if the placements break a hard limit (a bug, or a bad store)."""
        for name, p in self.placements.items():
            if name not in self.vms:
                raise PoolError(f"placement for unknown VM {name}")
            for h in (p.host, p.standby):
                if h is not None and h not in self.hosts:
                    raise PoolError(f"VM {name} is placed on unknown host {h}")
            if p.standby is not None and p.standby == p.host:
                raise PoolError(f"VM {name} has its standby on its own host {p.host}")
        for name in self.pairs:
            if name not in self.vms or self.vms[name].priority != "mirrored":
                raise PoolError(f"pair settings for {name}, which is not a mirrored VM")
        for h, (m, c) in self.free().items():
            if m < 0 or c < 0:
                raise PoolError(f"host {h} is over its capacity ({over(m, c)})")

    def to_json(self) -> dict[str, Any]:
        return {
            "failures_to_tolerate": self.failures_to_tolerate,
            "allow_overcommit": self.allow_overcommit,
            "hosts": {n: h.to_json() for n, h in sorted(self.hosts.items())},
            "vms": {n: v.to_json() for n, v in sorted(self.vms.items())},
            "placements": {n: p.to_json() for n, p in sorted(self.placements.items())},
            "pairs": {n: s.to_json() for n, s in sorted(self.pairs.items())},
        }
