"""The host agent (`mirror agent`): one per host, it owns every pair role on the host.

It keeps one directory per pair under ``STATE_DIR/pairs/PAIR/``:

- ``definition.json``: the pair (its guest, this host's role, the peer, the generation,
  the link's ports and address), rewritten atomically whenever it changes;
- ``mirror.toml``: the role's configuration, made from the definition before each start;
- ``original.xml`` (the primary's host, libvirt guests): the domain's definition before
  pairing, which ``mirror unpair`` defines again; ``standby.xml`` (the secondary's): the
  definition the standby runs from;
- ``role/``: the role's state directory (its status.json, control socket, lock);
  ``role.log``: its log.

Each role is an unchanged ``mirror primary`` or ``mirror secondary --config mirror.toml``
process in a session (process group) of its own, so that the agent can be restarted or
upgraded under running guests: a stopped agent leaves its roles running, and a started
one adopts every role that still answers on its control socket (watching its pid through
a pidfd).  A role that is gone is resumed safely (:meth:`HostAgent.resume`): a secondary
is started again (it never runs a guest it has not been sent); a primary's guest only
after asking the arbiter: if the peer may run the guest (its heartbeat is fresh, or it
won the generation's claim) this host becomes its secondary instead, and when the peer is
silent this host first wins the generation's claim (so the peer can never promote in it)
and leads under the next generation.

The CLI talks to it over ``STATE_DIR/control.sock`` (mirror/ha/control.py: SO_PEERCRED,
root or the agent's user); agents talk to each other over mirror/ha/peerlink.py
(CurveZMQ, only the keys in ``[peers]``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mirror.config import (
    AgentConfig,
    Config,
    ConfigError,
    from_dict,
    load_agent,
    to_toml,
)
from mirror.guests import domaincheck
from mirror.guests.libvirt import qmp_socket_in
from mirror.guests.libvirtdom import Domains, LibvirtError
from mirror.ha import control, peerlink
from mirror.ha.arbiter import ArbiterError
from mirror.ha.peerlink import PeerAddress, PeerError
from mirror.ha.role import event, make_arbiter
from mirror.hoststate import open_private, private_dir, read_json, write_atomic
from mirror.replication import keys

log = logging.getLogger("mirror.ha.hostagent")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # a pair's name: a file name
KINDS = ("libvirt", "synthetic")
PREPARE_WAIT_S = 60.0  # a standby that is not ready by then will not be


class AgentError(RuntimeError):
    """A request cannot be carried out; the message says why and what to do."""


@dataclass
class PairDef:
    """One pair as this host's agent keeps it (``definition.json``)."""

    pair: str
    kind: str  # "libvirt" or "synthetic"
    role: str  # what this host runs for it now: "primary" or "secondary"
    peer: str
    generation: int = 1
    data_port: int = 0
    heartbeat_port: int = 0
    disk_port: int = 0
    domain: str = ""
    connect: str = ""
    autostart: bool = False  # the domain's autostart before pairing (restored by unpair)
    guest: dict[str, Any] = field(default_factory=dict)  # synthetic: ram_mib, ... observer
    state: str = "active"  # "pairing", "active", "failed: ..."
    progress: list[str] = field(default_factory=list)

    @staticmethod
    def load(path: Path) -> PairDef:
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a pair definition")
        known = set(PairDef.__dataclass_fields__)
        return PairDef(**{k: v for k, v in d.items() if k in known})


