"""The host agent's commands: `mirror agent`, `mirror pair`, `unpair`, `list`, and
`status|failover|switchover DOMAIN` (routed by the local agent to that pair's role).

They talk to this host's agent over its control socket (``[agent] state_dir`` of
``--agent-config``, default /etc/mirror/agent.toml; mirror/ha/control.py).
``mirror pair --check`` needs no agent: it reads the domain from libvirt and explains.

Exit codes of `mirror pair`: 0 protected (or, with --check, can be mirrored); 1 cannot
be mirrored (every reason printed) or pairing failed or timed out; 2 an error (bad
option, no agent, no such domain, libvirt unreachable).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mirror.config import DEFAULT_AGENT_CONFIG, AgentConfig, load_agent, require_arbiter
from mirror.guests import domaincheck
from mirror.guests.libvirtdom import Domains
from mirror.ha import control
from mirror.ha.hostagent import HostAgent
from mirror.ha.role import stop_on_signals

HOST_COMMANDS = ("agent", "pair", "unpair", "list")


def _number(lo: float, hi: float) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be within {lo:.0f}..{hi:.0f}, got {text}")
        return int(v) if v.is_integer() else v

    return parse


def _agent_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent-config",
        default=DEFAULT_AGENT_CONFIG,
        metavar="F",
        help=f"this host's agent configuration (default {DEFAULT_AGENT_CONFIG})",
    )


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("agent", help="this host's agent: runs every pair role on the host")
    p.add_argument("--config", default=DEFAULT_AGENT_CONFIG,
                   help=f"agent configuration (default {DEFAULT_AGENT_CONFIG})")

    p = sub.add_parser("pair", help="mirror a libvirt domain of this host onto a peer host")
    p.add_argument("domain", metavar="DOMAIN", help="the libvirt domain (also the pair's name)")
    p.add_argument("--peer", help="the peer host (a [peers] name in the agent configuration)")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default: [agent] connect)")
    p.add_argument("--check", action="store_true",
                   help="only say whether DOMAIN can be mirrored, and what to change; "
                        "changes nothing")
    p.add_argument("--prepare", action="store_true",
                   help="write what DOMAIN needs into its persistent definition, for its next "
                        "start (shared memfd RAM, the dirty-page log's preload); pairs nothing")
    p.add_argument("--guest", choices=["libvirt", "synthetic"], default="libvirt",
                   help="libvirt (default); synthetic: a synthetic guest named DOMAIN (tests)")
    p.add_argument("--ram-mib", type=_number(1, 1 << 20), default=64,
                   help="--guest synthetic: its RAM (MiB)")
    p.add_argument("--observer", metavar="HOST:PORT",
                   help="--guest synthetic: where its released outputs go")
    p.add_argument("--timeout", type=_number(1, 86400), default=120.0, metavar="S",
                   help="seconds to wait for protection (default 120)")
    _agent_config_arg(p)

    p = sub.add_parser("unpair", help="undo `mirror pair DOMAIN` (run on the primary's host)")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--force", action="store_true",
                   help="on the standby's host: drop this host's part even so")
    _agent_config_arg(p)

    p = sub.add_parser("list", help="the pairs this host's agent runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    _agent_config_arg(p)


def agent_dir(path: str) -> Path:
    return load_agent(path).state_dir


def ask(args: argparse.Namespace, op: str, fields: dict[str, Any] | None = None,
        timeout: float = 10.0) -> dict[str, Any]:
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
        return 0
    if args.command == "list":
        a = ask(args, "list")
        if args.json:
            print(json.dumps(a["pairs"], indent=1))
            return 0
        print(f"{'PAIR':<20} {'ROLE':<10} {'PEER':<12} {'GEN':>4} {'PHASE':<14} PROTECTION")
        for p in a["pairs"]:
            phase = p.get("phase") or (p.get("waiting") and "waiting") or p.get("state")
            print(f"{p['pair']:<20} {p['role']:<10} {p['peer']:<12} {p['generation']:>4} "
                  f"{phase!s:<14} {p.get('protection')}")
        return 0
    raise AssertionError(args.command)


def run_agent(path: str) -> int:
    cfg = load_agent(path)
    require_arbiter(cfg.arbiter, path)  # every pair of this agent uses it
    stop = stop_on_signals()
    agent = HostAgent(cfg, config_path=Path(path).resolve())
    signal.signal(signal.SIGHUP, lambda signum, frame: agent.reload_wanted.set())
    return agent.run(stop)


def check_domain(uri: str, domain: str) -> domaincheck.Assessment:
    with Domains(uri) as lv:
        return lv.assess(domain)


def prepare_domain(uri: str, domain: str) -> int:
    with Domains(uri) as lv:
        changes = lv.prepare(domain)
        a = lv.assess(domain)
    print(f"{domain}: its definition now has, for its next start:" if changes else
          f"{domain}: its definition has what mirror needs already")  # fmt: skip
    for c in changes:
        print(f"  - {c}")
    print(domaincheck.explain_assessment(a))
    return 0 if a.ok else 1


def pair(args: argparse.Namespace) -> int:
    cfg: AgentConfig | None = None
    if args.guest == "libvirt":
        if args.prepare:  # needs no agent: only the domain's definition changes
            uri = args.connect
            if uri is None:
                try:
                    uri = load_agent(args.agent_config).agent.connect
                except Exception:
                    uri = "qemu:///system"
            return prepare_domain(uri, args.domain)
        # --check is what pair checks: the agent's configuration, the peer, the domain
        cfg = load_agent(args.agent_config)
        if args.peer is not None and args.peer not in cfg.peers:
            print(f"mirror: error: unknown peer {args.peer!r}: this host's agent knows "
                  f"{', '.join(sorted(cfg.peers)) or 'no peers'} (add it to [peers] of "
                  f"{args.agent_config})", file=sys.stderr)  # fmt: skip
            return 2
        uri = args.connect or cfg.agent.connect
        r = domaincheck.with_agent(check_domain(uri, args.domain), cfg.agent.bridge)
        print(domaincheck.explain_assessment(r))
        if not r.ok:
            return 1
        if args.check:
            return 0
    elif args.check or args.prepare:
        print(f"{args.domain}: a synthetic guest can always be mirrored")
        return 0
    if not args.peer:
        print("mirror: error: --peer HOST is needed (a [peers] name of the agent "
              "configuration)", file=sys.stderr)
        return 2
    fields: dict[str, Any] = {"pair": args.domain, "peer": args.peer, "kind": args.guest}
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
    seen = 0
    last_phase = None
    deadline = start + args.timeout
    while time.monotonic() < deadline:
        try:
            st = ask(args, "progress", {"pair": args.domain})
        except control.ControlError as e:
            print(f"mirror: error: {e}", file=sys.stderr)
            return 2
        progress = st.get("progress") or []
        for line in progress[seen:]:
            print(f"{time.monotonic() - start:6.1f}s  {line.split(' ', 1)[-1]}")
        seen = len(progress)
        if str(st.get("state", "")).startswith("failed"):
            print(f"mirror: pairing {args.domain} failed (nothing is left of it)",
                  file=sys.stderr)
            return 1
        phase = st.get("phase")
        if phase and phase != last_phase:
            print(f"{time.monotonic() - start:6.1f}s  primary: {phase}")
            last_phase = phase
        if phase == "protected":
            print(f"{args.domain} is protected by {st.get('peer')} "
                  f"({time.monotonic() - start:.1f} s)")
            return 0
        time.sleep(0.2)
    print(f"mirror: {args.domain} not protected within {args.timeout:g} s: see `mirror status "
          f"{args.domain}` and the role's log", file=sys.stderr)
    return 1


def role_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Where the role of pair DOMAIN keeps its configuration (asked of the agent)."""
    st = ask(args, "status", {"pair": args.domain})
    return str(st["role_config"]), st
