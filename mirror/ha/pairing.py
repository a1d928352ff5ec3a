"""Pairing: how two host agents make a pair of a guest, and undo it.

``mirror pair DOMAIN --peer HOST`` on the guest's host (:meth:`Pairing.op_pair`, carried
on in a thread): check the domain, keep its definition (``original.xml``), take the
pair's generation from the arbiter, ask the peer's host agent to ``prepare`` the standby (it
checks the XML it is sent, picks three ports, starts the secondary and answers once it
listens), mark the domain as paired, start the primary.  Any failure undoes what was
done, on both hosts.  ``mirror unpair`` ends the pair (the guest runs on, unmirrored)
and has the peer ``drop`` its standby; a pairing interrupted by the host agent's death is
undone when it starts again (:meth:`Pairing.abandon`).

Host agents talk to each other over mirror/ha/peerlink.py (CurveZMQ, only the keys in
``[peers]``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.config import ConfigError
from mirror.guests import domaincheck, libvirtdisk, standbycheck
from mirror.guests.base import GuestError
from mirror.guests.libvirtdom import Domains, LibvirtError
from mirror.ha import cleanup, control, peerlink
from mirror.ha.arbiter import ArbiterError
from mirror.ha.claims import Claims
from mirror.ha.pairdef import (
    KINDS,
    AgentError,
    PairDef,
    check_name,
    libvirt_disk,
    synthetic_guest,
)
from mirror.ha.peerlink import PeerAddress, PeerError
from mirror.ha.role import make_arbiter
from mirror.hoststate import write_atomic

if TYPE_CHECKING:
    from mirror.ha.hostagent import HostAgent

log = logging.getLogger("mirror.ha.hostagent")  # the host agent's log, as before the split

PREPARE_WAIT_S = 60.0  # a standby that is not ready by then will not be
PROTECT_WAIT_S = 3600.0  # a pre-copy longer than this: pairing ends, the host agent keeps the pair


class Pairing:
    """The pairing protocol of one host agent: its CLI's pair, progress and unpair, and
    its peers' prepare and drop."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.failed: dict[str, PairDef] = {}  # pairings that failed, for the CLI following them

    def op_pair(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start pairing (in the background: the CLI follows it with ``status``)."""
        agent = self.agent
        kind = req.get("kind", "libvirt")
        pair = req.get("pair")
        peer = req.get("peer")
        if kind not in KINDS:
            raise AgentError(f"unknown guest kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(pair, str):
            raise AgentError("no domain given")
        check_name(pair)
        if not isinstance(peer, str) or peer not in agent.peers:
            raise AgentError(
                f"unknown peer {peer!r}: this host agent knows "
                f"{', '.join(sorted(agent.peers)) or 'no peers'} (add it to [peers])"
            )
        with agent.lock:
            if pair in agent.defs:
                d = agent.defs[pair]
                raise AgentError(
                    f"{pair} is already paired ({d.role} here, peer {d.peer}, state {d.state}): "
                    f"`mirror unpair {pair}` first"
                )
            d = PairDef(pair=pair, kind=kind, role="primary", peer=peer, state="pairing",
                        domain=pair,
                        connect=str(req.get("connect") or agent.cfg.agent.connect))
            if kind == "synthetic":
                d.guest = synthetic_guest(req)
            d.live = req.get("live") is True
            agent.defs[pair] = d
        threading.Thread(target=self._pair, args=(d,), name=f"pair-{pair}", daemon=True).start()
        return {"started": True}

    def _note(self, d: PairDef, text: str) -> None:
        with self.agent.lock:
            d.progress.append(f"{time.strftime('%H:%M:%S')} {text}")
            self.agent.save(d)
        log.info("pair %s: %s", d.pair, text)

    def _pair(self, d: PairDef) -> None:
        agent = self.agent
        peer = agent.peers[d.peer]
        marked = False
        prepared = False
        try:
            xml = cpu = ""
            agent.save(d)
            if d.kind == "libvirt":
                with Domains(d.connect) as lv:
                    # what `mirror pair --check` says, on both XMLs: the running guest
                    # (not running: refused) and its next boot (the standby's definition)
                    a = domaincheck.with_agent(lv.assess(d.domain), agent.cfg.agent.bridge)
                    if d.live:
                        a = domaincheck.live(a)
                        lv.require_running(d.domain)
                    if not a.ok:
                        raise AgentError(domaincheck.explain_assessment(a))
                    xml = lv.inactive_xml(d.domain)
                    cpu = lv.guest_cpu(d.domain)
                    facts = lv.facts(d.domain)
                    if not facts["persistent"]:
                        raise AgentError(f"{d.domain} is a transient domain: define it first")
                    d.autostart = bool(facts["autostart"])
                    try:  # its disk's export, for both hosts
                        d.guest = libvirtdisk.disk_sizes(xml)
                    except GuestError as e:
                        raise AgentError(str(e)) from None
                    write_atomic(agent.pair_dir(d.pair) / "original.xml", xml.encode())
            agent.save(d)
            arb = make_arbiter(agent.cfg.arbiter, d.pair, agent.node, prepare=True)
            d.generation = Claims(arb, agent.node).generation(at_least=1)
            self._note(d, f"asking {d.peer} to prepare the standby")
            answer = peerlink.ask(
                peer, agent.public, agent.secret, "prepare",
                {"pair": d.pair, "kind": d.kind, "xml": xml, "guest": d.guest,
                 "generation": d.generation, "domain": d.domain, "autostart": d.autostart,
                 "live": d.live, "cpu": cpu},
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
            with agent.lock:
                agent.save(d)
                agent.start_role(d)
            self._note(d, "primary started: pre-copy, then checkpoints")
            self._until_protected(d)
            with agent.lock:
                d.state = "active"  # from here on the host agent keeps it running
                agent.save(d)
        except (AgentError, PeerError, LibvirtError, ConfigError, ArbiterError, OSError,
                KeyError, ValueError) as e:
            why = str(e)
            log.warning("pair %s: pairing failed: %s", d.pair, why)
            with agent.lock:
                r = agent.running.get(d.pair)
                if d.kind == "libvirt" and r is not None and not r.alive():
                    # a role that died: its disk server serves the guest on until the disk
                    # is back on libvirt's own file (then it exits; the rest of its group
                    # goes with stop_role)
                    cleanup.disk_back(d.connect, d.domain)
                agent.stop_role(d.pair)
                if prepared:
                    with contextlib.suppress(PeerError):
                        peerlink.ask(peer, agent.public, agent.secret, "drop", {"pair": d.pair})
                if marked:
                    with contextlib.suppress(LibvirtError), Domains(d.connect) as lv:
                        lv.restore(d.domain, xml, d.autostart)
                if d.kind == "libvirt":  # a primary killed while holding: its NICs free
                    cleanup.ungate(d.connect, d.domain)
                d.state = f"failed: {why}"
                d.progress.append(f"failed: {why}")
                agent.defs.pop(d.pair, None)
                shutil.rmtree(agent.pair_dir(d.pair), ignore_errors=True)
                self.failed[d.pair] = d

    def _until_protected(self, d: PairDef) -> None:
        """Wait for the new primary to be protected; AgentError (the pairing is undone) if
        its role ends before (it could not attach, the domain stopped, the standby never
        answered): a pair that never ran is no pair."""
        agent = self.agent
        deadline = time.monotonic() + PROTECT_WAIT_S
        while time.monotonic() < deadline:
            with agent.lock:
                r = agent.running.get(d.pair)
                st = agent.role_status(d)
                if r is None or not r.alive():
                    tail = log_tail(agent.pair_dir(d.pair) / "role.log")
                    raise AgentError(f"the primary of {d.pair} ended before it was "
                                     f"protected: {tail}")  # fmt: skip
                if st.get("pid") == r.pid and st.get("phase") == "protected":
                    return
            time.sleep(0.1)
        log.warning("pair %s: not protected after %.0f s: the host agent keeps it running",
                    d.pair, PROTECT_WAIT_S)  # fmt: skip

    def op_progress(self, req: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        pair = req.get("pair")
        with agent.lock:
            if isinstance(pair, str) and pair in self.failed and pair not in agent.defs:
                d = self.failed[pair]
                return {"pair": pair, "state": d.state, "progress": d.progress}
            return agent.describe(agent.definition(req))

    def op_unpair(self, req: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        with agent.lock:
            d = agent.definition(req)
            if d.role != "primary" and not req.get("force"):
                raise AgentError(
                    f"{d.pair} runs on {d.peer} (this host holds its standby): run `mirror "
                    f"unpair {d.pair}` on {d.peer}"
                )
            done = []
            if d.role == "primary":  # it ends cleanly (BYE) and lets the guest run on
                with contextlib.suppress(control.ControlError):
                    control.ask(agent.pair_dir(d.pair) / "role", "detach", timeout=5)
                agent.stop_role(d.pair, term_after=10.0)
                done.append("stopped its primary here (the guest runs on, unmirrored)")
            else:
                agent.stop_role(d.pair)
                done.append(f"stopped its {d.role} here")
            try:
                peerlink.ask(agent.peers[d.peer], agent.public, agent.secret, "drop",
                             {"pair": d.pair}, timeout=30)
                done.append(f"standby dropped on {d.peer}")
            except PeerError as e:
                done.append(f"NOT dropped on {d.peer}: {e}; run `mirror unpair {d.pair} "
                            f"--force` there")
            if d.kind == "libvirt" and cleanup.ungate(d.connect, d.domain):
                done.append(f"removed the gate a dead run left on {d.domain}'s NICs")
            original = agent.pair_dir(d.pair) / "original.xml"
            if d.kind == "libvirt" and original.exists():
                with Domains(d.connect) as lv:
                    lv.restore(d.domain, original.read_text(), d.autostart)
                done.append(f"{d.domain}'s definition restored (autostart "
                            f"{'on' if d.autostart else 'off'})")
            elif d.kind == "libvirt":
                done.append(f"{d.domain}'s definition here is the one its promotion made "
                            f"(the definition as given on {d.peer}): left as it is")
            agent.forget(d.pair)
            return {"done": done}

    def abandon(self, d: PairDef) -> None:
        """Undo an interrupted pairing: the peer's standby (if it was asked for one), the
        domain's definition (if it was marked), the pair's directory."""
        agent = self.agent
        with contextlib.suppress(control.ControlError):  # a primary it had started lets go
            control.ask(agent.pair_dir(d.pair) / "role", "detach", timeout=5)
        original = agent.pair_dir(d.pair) / "original.xml"
        if d.kind == "libvirt" and original.exists():
            try:
                with Domains(d.connect) as lv:
                    lv.restore(d.domain, original.read_text(), d.autostart)
            except LibvirtError as e:
                log.warning("pair %s: %s", d.pair, e)
        if d.kind == "libvirt":
            cleanup.ungate(d.connect, d.domain)
        peer = agent.peers.get(d.peer)
        if peer is not None:
            threading.Thread(target=self._drop_quietly, args=(peer, d.pair), daemon=True,
                             name=f"drop-{d.pair}").start()
        agent.forget(d.pair)

    def _drop_quietly(self, peer: PeerAddress, pair: str) -> None:
        try:
            peerlink.ask(peer, self.agent.public, self.agent.secret, "drop", {"pair": pair},
                         timeout=30)
        except PeerError as e:
            log.info("pair %s: %s", pair, e)

    # -- requests from peers (the interconnect) --------------------------------------------

    def peer_request(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        try:
            if op == "ping":
                return {"node": self.agent.node}
            if op == "prepare":
                return self.prepare(peer, req)
            if op == "drop":
                return self.drop(peer, req)
            if op == "check":
                return self.check(peer, req)
        except (AgentError, ConfigError, OSError) as e:
            raise PeerError(str(e)) from None
        raise PeerError(f"unknown op {op!r}")

    def prepare(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        pair = check_name(str(req.get("pair")))
        kind = req.get("kind")
        if kind not in KINDS:
            raise AgentError(f"unknown guest kind {kind!r}")
        with agent.lock:
            old = agent.defs.get(pair)
            if old is not None:
                raise AgentError(
                    f"{agent.node} already has pair {pair} ({old.role} here, peer {old.peer})"
                )
            gen = req.get("generation")
            d = PairDef(pair=pair, kind=str(kind), role="secondary", peer=peer,
                        generation=gen if isinstance(gen, int) and gen > 0 else 1,
                        domain=str(req.get("domain") or pair), connect=agent.cfg.agent.connect,
                        autostart=req.get("autostart") is True, live=req.get("live") is True)
            if kind == "synthetic":
                d.guest = synthetic_guest(req.get("guest") or {})
            else:
                d.guest = libvirt_disk(req.get("guest") or {})
                xml = req.get("xml")
                if not isinstance(xml, str):
                    raise AgentError("no domain XML for the standby")
                r = domaincheck.check(xml)  # a peer's XML is untrusted input too
                if d.live:
                    r = domaincheck.live_result(r)
                if r.name != d.domain or not r.ok:
                    raise AgentError(f"the standby's XML is not mirrorable: "
                                     f"{domaincheck.explain(r)}")
                refused = standbycheck.standby_refusals(xml, agent.domain_dirs())
                refused += self._cpu_refusals(req)
                if refused:
                    raise AgentError(f"{agent.node} does not run the standby XML {peer} sent: "
                                     f"{'; '.join(refused)}")
            d.data_port, d.heartbeat_port, d.disk_port = self._ports()
            agent.defs[pair] = d
            try:
                agent.save(d)
                if kind == "libvirt":
                    write_atomic(agent.pair_dir(pair) / "standby.xml", str(req["xml"]).encode())
                agent.start_role(d)
            except BaseException:
                agent.stop_role(pair)
                agent.forget(pair)
                raise
        deadline = time.monotonic() + PREPARE_WAIT_S
        while time.monotonic() < deadline:
            st = agent.role_status(d)
            if st.get("role") == "secondary" and st.get("pid") == agent.running[pair].pid:
                return {"data_port": d.data_port, "heartbeat_port": d.heartbeat_port,
                        "disk_port": d.disk_port}
            if not agent.running[pair].alive():
                break
            time.sleep(0.05)
        with agent.lock:
            tail = log_tail(agent.pair_dir(pair) / "role.log")
            agent.stop_role(pair)
            agent.forget(pair)
        raise AgentError(f"the standby of {pair} did not start on {agent.node}: {tail}")

    def check(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`prepare` would refuse in the standby XML ``peer`` sends, starting
        nothing (``mirror pair --check --peer`` on the peer: the same checks as pairing)."""
        xml, domain = req.get("xml"), req.get("domain")
        if not isinstance(xml, str) or not isinstance(domain, str):
            raise AgentError("no domain XML to check")
        try:
            r = domaincheck.check(xml)
        except domaincheck.DomainXMLError as e:
            return {"node": self.agent.node, "refused": [str(e)]}
        if req.get("live") is True:
            r = domaincheck.live_result(r)
        refused = [] if r.name == domain else [f"its <name> is {r.name!r}, not {domain!r}"]
        if not r.ok:  # (what the peer's own --check says, found again here)
            refused += [f.what for f in r.blocking]
        refused += standbycheck.standby_refusals(xml, self.agent.domain_dirs())
        refused += self._cpu_refusals(req)
        return {"node": self.agent.node, "refused": refused}

    def _cpu_refusals(self, req: dict[str, Any]) -> list[str]:
        """What this host says of the guest's CPU its peer sent (Domains.cpu_refusal)."""
        cpu = req.get("cpu")
        if not isinstance(cpu, str) or not cpu:
            return []
        with Domains(self.agent.cfg.agent.connect) as lv:
            why = lv.cpu_refusal(cpu)
        return [why] if why else []

    def op_check(self, req: dict[str, Any]) -> dict[str, Any]:
        """`mirror pair DOMAIN --check --peer HOST` (the CLI, over the control socket): what
        HOST refuses in the definition pairing would send it."""
        agent = self.agent
        peer, domain = req.get("peer"), req.get("domain")
        if not isinstance(peer, str) or peer not in agent.peers:
            raise AgentError(
                f"unknown peer {peer!r}: this host agent knows "
                f"{', '.join(sorted(agent.peers)) or 'no peers'} (add it to [peers])"
            )
        if not isinstance(domain, str):
            raise AgentError("no domain given")
        with Domains(str(req.get("connect") or agent.cfg.agent.connect)) as lv:
            xml = lv.inactive_xml(check_name(domain))
            cpu = lv.guest_cpu(domain) if lv.facts(domain)["active"] else ""
        return peerlink.ask(agent.peers[peer], agent.public, agent.secret, "check",
                            {"domain": domain, "xml": xml, "live": req.get("live") is True,
                             "cpu": cpu}, timeout=20)  # fmt: skip

    def drop(self, peer: str, req: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        with agent.lock:
            d = agent.definition(req)
            if d.peer != peer:
                raise AgentError(f"pair {d.pair} is not paired with {peer} here")
            agent.stop_role(d.pair)
            agent.forget(d.pair)
        return {"dropped": True}

    def _ports(self) -> tuple[int, int, int]:
        used = {p for d in self.agent.defs.values()
                for p in (d.data_port, d.heartbeat_port, d.disk_port)}
        a = self.agent.cfg.agent
        got = []
        for port in range(a.pair_ports_from, a.pair_ports_to + 1):
            if port not in used and port_free(a.address, port):
                got.append(port)
                if len(got) == 3:
                    return got[0], got[1], got[2]
        raise AgentError(
            f"no 3 free ports left in {a.pair_ports_from}..{a.pair_ports_to} on {a.address} "
            f"for another pair: widen [agent] pair_ports_from..pair_ports_to"
        )


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"
