"""The host agent's commands: `mirror agent`, `mirror pair`, `unpair`, `list`, and
`status|failover|switchover DOMAIN` (routed by the local host agent to that pair's role).

They talk to this host agent over its control socket (``[agent] state_dir`` of
``--agent-config``, default /etc/mirror/agent.toml; mirror/ha/control.py).
``mirror pair --check`` needs no host agent: it reads the domain from libvirt and explains.

Exit codes of `mirror pair`: 0 protected (or, with --check, can be mirrored); 1 cannot
be mirrored (every reason printed) or pairing failed or timed out; 2 an error (bad
option, no host agent, no such domain, libvirt unreachable).
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import DEFAULT_AGENT_CONFIG, agent_config, json_flag, within

if TYPE_CHECKING:  # imported by the commands: not by `mirror --help`
    from mirror.config import AgentConfig
    from mirror.guests import domaincheck

HOST_COMMANDS = ("agent", "pair", "unpair", "list")


def _agent_config_arg(p: argparse.ArgumentParser) -> None:
    agent_config(p, "the host agent's configuration")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("agent", help="this host agent: runs every pair role on the host")
    p.add_argument("--config", default=DEFAULT_AGENT_CONFIG,
                   help=f"agent configuration (default {DEFAULT_AGENT_CONFIG})")

    p = sub.add_parser("pair", help="mirror a libvirt domain of this host onto a peer host")
    p.add_argument("domain", metavar="DOMAIN", help="the libvirt domain (also the pair's name)")
    p.add_argument("--peer", help="the peer host (a [peers] name in the host agent configuration)")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default: [agent] connect)")
    p.add_argument("--check", action="store_true",
                   help="only say whether DOMAIN can be mirrored, and what to change; "
                        "changes nothing")
    p.add_argument("--prepare", action="store_true",
                   help="write what DOMAIN needs into its persistent definition, for its next "
                        "start (shared memfd RAM, the dirty-page log's preload); pairs nothing")
    p.add_argument("--live", action="store_true",
                   help="pair the running domain as it runs, without a restart: RAM that only "
                        "QEMU maps (no <memoryBacking>, virt-install's) is read from QEMU's "
                        "process and its dirty-page log made inside QEMU; with --check, also "
                        "tries that on the domain (changing nothing)")
    p.add_argument("--guest", choices=["libvirt", "synthetic"], default="libvirt",
                   help="libvirt (default); synthetic: a synthetic guest named DOMAIN (tests)")
    p.add_argument("--ram-mib", type=within(int, 1, 1 << 20), default=64,
                   help="--guest synthetic: its RAM (MiB)")
    p.add_argument("--observer", metavar="HOST:PORT",
                   help="--guest synthetic: where its released outputs go")
    p.add_argument("--timeout", type=within(float, 1, 86400), default=120.0, metavar="S",
                   help="seconds to wait for protection (default 120)")
    _agent_config_arg(p)

    p = sub.add_parser("unpair", help="undo `mirror pair DOMAIN` (run on the primary's host)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--force", action="store_true",
                   help="on the standby's host: drop this host's part even so")
    _agent_config_arg(p)

    p = sub.add_parser("list", help="the pairs this host agent runs")
    json_flag(p)
    _agent_config_arg(p)


def agent_dir(path: str) -> Path:
    from mirror.config import load_agent

    return load_agent(path).state_dir


def ask(args: argparse.Namespace, op: str, fields: dict[str, Any] | None = None,
        timeout: float = 10.0) -> dict[str, Any]:
    """Ask this host agent (``args.agent_config``'s) over its control socket."""
    from mirror.ha import control

    return control.ask(agent_dir(args.agent_config), op, timeout, fields,
                       start_with="`mirror agent` (or its systemd unit mirror-agent)")


def run(args: argparse.Namespace) -> int:
    if args.command == "agent":
        return run_agent(args.config)
    if args.command == "pair":
        return pair(args)
    if args.command == "unpair":
        a = ask(args, "unpair", {"pair": args.domain, "force": args.force}, timeout=90)
        for line in a.get("done", []):
            print(f"{args.domain}: {line}")
        return output.OK
    if args.command == "list":
        return list_pairs(args)
    raise AssertionError(args.command)


def list_pairs(args: argparse.Namespace) -> int:
    """`mirror list` (and `mirror status` with neither DOMAIN nor --config)."""
    a = ask(args, "list")
    if args.json:  # one object, as every --json answer
        output.print_json({"ok": True, "pairs": a["pairs"]})
        return output.OK
    print(f"{'PAIR':<20} {'ROLE':<10} {'PEER':<12} {'GEN':>4} {'PHASE':<14} PROTECTION")
    for p in a["pairs"]:
        phase = p.get("phase") or (p.get("waiting") and "waiting") or p.get("state")
        print(f"{p['pair']:<20} {p['role']:<10} {p['peer']:<12} {p['generation']:>4} "
              f"{phase!s:<14} {p.get('protection')}")
    return output.OK


def run_agent(path: str) -> int:
    from mirror.config import load_agent, require_arbiter
    from mirror.ha.hostagent import HostAgent
    from mirror.ha.role import stop_on_signals

    cfg = load_agent(path)
    require_arbiter(cfg.arbiter, path)  # every pair of this host agent uses it
    stop = stop_on_signals()
    agent = HostAgent(cfg, config_path=Path(path).resolve())
    signal.signal(signal.SIGHUP, lambda signum, frame: agent.reload_wanted.set())
    return agent.run(stop)


def check_domain(uri: str, domain: str) -> tuple[domaincheck.Assessment, str | None]:
    """The domain's assessment, and its persistent definition (None: transient)."""
    from mirror.guests.libvirtdom import Domains

    with Domains(uri) as lv:
        a = lv.assess(domain)
        return a, lv.inactive_xml(domain) if lv.facts(domain)["persistent"] else None


def check_standby(
    args: argparse.Namespace, uri: str, a: domaincheck.Assessment, xml: str | None
) -> domaincheck.Assessment:
    """``a`` with what the standby's host refuses in the definition pairing sends it: the
    peer's own answer (through this host agent), or without a host agent here, what
    every host refuses (a note says the peer was not asked)."""
    from mirror.guests import domaincheck, standbycheck
    from mirror.ha import control

    if xml is None:  # transient: a finding of its own already
        return a
    here = standbycheck.program_refusals(domaincheck.parse(xml))
    if not args.peer:
        return domaincheck.with_standby(a, here, "", "no --peer given")
    try:
        answer = ask(args, "check", {"domain": args.domain, "peer": args.peer, "connect": uri,
                                     "live": bool(getattr(args, "live", False))},
                     timeout=40)  # fmt: skip
    except control.ControlError as e:
        if "unknown op 'check'" in str(e) or "does not take 'check'" in str(e):
            # a host agent (there, or here) from before the check was asked of peers
            return domaincheck.with_standby(a, here, args.peer, "its host agent is older")
        if "no daemon runs" not in str(e):  # this host agent asked, the peer did not answer
            return domaincheck.with_standby(a, [], args.peer, str(e), blocking=True)
        return domaincheck.with_standby(a, here, args.peer, "no host agent runs here")
    return domaincheck.with_standby(a, list(answer.get("refused", [])), args.peer, "")


def live_assessment(
    uri: str, domain: str, a: domaincheck.Assessment
) -> domaincheck.Assessment:
    """``a`` as pairing it live sees it (domaincheck.live), with what the running domain
    itself refuses when it is tried (libvirt.live_probe: a userfaultfd made inside QEMU and
    closed at once) and what this kernel lacks for the dirty-page log."""
    from dataclasses import replace

    from mirror.guests import domaincheck
    from mirror.guests.libvirt import live_probe
    from mirror.guests.libvirtdom import Domains
    from mirror.replication import dirtylog

    a = domaincheck.live(a)
    if a.running is None:
        return a
    found = []
    with Domains(uri) as lv:
        try:
            lv.require_running(domain)
        except Exception as e:  # (LibvirtError) paused
            found.append(str(e))
    if not found:
        found = live_probe(uri, domain)
    why = dirtylog.probe()
    if why:
        found.append(f"this host cannot keep a dirty-page log: {why}")
    extra = tuple(
        domaincheck.Finding(
            "live-refused", f, "pairing it live reads its RAM from QEMU and makes its "
            "dirty-page log inside QEMU, as this check just tried",
            "what the message says; or `mirror pair --prepare` and a restart",
        )
        for f in found
    )
    return replace(a, running=replace(a.running, findings=(*a.running.findings, *extra)))


def prepare_domain(uri: str, domain: str) -> int:
    from mirror.guests import domaincheck
    from mirror.guests.libvirtdom import Domains

    with Domains(uri) as lv:
        changes = lv.prepare(domain)
        a = lv.assess(domain)
    print(f"{domain}: its definition now has, for its next start:" if changes else
          f"{domain}: its definition has what mirror needs already")  # fmt: skip
    for c in changes:
        print(f"  - {c}")
    print(domaincheck.explain_assessment(a))
    return output.OK if a.ok else output.FAILED


def pair(args: argparse.Namespace) -> int:
    cfg: AgentConfig | None = None
    if args.guest == "libvirt":
        from mirror.config import load_agent
        from mirror.guests import domaincheck

        if args.live and args.prepare:
            return output.error("--live pairs the domain as it runs; --prepare changes it "
                                "for its next start: one or the other")
        if args.prepare:  # needs no host agent: only the domain's definition changes
            uri = args.connect
            if uri is None:
                try:
                    uri = load_agent(args.agent_config).agent.connect
                except Exception:
                    uri = "qemu:///system"
            return prepare_domain(uri, args.domain)
        # --check is what pair checks: the host agent's configuration, the peer, the domain
        cfg = load_agent(args.agent_config)
        if args.peer is not None and args.peer not in cfg.peers:
            return output.error(f"unknown peer {args.peer!r}: this host agent knows "
                                f"{', '.join(sorted(cfg.peers)) or 'no peers'} (add it to "
                                f"[peers] of {args.agent_config})")
        uri = args.connect or cfg.agent.connect
        a, xml = check_domain(uri, args.domain)
        if args.live:
            a = live_assessment(uri, args.domain, a)
        r = check_standby(args, uri, domaincheck.with_agent(a, cfg.agent.bridge), xml)
        print(domaincheck.explain_assessment(r))
        if not r.ok:
            return output.FAILED
        if args.check:
            return output.OK
    elif args.check or args.prepare:
        print(f"{args.domain}: a synthetic guest can always be mirrored")
        return output.OK
    if not args.peer:
        return output.error("--peer HOST is needed (a [peers] name of the host agent's "
                            "configuration)")
    fields: dict[str, Any] = {"pair": args.domain, "peer": args.peer, "kind": args.guest}
    if args.live:
        fields["live"] = True
    if args.connect:
        fields["connect"] = args.connect
    if args.guest == "synthetic":
        fields["ram_mib"] = args.ram_mib
        if args.observer:
            fields["observer"] = args.observer
    start = time.monotonic()
    ask(args, "pair", fields)
    return follow(args, start)


def follow(args: argparse.Namespace, start: float) -> int:
    """Print the pairing's progress until the pair is protected (0), or fails (1)."""
    from mirror.ha import control

    seen = 0
    last_phase = None
    deadline = start + args.timeout
    while time.monotonic() < deadline:
        try:
            st = ask(args, "progress", {"pair": args.domain})
        except control.ControlError as e:
            return output.error(e)
        progress = st.get("progress") or []
        for line in progress[seen:]:
            print(f"{time.monotonic() - start:6.1f}s  {line.split(' ', 1)[-1]}")
        seen = len(progress)
        if str(st.get("state", "")).startswith("failed"):
            return output.fail(f"pairing {args.domain} failed (nothing is left of it)")
        phase = st.get("phase")
        if phase and phase != last_phase:
            print(f"{time.monotonic() - start:6.1f}s  primary: {phase}")
            last_phase = phase
        if phase == "protected":
            print(f"{args.domain} is protected by {st.get('peer')} "
                  f"({time.monotonic() - start:.1f} s)")
            return output.OK
        time.sleep(0.2)
    return output.fail(f"{args.domain} not protected within {args.timeout:g} s: see `mirror "
                       f"status {args.domain}` and the role's log")


def role_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Where the role of pair DOMAIN keeps its configuration (asked of the host agent)."""
    st = ask(args, "status", {"pair": args.domain})
    return str(st["role_config"]), st


def show_pair(st: dict[str, Any], as_json: bool) -> int:
    """`mirror status DOMAIN`: what the host agent reports of the pair's role; exit 3
    (NOT_RUNNING) when its role does not run."""
    if as_json:  # the same exit code as the words
        output.print_json(st)
        return output.OK if st.get("running") else output.NOT_RUNNING
    for k in ("pair", "kind", "role", "peer", "generation", "state", "phase", "protection",
              "epoch", "acked", "committed", "waiting", "role_pid"):
        print(f"{k:>12}: {st.get(k)}")
    if st.get("arbiter_unverified"):  # no failover until the arbiter shows the peer
        print(f"{'not protected':>12}: {st['arbiter_unverified']}")
    for fault in st.get("output_faults") or []:  # a NIC's gate broke (replication/nicgate.py)
        print(f"{'NIC gate':>12}: BROKEN: {fault}")
    return output.OK if st.get("running") else output.NOT_RUNNING
