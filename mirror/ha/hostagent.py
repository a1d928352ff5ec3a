"""The host agent (`mirror agent`): one per host, it owns every pair role on the host.

It keeps one directory per pair under ``STATE_DIR/pairs/PAIR/`` (its definition, the
role's configuration and state: mirror/ha/pairdef.py); pairs are made and undone with
the peer's host agent by mirror/ha/pairing.py.

Each role is an unchanged ``mirror primary`` or ``mirror secondary --config mirror.toml``
process in a session (process group) of its own, so that the host agent can be restarted or
upgraded under running guests: a stopped agent leaves its roles running, and a started
one adopts every role that still answers on its control socket (watching its pid through
a pidfd).  A role that is gone is resumed safely (:meth:`HostAgent.resume`): a secondary
is started again (it never runs a guest it has not been sent); a primary's guest only
as the "resume" claim allows (mirror/ha/claims.py): if the peer may run the guest (its
heartbeat is fresh, or it won the generation's claim) this host becomes its secondary
instead, and when the peer is silent this host first wins the generation's claim (so the
peer can never promote in it) and leads under the next generation.

Every pair's metrics are served on the host agent's one port, ``[agent] metrics_listen``
(mirror/ha/agentmetrics.py); the roles also log to journald or syslog with their pair as a
field (``[agent] log``: mirror/ha/logsink.py), and each role.log is capped (:func:`cap_log`).

The CLI talks to it over ``STATE_DIR/control.sock`` (mirror/ha/control.py: SO_PEERCRED,
root or the host agent's user); agents talk to each other over mirror/ha/peerlink.py
(CurveZMQ, only the keys in ``[peers]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mirror.config import (
    AgentConfig,
    Config,
    ConfigError,
    load_agent,
    parse_hostport,
    to_toml,
)
from mirror.guests import domaincheck
from mirror.guests.libvirtdom import Domains, LibvirtError
from mirror.ha import agentmetrics, claims, cleanup, control, pairdef, peerlink
from mirror.ha.arbiter import ArbiterError
from mirror.ha.pairdef import AgentError, PairDef, check_name
from mirror.ha.pairing import Pairing
from mirror.ha.peerlink import PeerAddress, PeerError
from mirror.ha.role import JsonFormatter, event, make_arbiter
from mirror.hoststate import open_private, private_dir, read_json, write_atomic
from mirror.replication import keys

log = logging.getLogger("mirror.ha.hostagent")
ROLE_LOG_MAX = 4 << 20  # bytes of a role's role.log; beyond, it becomes role.log.1
LOG_CHECK_S = 10.0  # how often the roles' logs are measured


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) ``state``, when it runs us with $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(state.encode(), addr)


@dataclass
class Running:
    """A role process: our child (``proc``) or one adopted from an earlier agent (a pidfd)."""

    pid: int
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pidfd < 0:
            return False
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return not r

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class HostAgent:
    def __init__(
        self, cfg: AgentConfig, *, config_dir: Path | None = None, config_path: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.node = cfg.agent.node
        self.dir = cfg.state_dir
        self.pairs_dir = self.dir / "pairs"
        self.lock = threading.RLock()
        self.defs: dict[str, PairDef] = {}
        self.running: dict[str, Running] = {}
        self.waiting: dict[str, str] = {}  # pair -> why its role is not started (logged once)
        self.config_dir = config_dir or (config_path.parent if config_path else Path("."))
        self.config_path = config_path
        self.public, self.secret, self.peers = self._keys(cfg)
        self.reload_wanted = threading.Event()  # SIGHUP; done by the loop
        self.server: peerlink.PeerServer | None = None
        self.ctl: control.ControlServer | None = None
        self.dlock: control.StateDirLock | None = None
        self.metrics: agentmetrics.AgentMetrics | None = None
        self._logs_checked = 0.0
        self.pairing = Pairing(self)

    def _keys(self, cfg: AgentConfig) -> tuple[bytes, bytes, dict[str, PeerAddress]]:
        """This host's key pair and its peers' addresses and keys, as ``cfg`` names them."""
        if not cfg.keys.secret_key:
            raise ConfigError(
                "[keys] secret_key not set: the host agents' interconnect needs this host's key "
                "(`mirror keygen --dir /etc/mirror --name HOST`)"
            )
        base = self.config_dir
        secret_path = Path(cfg.keys.secret_key)
        public, secret = keys.load_secret(
            secret_path if secret_path.is_absolute() else base / secret_path
        )
        peers: dict[str, PeerAddress] = {}
        for name, p in cfg.peers.items():
            key = keys.parse_public(p.public_key, None if Path(p.public_key).is_absolute()
                                    else base)
            peers[name] = PeerAddress(name, p.address, p.port, key)
        return public, secret, peers

    def reload_keys(self, config_path: Path) -> dict[str, Any]:
        """SIGHUP or `mirror keys reload` (no --config): read the configuration's [keys]
        and [peers] keys again; the host agents' interconnect admits the new peer keys from now
        on (its port bound again if this host's own key changed), and each running role
        gets its configuration written again and reloads it.  An error changes nothing."""
        try:
            cfg = load_agent(config_path)
            public, secret, peers = self._keys(cfg)
        except ConfigError as e:
            event("keys-reload-failed", logging.ERROR, node=self.node, error=str(e))
            return {"reloaded": False, "error": str(e)}
        with self.lock:
            own_changed = (public, secret) != (self.public, self.secret)
            peers_changed = peers != self.peers
            self.cfg = replace(self.cfg, keys=cfg.keys, peers=cfg.peers)
            self.public, self.secret, self.peers = public, secret, peers
            if self.server is not None and own_changed:
                self.server.close()
                self.server = self._serve_peers()
            elif self.server is not None:
                self.server.admit.peers = {p.public_key: n for n, p in peers.items()}
            roles: dict[str, str] = {}
            asked = []
            for pair, r in list(self.running.items()):
                d = self.defs.get(pair)
                if d is None or not r.alive():
                    continue
                pdir = self.pair_dir(pair)
                try:
                    write_atomic(pdir / "mirror.toml", to_toml(self.role_config(d)).encode())
                    asked.append((pair, pdir / "role"))
                except (ConfigError, AgentError, OSError) as e:
                    roles[pair] = f"not reloaded: {e}"
        for pair, role_dir in asked:  # not under the lock: each may take a while
            try:
                a = control.ask(role_dir, "reload-keys", timeout=20.0, refused_ok=True)
                roles[pair] = a.get("error") or ("changed" if a.get("changed") else "unchanged")
            except control.ControlError as e:
                roles[pair] = f"not reloaded: {e}"
        fields: dict[str, Any] = {
            "own_key": keys.fingerprint(public), "changed": own_changed or peers_changed,
                  "peers": {n: keys.fingerprint(p.public_key) for n, p in peers.items()},
                  "roles": roles}  # fmt: skip
        event("keys-reloaded", node=self.node, **fields)
        return {"reloaded": True, **fields}

    def _serve_peers(self) -> peerlink.PeerServer:
        a = self.cfg.agent
        server = peerlink.PeerServer(
            a.address, a.port, self.public, self.secret,
            {n: p.public_key for n, p in self.peers.items()}, self.pairing.peer_request,
        )  # fmt: skip
        server.start()
        return server

    # -- definitions -----------------------------------------------------------------------

    def domain_dirs(self) -> list[str]:
        """Where the files of a standby's domain may be: [agent] domain_dirs, and the
        agent's own state_dir."""
        dirs = [d for d in self.cfg.agent.domain_dirs.split(":") if d]
        return [*dirs, str(self.cfg.state_dir)]

    def pair_dir(self, pair: str) -> Path:
        return self.pairs_dir / check_name(pair)

    def save(self, d: PairDef) -> None:
        pairdef.save(self.pair_dir(d.pair), d)

    def load_defs(self) -> None:
        self.defs.update(pairdef.load_all(self.pairs_dir))

    def role_config(self, d: PairDef) -> Config:
        """The role's configuration from the definition (mirror/ha/pairdef.py)."""
        return pairdef.role_config(d, self.cfg, self.peers, self.pair_dir(d.pair))

    def forget(self, pair: str) -> None:
        self.defs.pop(pair, None)
        self.waiting.pop(pair, None)
        shutil.rmtree(self.pair_dir(pair), ignore_errors=True)
        event("pair-removed", pair=pair)

    # -- roles -----------------------------------------------------------------------------

    def start_role(self, d: PairDef) -> None:
        cfg = self.role_config(d)
        pdir = self.pair_dir(d.pair)
        path = pdir / "mirror.toml"
        write_atomic(path, to_toml(cfg).encode())
        private_dir(pdir / "role")
        # the host agent's own log format for its roles' (their stderr, and their [log] sink)
        as_json = any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
        with open_private(pdir / "role.log") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", d.role, "--config", str(path),
                 *(["--log-json"] if as_json else [])],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the host agent; stopped by its group
            )
        self.running[d.pair] = Running(proc.pid, proc)
        self.waiting.pop(d.pair, None)
        event("role-started", pair=d.pair, role=d.role, pid=proc.pid, generation=d.generation)

    def adopt(self, d: PairDef) -> bool:
        """Take over a role an earlier agent started, if it still runs."""
        try:
            st = control.ask(self.pair_dir(d.pair) / "role", "status", timeout=2.0)
        except control.ControlError:
            return False
        pid = st.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self.running[d.pair] = Running(pid, None, fd)
        event("role-adopted", pair=d.pair, role=st.get("role"), pid=pid)
        return True

    def role_status(self, d: PairDef) -> dict[str, Any]:
        try:
            st = read_json(self.pair_dir(d.pair) / "role" / "status.json")
        except (OSError, ValueError):
            return {}
        return dict(st) if isinstance(st, dict) else {}

    def stop_role(self, pair: str, timeout: float = 15.0, term_after: float = 0.0) -> None:
        """Stop a role's process group: SIGTERM (after ``term_after`` s if it has not
        ended by itself), then SIGKILL after ``timeout`` s."""
        r = self.running.pop(pair, None)
        if r is None:
            return
        deadline = time.monotonic() + term_after
        while r.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while r.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGKILL)
        if r.proc is not None:
            r.proc.wait()
        r.close()

    def resume(self, d: PairDef) -> str:
        """Start ``d``'s role again, safely (a primary only as the "resume" claim allows:
        mirror/ha/claims.py); one sentence saying what was decided."""
        last = self.role_status(d)
        if last.get("role") in ("primary", "secondary") and last.get("role") != d.role:
            d.role = str(last["role"])  # it changed while nobody watched (a promotion)
        if isinstance(last.get("generation"), int) and last["generation"] > d.generation:
            d.generation = int(last["generation"])
        if d.role == "secondary":
            self.save(d)
            self.start_role(d)
            return "started its secondary again"
        r = claims.resume(lambda: make_arbiter(self.cfg.arbiter, d.pair, self.node, prepare=True),
                          self.node, d.peer,
                          d.generation, self.cfg.arbiter.silent_after_ms / 1000)
        if r.role == "secondary":
            return self._become_secondary(d, r.generation, r.why)
        if r.role != "primary":
            return self._wait(d, r.why)
        d.generation = r.generation
        self.save(d)
        self.start_role(d)
        return r.why

    def _become_secondary(self, d: PairDef, generation: int, why: str) -> str:
        d.role, d.generation = "secondary", max(d.generation, generation)
        self.save(d)
        event("role-changed", pair=d.pair, role="secondary", reason=why)
        if d.kind == "libvirt":
            # the guest this host still runs is its dead primary role's: fenced (the peer
            # runs the guest in a later generation; its NICs' gates and its disk held
            # everything since the role died), and in the way of the standby
            try:
                with Domains(d.connect) as lv:
                    if lv.destroy(d.domain):
                        event("stale-guest-destroyed", logging.WARNING, pair=d.pair,
                              domain=d.domain, reason=why)  # fmt: skip
            except LibvirtError as e:
                log.warning("pair %s: %s", d.pair, e)
        self.start_role(d)
        return f"{why}: started as its secondary"

    def _wait(self, d: PairDef, why: str) -> str:
        if self.waiting.get(d.pair) != why:
            event("role-waiting", logging.WARNING, pair=d.pair, reason=why)
        self.waiting[d.pair] = why
        return why

    def metric_targets(self) -> list[tuple[str, Path]]:
        """(pair, its role's metrics socket) of each active pair (for a scrape: not under
        the lock, which a pairing may hold for long)."""
        defs = dict(self.defs)
        return [(p, self.pair_dir(p) / "role" / agentmetrics.SOCKET)
                for p, d in sorted(defs.items()) if d.state == "active"]

    def cap_logs(self) -> None:
        """Each role's role.log: ROLE_LOG_MAX bytes at most (:func:`cap_log`)."""
        for pair in list(self.defs):
            path = self.pair_dir(pair) / "role.log"
            try:
                if cap_log(path):
                    log.info("pair %s: %s moved to role.log.1 (over %d bytes)", pair, path,
                             ROLE_LOG_MAX)
            except OSError as e:
                log.debug("pair %s: %s not capped: %s", pair, path, e)

    def tick(self) -> None:
        """Watch each role: follow its role changes, resume what is gone."""
        now = time.monotonic()
        if now - self._logs_checked >= LOG_CHECK_S:
            self._logs_checked = now
            self.cap_logs()
        with self.lock:
            for pair, d in list(self.defs.items()):
                if d.state != "active":
                    continue
                r = self.running.get(pair)
                if r is not None and r.alive():
                    st = self.role_status(d)
                    if st.get("pid") != r.pid:
                        continue  # not this process's report yet
                    role, gen = st.get("role"), st.get("generation")
                    if role in ("primary", "secondary") and role != d.role:
                        event("role-changed", pair=pair, role=role, was=d.role)
                        d.role = str(role)
                        self.save(d)
                    if isinstance(gen, int) and gen > d.generation:
                        d.generation = gen
                        self.save(d)
                    continue
                if r is not None:
                    code = r.proc.returncode if r.proc is not None else None
                    event("role-exited", logging.WARNING, pair=pair, role=d.role, code=code)
                    r.close()
                    del self.running[pair]
                    if code == 0 and d.role == "primary" and self._guest_shut_down(d):
                        continue
                try:
                    why = self.resume(d)
                except (AgentError, ConfigError, OSError) as e:
                    why = self._wait(d, f"cannot start its role: {e}")
                log.info("pair %s: %s", pair, why)

    def _guest_shut_down(self, d: PairDef) -> bool:
        """Whether the primary role ended because its guest powered itself off (it told
        the standby, which stands down): then nothing is resumed, the pair is kept as
        ``stopped`` until the operator unpairs it (and pairs it again once it runs)."""
        if self.role_status(d).get("guest_ended") != "shutdown":
            return False
        d.state = "stopped: the guest shut itself down (mirror unpair, start it, pair again)"
        self.save(d)
        event("pair-stopped", pair=d.pair, reason="the guest shut itself down")
        return True

    # -- requests from the CLI (control socket) --------------------------------------------

    def definition(self, req: dict[str, Any]) -> PairDef:
        pair = req.get("pair")
        if not isinstance(pair, str) or pair not in self.defs:
            known = ", ".join(sorted(self.defs)) or "none"
            raise AgentError(f"no pair {pair!r} on {self.node} (its pairs: {known})")
        return self.defs[pair]

    def describe(self, d: PairDef) -> dict[str, Any]:
        st = self.role_status(d)
        r = self.running.get(d.pair)
        return {
            "pair": d.pair, "kind": d.kind, "role": d.role, "peer": d.peer,
            "generation": d.generation, "state": d.state, "progress": d.progress[-20:],
            "running": bool(r and r.alive()), "role_pid": r.pid if r else None,
            "waiting": self.waiting.get(d.pair), "phase": st.get("phase"),
            "protection": st.get("protection"), "epoch": st.get("epoch"),
            "arbiter_unverified": st.get("arbiter_unverified"),
            "output_faults": st.get("output_faults") or [],
            "acked": st.get("acked"), "committed": st.get("committed"),
            "role_config": str(self.pair_dir(d.pair) / "mirror.toml"),
            "ports": [d.data_port, d.heartbeat_port, d.disk_port],
        }  # fmt: skip

    def op_reload_keys(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.config_path is None:
            raise AgentError("this agent was not started from a configuration file")
        return self.reload_keys(self.config_path)

    def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return {"node": self.node, "pairs": [self.describe(d) for d in self.defs.values()]}

    def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return {"node": self.node, **self.describe(self.definition(req))}

    # -- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self.dlock, self.ctl = control.start(self.dir)
        try:
            self.ctl.request_handlers = {
                name: _refusing(h) for name, h in (
                    ("list", self.op_list), ("status", self.op_status),
                    ("pair", self.pairing.op_pair), ("progress", self.pairing.op_progress),
                    ("unpair", self.pairing.op_unpair), ("reload-keys", self.op_reload_keys),
                    ("check", self.pairing.op_check))
            }  # fmt: skip
            self.load_defs()
            for pair, d in list(self.defs.items()):
                if d.state == "pairing":  # a host agent killed while pairing: undo it
                    log.warning("pair %s: pairing was interrupted: undoing it", pair)
                    self.pairing.abandon(d)
                elif d.state == "active":
                    self.adopt(d)
            self.server = self._serve_peers()
            self.metrics = self._serve_metrics()
            # gates a dead run left on domains no longer paired (their own pairs' are
            # taken over by their next run): in the background, libvirt may be slow
            threading.Thread(target=cleanup.ungate_unpaired, daemon=True, name="ungate",
                             args=(self.cfg.agent.connect,
                                   [d.domain for d in self.defs.values()])).start()
        except BaseException:
            self.close()
            raise
        event("agent-started", node=self.node, pairs=sorted(self.defs),
              adopted=sorted(self.running))

    def run(self, stop: threading.Event) -> int:
        self.start()
        sd_notify("READY=1")
        try:
            while not stop.is_set():
                if self.reload_wanted.is_set() and self.config_path is not None:
                    self.reload_wanted.clear()
                    self.reload_keys(self.config_path)
                self.tick()
                stop.wait(0.5)
        finally:
            sd_notify("STOPPING=1")
            self.close()
        return 0

    def _serve_metrics(self) -> agentmetrics.AgentMetrics | None:
        """Every pair's metrics on ``[agent] metrics_listen`` (None when it is "")."""
        listen = self.cfg.agent.metrics_listen
        if not listen:
            return None
        try:
            served = agentmetrics.AgentMetrics(
                parse_hostport(listen, "[agent] metrics_listen"), self.metric_targets,
                self.node)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {listen}: {e.strerror or e}; set [agent] "
                f'metrics_listen to a free HOST:PORT, or "" to serve none'
            ) from None
        event("metrics-served", node=self.node, address=served.address)
        return served

    def close(self) -> None:
        """Stop serving; the roles go on (a restarted agent adopts them)."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.server is not None:
            self.server.close()
            self.server = None
        for r in self.running.values():
            r.close()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if self.dlock is not None:
            self.dlock.close()
            self.dlock = None


def cap_log(path: Path, limit: int = ROLE_LOG_MAX) -> bool:
    """A log over ``limit`` bytes is copied to PATH.1 (replacing the earlier copy) and
    emptied; whether it was.  Its writer appends (O_APPEND), so its next lines start the
    file again; lines written between the copy and the truncation are lost."""
    if path.stat().st_size <= limit:
        return False
    with open(path, "rb") as src, open_private(path.with_name(path.name + ".1"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.truncate(path, 0)
    return True


def _refusing(handler: control.RequestHandler) -> control.RequestHandler:
    """``handler``, answering a refusal (its reason as the error) rather than nothing."""

    def serve(req: dict[str, Any]) -> dict[str, Any]:
        try:
            return handler(req)
        except (AgentError, ConfigError, PeerError, LibvirtError, ArbiterError,
                domaincheck.DomainXMLError, OSError) as e:
            return {"ok": False, "error": str(e)}

    return serve
