"""The pool agent: one per host of a pool; whichever leads also runs the pool controller.

Each host runs ``mirror pool agent --host NAME``.  It

- registers the host: a lease, and ``members/NAME`` attached to it, written
  in the same transaction that marks the host as having a pool agent; it keeps
  the lease alive.  A host whose lease expires is dead;
- runs the VMs placed on it: one process per VM (``mirror.pool.vmproc``, a
  stand-in for the hypervisor's VM), started when a placement names this
  host, stopped when it no longer does, restarted if it exits.  A mirrored
  VM with pair settings (``pairs/VM``) is a real pair instead: the pool agent of
  its host runs ``mirror primary`` and the pool agent of its standby's host runs
  ``mirror secondary``, children in the pool agent's process group, with a config
  written in ``RUN_DIR/pairs/VM/HOST/`` (the pool's etcd as the pair's
  arbiter).  When the pool records that the standby promoted, the pool agent
  keeps that process: it is the VM's primary now.  A host that
  is not ``up`` (declared dead, or in maintenance) runs nothing.  Before it
  starts a VM it creates ``running/VM`` attached to its lease, in a
  transaction that fails if another host holds it: a VM moved away from a
  live host starts on its new host only once the old one has stopped it
  (a dead host's key goes with its lease).  A pool agent that cannot renew its
  lease for 70 % of its TTL stops its VMs (it may be declared dead);
- serves its real pairs' roles' metrics on one port, ``--metrics-listen`` (as the host
  agent does: mirror/ha/agentmetrics.py): each role hands its metrics over a unix socket
  in its state directory, the pool agent serves them all labelled by pair, with
  ``mirror_agent_role_up``.  The stand-in VM processes have no metrics;
- takes part in electing the pool controller: ``leader`` is created, attached to
  the pool agent's lease, by whoever gets there first (a transaction), and
  passes to another pool agent when the leader's lease expires.

The controller (leader only) is mirror/pool/poolcontroller.py.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq

from mirror import config as config_mod
from mirror.config import (
    ArbiterConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    GuestConfig,
    KeysConfig,
    LinkConfig,
    MetricsConfig,
    NodeConfig,
    OutputConfig,
    PairConfig,
    parse_hostport,
)
from mirror.ha import agentmetrics, claims
from mirror.ha.etcd import Etcd, EtcdError, absent, delete_op, mod_is, put_op, range_op
from mirror.hoststate import read_json, write_atomic
from mirror.pool import admission
from mirror.pool.analysis import analyse
from mirror.pool.model import PairSpec, Placement, Pool, PoolError
from mirror.pool.poolcontroller import PROMOTE_WAIT_S, PoolController
from mirror.pool.store import ARBITER_PREFIX, PREFIX, Conflict, Snapshot, Store
from mirror.replication import keys

log = logging.getLogger("mirror.pool.poolagent")


SHM = Path("/dev/shm")
PEER_KEY = "peer.key"  # a pair role's peer's public key, in its state_dir


def default_root(host: str) -> Path:
    """A pool agent's directory without ``--run-dir``: /var/lib/mirror/pool-HOST as root,
    else $XDG_STATE_HOME/mirror/pool-HOST (~/.local/state/...): a state directory, not
    $TMPDIR (its secret key lives there)."""
    if os.geteuid() == 0:
        return Path("/var/lib/mirror") / f"pool-{host}"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mirror" / f"pool-{host}"


@dataclass
class Child:
    """What this host runs for a VM: its stand-in process (role ``vm``), or its pair's
    ``primary`` or ``secondary`` (``mirror primary|secondary`` with its config in
    ``state_dir``).  ``held``: this host holds ``running/VM``."""

    proc: subprocess.Popen[bytes]
    role: str
    state_dir: Path | None = None
    pair: str | None = None  # a pair role's pair name (its metrics' ``pair`` label)
    held: bool = False
    switch_until: float | None = None  # handing over to its standby: stop it by then


def pair_config(
    spec: PairSpec, host: str, etcd_url: str, state_dir: Path,
    arbiter_prefix: str = ARBITER_PREFIX, secret_key: Path | None = None,
) -> Config:
    """The configuration of one role of a pool VM's pair on ``host``: the pool's etcd as
    its arbiter (keys under ``arbiter_prefix``, the pool's), the VM's interconnect ports
    (on loopback: every host is 127.0.0.1) and observer, and its synthetic guest; this
    host's interconnect key and its peer's public key (``peer.key`` in ``state_dir``,
    which the pool agent keeps to the peer the pool places).  Its metrics go to the pool
    agent over a unix socket in ``state_dir`` (``metrics.sock``), no port of its own."""
    return Config(
        keys=KeysConfig(secret_key=str(secret_key or ""),
                        peer_public_key=str(state_dir / PEER_KEY)),
        pair=PairConfig(name=spec.pair),
        node=NodeConfig(name=host, state_dir=str(state_dir)),
        link=LinkConfig(host="127.0.0.1", data_port=spec.data_port,
                        heartbeat_port=spec.heartbeat_port),
        checkpoint=CheckpointConfig(epoch_ms=50, threads=1),
        guest=GuestConfig(ram_mib=spec.ram_mib, dirty_pages_per_s=spec.dirty_pages_per_s,
                          outputs_per_s=spec.outputs_per_s),
        output=OutputConfig(observer=spec.observer),
        arbiter=ArbiterConfig(dir=str(state_dir / "arbiter"), etcd=etcd_url,
                              etcd_prefix=arbiter_prefix),
        # many pairs per host: each hands its metrics to the pool agent, which serves them
        # all on one port (--metrics-listen)
        metrics=MetricsConfig(listen="",
                              socket=str((state_dir / agentmetrics.SOCKET).absolute())),
    )


class PoolAgent:
    def __init__(
        self, etcd_url: str, host: str, ttl: int = 3, run_dir: Path | None = None,
        mem_mb: int | None = None, vcpus: int | None = None, interval: float | None = None,
        promote_wait: float = PROMOTE_WAIT_S, prefix: str = PREFIX, metrics_listen: str = "",
    ) -> None:
        self.etcd = Etcd(etcd_url, timeout=max(1.0, ttl / 2))
        self.store = Store(self.etcd, prefix)
        self.host = host
        self.ttl = ttl
        self.run_dir = run_dir
        self.mem_mb, self.vcpus = mem_mb, vcpus
        self.interval = interval if interval is not None else min(1.0, ttl / 4)
        self.lease = 0
        self.promote_wait = promote_wait
        self.waits: dict[str, float] = {}  # the pool controller's: VM -> since when it waits
        self.procs: dict[str, Child] = {}
        self.placed: dict[str, Placement] = {}  # the placements of the last reconcile
        self.leader = False
        self.metrics_listen = metrics_listen  # HOST:PORT; "": no metrics served
        self.metrics: agentmetrics.AgentMetrics | None = None

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
                        f"or give the pool agent --mem and --vcpus"
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
        want: dict[str, str] = {}  # VM -> the role this host runs for it
        if me is not None and me.state == "up":
            for v, p in pool.placements.items():
                real_pair = v in pool.pairs
                if p.host == self.host:
                    want[v] = "primary" if real_pair else "vm"
                elif p.standby == self.host and real_pair:
                    want[v] = "secondary"
        placed, self.placed = self.placed, dict(pool.placements)
        for vm in sorted(self.procs):
            c = self.procs[vm]
            w = want.get(vm)
            if w == c.role:
                continue
            if c.role == "secondary" and w == "primary":
                if self._promoted_here(c):
                    # the pair's own failover rules promoted this standby: it runs the VM now
                    log.warning("VM %s: its standby here promoted; it is the primary now", vm)
                    c.role = "primary"
                    continue
                if snap.running.get(vm) not in (None, self.host) and c.proc.poll() is None:
                    continue  # its primary still runs (it may hand over to this standby)
            if c.role == "primary" and vm in pool.pairs and self._switching(vm, c, placed.get(
                    vm), pool.placements.get(vm)):
                continue
            self._stop(vm)
        for vm in sorted(want):
            had = self.procs.get(vm)
            if had is not None and had.proc.poll() is None:
                if had.role == "primary" and not had.held:
                    had.held = self._hold(vm)
                continue
            if had is not None:
                log.warning("VM %s (%s) exited (%s): starting it again", vm, had.role,
                            had.proc.returncode)
                del self.procs[vm]
            self._start(vm, want[vm], pool.pairs.get(vm), snap)
        for vm, c in self.procs.items():  # a pair role's peer moved: its key follows
            if c.state_dir is not None and c.proc.poll() is None and vm in pool.pairs:
                self._write_peer_key(vm, c.state_dir, snap)

    def _switching(self, vm: str, c: Child, old: Placement | None,
                   new: Placement | None) -> bool:
        """A pair's primary placed away from here onto its own standby's host (maintenance):
        hand over to the standby (a planned switchover, nothing lost) rather than stop it.
        True while the handover goes on; then it is stopped as any role."""
        if c.switch_until is None:
            if old is None or new is None or old.standby is None or new.host != old.standby \
                    or c.state_dir is None or c.proc.poll() is not None:
                return False
            try:
                st = read_json(c.state_dir / "status.json")
            except (OSError, ValueError):
                return False
            if st.get("role") != "primary" or st.get("phase") != "protected":
                return False
            log.info("VM %s: handing over to its standby on %s", vm, new.host)
            c.proc.send_signal(signal.SIGUSR2)  # `mirror switchover`
            c.switch_until = time.monotonic() + 15
            return True
        try:
            st = read_json(c.state_dir / "status.json") if c.state_dir else {}
        except (OSError, ValueError):
            st = {}
        done = st.get("role") == "secondary" or st.get("phase") == "switched-over"
        if done or c.proc.poll() is not None or time.monotonic() > c.switch_until:
            (log.info if done else log.warning)(
                "VM %s: %s", vm, "handed over" if done else "handover not done")
            return False
        return True

    def _hold(self, vm: str) -> bool:
        """Create ``running/VM`` for this host (attached to its lease) unless another host
        holds it: the runtime guard against running a VM (or a pair's primary) twice; a
        dead host's key goes with its lease."""
        key = self.store.key("running", vm)
        body = json.dumps({"host": self.host, "time": time.time()})
        ok, resp = self.etcd.txn([absent(key)], [put_op(key, body, self.lease)],
                                 [range_op(key)])
        if not ok:
            kvs = Etcd.range_kvs(resp[0]) if resp else []
            holder = json.loads(kvs[0].value).get("host") if kvs else None
            if not kvs or holder != self.host or kvs[0].lease != self.lease:
                log.info("VM %s: waiting for %s to stop it", vm, holder)
                return False
        return True

    # -- interconnect keys ---------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """Where this agent keeps its key pair and its pairs' roles: ``--run-dir``, else a
        state directory of this host's (never $TMPDIR: the secret key lives there)."""
        return self.run_dir if self.run_dir is not None else default_root(self.host)

    @property
    def key_dir(self) -> Path:
        return self.root / "keys"

    @property
    def secret_key(self) -> Path:
        return self.key_dir / f"{self.host}.key_secret"

    def publish_key(self) -> None:
        """Make this host's interconnect key pair (once) and publish its public key in etcd
        (``hostkeys/HOST``), whence the pool agents configure the pairs this host is part of."""
        if not self.secret_key.exists():
            keys.generate(self.key_dir, self.host)
        public, _ = keys.load_secret(self.secret_key)
        self.etcd.put(self.store.key("hostkeys", self.host), public)

    def _write_peer_key(self, vm: str, state: Path, snap: Snapshot) -> bool:
        """Keep ``peer.key`` of VM's pair role here to its peer's published public key (the
        standby's host for a primary, the primary's for a standby).  While the peer or its
        key is not known, a key nobody holds stands in, and False: a primary starts with
        it and pairs with no one until the pool agent writes the real key (it reconnects
        then); a secondary (whose ZAP handler admits the key it started with) waits."""
        p = snap.pool.placements.get(vm)
        peer = None if p is None else p.standby if p.host == self.host else p.host
        key = snap.hostkeys.get(peer or "", "")
        path = state / PEER_KEY
        if not keys.valid_z85(key.encode()):
            if not path.exists():
                placeholder, _ = zmq.curve_keypair()
                write_atomic(path, b'public-key = "' + placeholder + b'"\n')
            return False
        text = f'public-key = "{key}"\n'
        try:
            if path.read_text() == text:
                return True
        except OSError:
            pass
        write_atomic(path, text.encode())
        log.info("VM %s: its pair's peer here is %s (key %s)", vm, peer,
                 keys.fingerprint(key.encode()))
        return True

    def _start(self, vm: str, role: str, pair: PairSpec | None, snap: Snapshot) -> None:
        if role == "primary" and pair is not None and (
                won := claims.unrecorded_promotion(self.etcd, self.store.arbiter, pair.pair,
                                                   pair.seen_generation)) is not None:
            # a fresh primary here while the pair's standby has promoted (the pool has not
            # recorded it yet) would be a second one: wait for the pool
            log.info("VM %s: its standby %s promoted (generation %d): not starting a primary",
                     vm, won[1], won[0])
            return
        if role != "secondary" and not self._hold(vm):
            return
        if role == "vm" or pair is None:
            cmd = [sys.executable, "-m", "mirror.pool.vmproc", vm, self.host]
            if self.run_dir is not None:
                cmd.append(str(self.run_dir / "vms.log"))
            self.procs[vm] = Child(subprocess.Popen(cmd, stdin=subprocess.DEVNULL), role,
                                   held=True)
        else:
            state = self.pair_dir(vm)
            state.mkdir(parents=True, exist_ok=True)
            (state / "status.json").unlink(missing_ok=True)  # a past role's, if any
            if role == "secondary":  # a standby of this node that died leaves its image
                (SHM / f"mirror-{pair.pair}-{self.host}-standby.img").unlink(missing_ok=True)
            if not self._write_peer_key(vm, state, snap) and role == "secondary":
                return  # its primary's key is not published yet: on a later round
            cfg_path = state / "mirror.toml"
            cfg_path.write_text(config_mod.to_toml(
                pair_config(pair, self.host, self.etcd.url, state, self.store.arbiter,
                            secret_key=self.secret_key)))
            with open(state / "agent.log", "ab") as out:
                extra = ["--leave-after-switchover"] if role == "primary" else []
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mirror", role, "--config", str(cfg_path), *extra],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            self.procs[vm] = Child(proc, role, state, held=role == "primary", pair=pair.pair)
        log.info("VM %s: %s started on %s (pid %d)", vm,
                 "pair " + role if role != "vm" else "VM", self.host, self.procs[vm].proc.pid)

    def pair_dir(self, vm: str) -> Path:
        return self.root / "pairs" / vm / self.host

    @staticmethod
    def _promoted_here(c: Child) -> bool:
        if c.proc.poll() is not None or c.state_dir is None:
            return False
        try:
            return bool(read_json(c.state_dir / "status.json").get("role") == "primary")
        except (OSError, ValueError):
            return False

    def _stop(self, vm: str, release: bool = True) -> None:
        c = self.procs.pop(vm)
        p = c.proc
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.info("VM %s (%s) stopped on %s", vm, c.role, self.host)
        if release and c.role != "secondary":
            key = self.store.key("running", vm)
            kv = self.etcd.get(key)
            if kv is not None and kv.lease == self.lease:
                self.etcd.txn([mod_is(key, kv.mod_revision)], [delete_op(key)])

    def stop_all(self, release: bool = True) -> None:
        for vm in list(self.procs):
            self._stop(vm, release)

    def fence(self) -> None:
        """No lease renewed for most of its TTL: it may have expired and the pool controller
        may be restarting this host's VMs elsewhere, so stop them here now."""
        if self.procs:
            log.warning("host %s cannot renew its lease: stopping its %d VM(s)",
                        self.host, len(self.procs))
            self.stop_all(release=False)

    # -- metrics -------------------------------------------------------------------------------

    def metric_targets(self) -> list[tuple[str, Path]]:
        """(pair, its role's metrics socket) of each pair role this host runs (the stand-in
        VMs have no metrics); read from the scrape's thread, hence the copy."""
        return sorted((c.pair, c.state_dir / agentmetrics.SOCKET)
                      for c in list(self.procs.values())
                      if c.pair is not None and c.state_dir is not None)

    def serve_metrics(self) -> agentmetrics.AgentMetrics | None:
        """Its pairs' metrics on ``--metrics-listen`` (None when it is ""); a bad or taken
        address is a ConfigError (one line, exit 2)."""
        if not self.metrics_listen:
            return None
        try:
            served = agentmetrics.AgentMetrics(
                parse_hostport(self.metrics_listen, "--metrics-listen"), self.metric_targets,
                self.host)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {self.metrics_listen}: {e.strerror or e}; give "
                f'--metrics-listen a free HOST:PORT, or "" to serve none'
            ) from None
        log.info("host %s serves its pairs' metrics on http://%s/metrics", self.host,
                 served.address)
        return served

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self.metrics = self.serve_metrics()  # first: a taken port changes nothing in the pool
        try:
            return self._run(stop)
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None

    def _run(self, stop: threading.Event) -> int:
        self.publish_key()
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
                        PoolController(self.store, self.host, self.waits,
                                   self.promote_wait).step(snap)
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


def stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