def check_name(pair: str) -> str:
    if not NAME.match(pair):
        raise AgentError(
            f"{pair!r} cannot name a pair: 1..64 letters, digits, '.', '_', '+', '-', not "
            f"starting with a punctuation mark"
        )
    return pair


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
        self.failed: dict[str, PairDef] = {}  # pairings that failed, for the CLI following them
        self.config_dir = config_dir or (config_path.parent if config_path else Path("."))
        self.config_path = config_path
        self.public, self.secret, self.peers = self._keys(cfg)
        self.reload_wanted = threading.Event()  # SIGHUP; done by the loop
        self.server: peerlink.PeerServer | None = None
        self.ctl: control.ControlServer | None = None
        self.dlock: control.StateDirLock | None = None

    def _keys(self, cfg: AgentConfig) -> tuple[bytes, bytes, dict[str, PeerAddress]]:
        """This host's key pair and its peers' addresses and keys, as ``cfg`` names them."""
        if not cfg.keys.secret_key:
            raise ConfigError(
                "[keys] secret_key not set: the agents' interconnect needs this host's key "
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
        and [peers] keys again; the agents' interconnect admits the new peer keys from now
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
            {n: p.public_key for n, p in self.peers.items()}, self.peer_request,
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
        pdir = self.pair_dir(d.pair)
        private_dir(pdir)
        write_atomic(pdir / "definition.json", json.dumps(asdict(d), indent=1).encode())

    def load_defs(self) -> None:
        private_dir(self.pairs_dir)
        for p in sorted(self.pairs_dir.iterdir()):
            try:
                d = PairDef.load(p / "definition.json")
                check_name(d.pair)
            except (OSError, ValueError, TypeError, AgentError) as e:
                log.warning("ignoring %s: not a pair definition (%s)", p, e)
                continue
            if d.pair != p.name:
                log.warning("ignoring %s: it defines pair %r", p, d.pair)
                continue
            self.defs[d.pair] = d

    def role_config(self, d: PairDef) -> Config:
        """The role's configuration from the definition; ConfigError if this mirror cannot
        run it (a libvirt guest without the libvirt backend)."""
        peer = self.peers.get(d.peer)
        if peer is None:
            raise AgentError(f"pair {d.pair}: its peer {d.peer!r} is not in [peers]")
        pdir = self.pair_dir(d.pair)
        primary = d.role == "primary"
        # the secondary listens on its own address; the primary connects to the peer's,
        # and a promoted secondary looks for its returning peer's standby there too
        data: dict[str, Any] = {
            "pair": {"name": d.pair, "generation": d.generation},
            "node": {"name": self.node, "state_dir": str(pdir / "role")},
            "link": {
                "host": peer.host if primary else self.cfg.agent.address,
                "data_port": d.data_port,
                "heartbeat_port": d.heartbeat_port,
                "peer_host": peer.host,
            },
            "checkpoint": asdict(self.cfg.checkpoint),
            "arbiter": asdict(self.cfg.arbiter),
            "keys": {"secret_key": str(Path(self.cfg.keys.secret_key).resolve()),
                     "peer_public_key": peer.public_key.decode()},
            "metrics": {"listen": ""},  # many pairs per host: no port each (yet)
        }
        if d.kind == "synthetic":
            g = dict(d.guest)
            observer = g.pop("observer", None)
            data["guest"] = {"kind": "synthetic", **g}
            if observer:
                data["output"] = {"observer": observer}
        else:
            # the XML this host has of the domain: its own definition (the host it was
            # paired on) or the one its peer sent (the standby's host)
            names = ("original.xml", "standby.xml") if primary else ("standby.xml",
                                                                    "original.xml")
            xml_file = next((pdir / n for n in names if (pdir / n).exists()), pdir / names[0])
            xml = xml_file.read_text()
            data["guest"] = {"kind": "libvirt", "ram_mib": domaincheck.check(xml).ram_mib}
            # QMP on the domain's own monitor socket when its XML adds one, else via libvirt
            qmp = "socket" if qmp_socket_in(xml) else "libvirt"
            lv: dict[str, Any] = {"domain": d.domain, "connect": d.connect, "qmp": qmp,
                                  "autostart": d.autostart}  # once promoted here
            if self.cfg.agent.bridge:
                lv["bridge"] = self.cfg.agent.bridge
                lv["tap"] = f"mir{zlib.crc32(d.pair.encode()) & 0xFFFFFF:06x}"
            if not primary:
                lv["standby_xml"] = str(xml_file)
            data["libvirt"] = lv
        try:
            return from_dict(data, f"pair {d.pair}'s role configuration")
        except ConfigError as e:
            if d.kind == "libvirt" and "libvirt" in str(e):
                raise AgentError(
                    f"this mirror has no libvirt guest backend yet ({e}): libvirt domains "
                    f"cannot be paired with it"
                ) from None
            raise

    # -- roles -----------------------------------------------------------------------------

    def start_role(self, d: PairDef) -> None:
        cfg = self.role_config(d)
        pdir = self.pair_dir(d.pair)
        path = pdir / "mirror.toml"
        write_atomic(path, to_toml(cfg).encode())
        private_dir(pdir / "role")
        with open_private(pdir / "role.log") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", d.role, "--config", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the agent; stopped by its group
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
        """Start ``d``'s role again, safely; one sentence saying what was decided."""
        last = self.role_status(d)
        if last.get("role") in ("primary", "secondary") and last.get("role") != d.role:
            d.role = str(last["role"])  # it changed while nobody watched (a promotion)
        if isinstance(last.get("generation"), int) and last["generation"] > d.generation:
            d.generation = int(last["generation"])
        if d.role == "secondary":
            self.save(d)
            self.start_role(d)
            return "started its secondary again"
        try:
            arb = make_arbiter(self.cfg.arbiter, d.pair, self.node, prepare=True)
            recorded = arb.generation()
            age = arb.peer_age(d.peer)
            if age is not None:
                # ages are judged from when this reader first saw the slot: look again later
                time.sleep(1.5 * self.cfg.arbiter.silent_after_ms / 1000)
                age = arb.peer_age(d.peer)
            slot = arb.peer_slot(d.peer)
            silent = self.cfg.arbiter.silent_after_ms / 1000
            gen = max(d.generation, recorded)
            if age is not None and age <= silent and slot is not None:
                if slot.role == "primary" or slot.generation > d.generation:
                    return self._become_secondary(d, max(gen, slot.generation),
                                                  f"{d.peer} runs the guest (its heartbeat is "
                                                  f"fresh, role {slot.role})")
                return self._wait(d, f"{d.peer} is alive with the standby: waiting for it to "
                                     f"promote (this host's guest is gone)")
            if slot is None:  # its silence here is no evidence: it may not use this arbiter
                return self._wait(d, f"{d.peer}'s storage slot was never seen on this arbiter: "
                                     f"not starting the guest (is the arbiter shared?)")
            won = arb.claim(gen, self.node, "resume")
        except ArbiterError as e:
            return self._wait(d, f"cannot ask the arbiter ({e}): not starting the guest")
        if not won.won:
            return self._become_secondary(d, gen + 1, f"{won.holder} won generation {gen} "
                                                      f"({won.action})")
        try:
            arb.set_generation(gen + 1)
        except ArbiterError as e:
            return self._wait(d, f"cannot record generation {gen + 1} ({e})")
        d.generation = gen + 1
        self.save(d)
        self.start_role(d)
        return f"won generation {gen} ({d.peer} silent): started the primary under {gen + 1}"

    def _become_secondary(self, d: PairDef, generation: int, why: str) -> str:
        d.role, d.generation = "secondary", max(d.generation, generation)
        self.save(d)
        event("role-changed", pair=d.pair, role="secondary", reason=why)
        self.start_role(d)
        return f"{why}: started as its secondary"

    def _wait(self, d: PairDef, why: str) -> str:
        if self.waiting.get(d.pair) != why:
            event("role-waiting", logging.WARNING, pair=d.pair, reason=why)
        self.waiting[d.pair] = why
        return why

    def tick(self) -> None:
        """Watch each role: follow its role changes, resume what is gone."""
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

    def _def(self, req: dict[str, Any]) -> PairDef:
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
            return {"node": self.node, **self.describe(self._def(req))}

    def op_pair(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start pairing (in the background: the CLI follows it with ``status``)."""
        kind = req.get("kind", "libvirt")
        pair = req.get("pair")
        peer = req.get("peer")
        if kind not in KINDS:
            raise AgentError(f"unknown guest kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(pair, str):
            raise AgentError("no domain given")
        check_name(pair)
        if not isinstance(peer, str) or peer not in self.peers:
            raise AgentError(
                f"unknown peer {peer!r}: this host's agent knows "
                f"{', '.join(sorted(self.peers)) or 'no peers'} (add it to [peers])"
            )
        with self.lock:
            if pair in self.defs:
                d = self.defs[pair]
                raise AgentError(
                    f"{pair} is already paired ({d.role} here, peer {d.peer}, state {d.state}): "
                    f"`mirror unpair {pair}` first"
                )
            d = PairDef(pair=pair, kind=kind, role="primary", peer=peer, state="pairing",
                        domain=pair,
                        connect=str(req.get("connect") or self.cfg.agent.connect))
            if kind == "synthetic":
                d.guest = _synthetic_guest(req)
            self.defs[pair] = d
        threading.Thread(target=self._pair, args=(d,), name=f"pair-{pair}", daemon=True).start()
        return {"started": True}

    def _note(self, d: PairDef, text: str) -> None:
        with self.lock:
            d.progress.append(f"{time.strftime('%H:%M:%S')} {text}")
            self.save(d)
        log.info("pair %s: %s", d.pair, text)

    def _pair(self, d: PairDef) -> None:
        peer = self.peers[d.peer]
        marked = False
        prepared = False
        try:
            xml = ""
            self.save(d)
            if d.kind == "libvirt":
                with Domains(d.connect) as lv:
                    xml = lv.inactive_xml(d.domain)
                    facts = lv.facts(d.domain)
                    r = domaincheck.check(xml)
                    if not r.ok:
                        raise AgentError(domaincheck.explain(r))
                    if not facts["persistent"]:
                        raise AgentError(f"{d.domain} is a transient domain: define it first")
                    d.autostart = bool(facts["autostart"])
                    write_atomic(self.pair_dir(d.pair) / "original.xml", xml.encode())
            self.save(d)
            arb = make_arbiter(self.cfg.arbiter, d.pair, self.node, prepare=True)
            d.generation = max(1, arb.generation())
            self._note(d, f"asking {d.peer} to prepare the standby")
            answer = peerlink.ask(
                peer, self.public, self.secret, "prepare",
                {"pair": d.pair, "kind": d.kind, "xml": xml, "guest": d.guest,
                 "generation": d.generation, "domain": d.domain, "autostart": d.autostart},
                timeout=PREPARE_WAIT_S + 10,
            )  # fmt: skip
            prepared = True
            d.data_port, d.heartbeat_port, d.disk_port = (
                int(answer["data_port"]), int(answer["heartbeat_port"]), int(answer["disk_port"])
            )
            self._note(d, f"standby ready on {d.peer} ({peer.host}:{d.data_port})")
            if d.kind == "libvirt":
                with Domains(d.connect) as lv:
                    lv.mark_paired(d.domain, d.peer)
                    marked = True
                self._note(d, f"{d.domain}: autostart off, marked as paired with {d.peer}")
            with self.lock:
                d.state = "active"
                self.save(d)
                self.start_role(d)
            self._note(d, "primary started: pre-copy, then checkpoints")
        except (AgentError, PeerError, LibvirtError, ConfigError, ArbiterError, OSError,
                KeyError, ValueError) as e:
            why = str(e)
            log.warning("pair %s: pairing failed: %s", d.pair, why)
            with self.lock:
                self.stop_role(d.pair)
                if prepared:
                    with contextlib.suppress(PeerError):
                        peerlink.ask(peer, self.public, self.secret, "drop", {"pair": d.pair})
                if marked:
                    with contextlib.suppress(LibvirtError), Domains(d.connect) as lv:
                        lv.restore(d.domain, xml, d.autostart)
                d.state = f"failed: {why}"
                d.progress.append(f"failed: {why}")
                self.defs.pop(d.pair, None)
                shutil.rmtree(self.pair_dir(d.pair), ignore_errors=True)
                self.failed[d.pair] = d

    def op_progress(self, req: dict[str, Any]) -> dict[str, Any]:
        pair = req.get("pair")
        with self.lock:
            if isinstance(pair, str) and pair in self.failed and pair not in self.defs:
                d = self.failed[pair]
                return {"pair": pair, "state": d.state, "progress": d.progress}
            return self.describe(self._def(req))

    def op_unpair(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            d = self._def(req)
            if d.role != "primary" and not req.get("force"):
                raise AgentError(
                    f"{d.pair} runs on {d.peer} (this host holds its standby): run `mirror "
                    f"unpair {d.pair}` on {d.peer}"
                )
            done = []
            if d.role == "primary":  # it ends cleanly (BYE) and lets the guest run on
                with contextlib.suppress(control.ControlError):
                    control.ask(self.pair_dir(d.pair) / "role", "detach", timeout=5)
                self.stop_role(d.pair, term_after=10.0)
                done.append("stopped its primary here (the guest runs on, unmirrored)")
            else:
                self.stop_role(d.pair)
                done.append(f"stopped its {d.role} here")
            try:
                peerlink.ask(self.peers[d.peer], self.public, self.secret, "drop",
                             {"pair": d.pair}, timeout=30)
                done.append(f"standby dropped on {d.peer}")
            except PeerError as e:
                done.append(f"NOT dropped on {d.peer}: {e}; run `mirror unpair {d.pair} "
                            f"--force` there")
            original = self.pair_dir(d.pair) / "original.xml"
            if d.kind == "libvirt" and original.exists():
                with Domains(d.connect) as lv:
                    lv.restore(d.domain, original.read_text(), d.autostart)
                done.append(f"{d.domain}'s definition restored (autostart "
                            f"{'on' if d.autostart else 'off'})")
            elif d.kind == "libvirt":
                done.append(f"{d.domain}'s definition here is the one its promotion made: "
                            f"left as it is")
            self._forget(d.pair)
            return {"done": done}

    def _abandon(self, d: PairDef) -> None:
        """Undo an interrupted pairing: the peer's standby (if it was asked for one), the
        domain's definition (if it was marked), the pair's directory."""
        original = self.pair_dir(d.pair) / "original.xml"
        if d.kind == "libvirt" and original.exists():
            try:
                with Domains(d.connect) as lv:
                    lv.restore(d.domain, original.read_text(), d.autostart)
            except LibvirtError as e:
                log.warning("pair %s: %s", d.pair, e)
        peer = self.peers.get(d.peer)
        if peer is not None:
            threading.Thread(target=self._drop_quietly, args=(peer, d.pair), daemon=True,
                             name=f"drop-{d.pair}").start()
        self._forget(d.pair)

    def _drop_quietly(self, peer: PeerAddress, pair: str) -> None:
        try:
            peerlink.ask(peer, self.public, self.secret, "drop", {"pair": pair}, timeout=30)
        except PeerError as e:
            log.info("pair %s: %s", pair, e)

    def _forget(self, pair: str) -> None:
        self.defs.pop(pair, None)
        self.waiting.pop(pair, None)
        shutil.rmtree(self.pair_dir(pair), ignore_errors=True)
        event("pair-removed", pair=pair)

    # -- requests from peers (the interconnect) --------------------------------------------

    def peer_request(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        try:
            if op == "ping":
                return {"node": self.node}
            if op == "prepare":
                return self.prepare(peer, req)
            if op == "drop":
                return self.drop(peer, req)
        except (AgentError, ConfigError, OSError) as e:
            raise PeerError(str(e)) from None
        raise PeerError(f"unknown op {op!r}")

    def prepare(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        pair = check_name(str(req.get("pair")))
        kind = req.get("kind")
        if kind not in KINDS:
            raise AgentError(f"unknown guest kind {kind!r}")
        with self.lock:
            old = self.defs.get(pair)
            if old is not None:
                raise AgentError(
                    f"{self.node} already has pair {pair} ({old.role} here, peer {old.peer})"
                )
            gen = req.get("generation")
            d = PairDef(pair=pair, kind=str(kind), role="secondary", peer=peer,
                        generation=gen if isinstance(gen, int) and gen > 0 else 1,
                        domain=str(req.get("domain") or pair), connect=self.cfg.agent.connect,
                        autostart=req.get("autostart") is True)
            if kind == "synthetic":
                d.guest = _synthetic_guest(req.get("guest") or {})
            else:
                xml = req.get("xml")
                if not isinstance(xml, str):
                    raise AgentError("no domain XML for the standby")
                r = domaincheck.check(xml)  # a peer's XML is untrusted input too
                if r.name != d.domain or not r.ok:
                    raise AgentError(f"the standby's XML is not mirrorable: "
                                     f"{domaincheck.explain(r)}")
                refused = domaincheck.standby_refusals(xml, self.domain_dirs())
                if refused:
                    raise AgentError(f"{self.node} does not run the standby XML {peer} sent: "
                                     f"{'; '.join(refused)}")
            d.data_port, d.heartbeat_port, d.disk_port = self._ports()
            self.defs[pair] = d
            try:
                self.save(d)
                if kind == "libvirt":
                    write_atomic(self.pair_dir(pair) / "standby.xml", str(req["xml"]).encode())
                self.start_role(d)
            except BaseException:
                self.stop_role(pair)
                self._forget(pair)
                raise
        deadline = time.monotonic() + PREPARE_WAIT_S
        while time.monotonic() < deadline:
            st = self.role_status(d)
            if st.get("role") == "secondary" and st.get("pid") == self.running[pair].pid:
                return {"data_port": d.data_port, "heartbeat_port": d.heartbeat_port,
                        "disk_port": d.disk_port}
            if not self.running[pair].alive():
                break
            time.sleep(0.05)
        with self.lock:
            tail = _tail(self.pair_dir(pair) / "role.log")
            self.stop_role(pair)
            self._forget(pair)
        raise AgentError(f"the standby of {pair} did not start on {self.node}: {tail}")

    def drop(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            d = self._def(req)
            if d.peer != peer:
                raise AgentError(f"pair {d.pair} is not paired with {peer} here")
            self.stop_role(d.pair)
            self._forget(d.pair)
        return {"dropped": True}

    def _ports(self) -> tuple[int, int, int]:
        used = {p for d in self.defs.values() for p in (d.data_port, d.heartbeat_port,
                                                          d.disk_port)}
        a = self.cfg.agent
        got = []
        for port in range(a.pair_ports_from, a.pair_ports_to + 1):
            if port not in used and _port_free(a.address, port):
                got.append(port)
                if len(got) == 3:
                    return got[0], got[1], got[2]
        raise AgentError(
            f"no 3 free ports left in {a.pair_ports_from}..{a.pair_ports_to} on {a.address} "
            f"for another pair: widen [agent] pair_ports_from..pair_ports_to"
        )

    # -- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self.dlock, self.ctl = control.start(self.dir)
        try:
            self.ctl.request_handlers = {
                name: _refusing(h) for name, h in (
                    ("list", self.op_list), ("status", self.op_status), ("pair", self.op_pair),
                    ("progress", self.op_progress), ("unpair", self.op_unpair),
                    ("reload-keys", self.op_reload_keys))
            }  # fmt: skip
            self.load_defs()
            for pair, d in list(self.defs.items()):
                if d.state == "pairing":  # an agent killed while pairing: undo it
                    log.warning("pair %s: pairing was interrupted: undoing it", pair)
                    self._abandon(d)
                elif d.state == "active":
                    self.adopt(d)
            self.server = self._serve_peers()
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

    def close(self) -> None:
        """Stop serving; the roles go on (a restarted agent adopts them)."""
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


def _refusing(handler: control.RequestHandler) -> control.RequestHandler:
    """``handler``, answering a refusal (its reason as the error) rather than nothing."""

    def serve(req: dict[str, Any]) -> dict[str, Any]:
        try:
            return handler(req)
        except (AgentError, ConfigError, PeerError, LibvirtError, ArbiterError,
                domaincheck.DomainXMLError, OSError) as e:
            return {"ok": False, "error": str(e)}

    return serve


def _synthetic_guest(req: dict[str, Any]) -> dict[str, Any]:
    """A synthetic guest's settings from a request (checked like a configuration's)."""
    names = ("ram_mib", "dirty_pages_per_s", "outputs_per_s")
    g: dict[str, Any] = {k: req[k] for k in names if k in req}
    obs = req.get("observer")
    try:
        from_dict({"guest": g, **({"output": {"observer": obs}} if obs else {})}, "the guest")
    except ConfigError as e:
        raise AgentError(str(e)) from None
    return {**g, **({"observer": obs} if obs else {})}


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"
