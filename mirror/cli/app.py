"""The `mirror` command: thin; it reads configuration and runs an agent role or the demo.

mirror secondary --config F              run this host's standby
mirror primary --config F [--duration S] [--checkpoints N]
mirror status --config F [--json]        what this host's agent reports
mirror failover --config F [--force]     promote this host's secondary now
mirror switchover --config F             planned role swap (run on the primary's host)
(failover and switchover reach the agent through STATE_DIR/control.sock)
mirror keygen [--dir D] [--name N]       this host's interconnect key pair (CurveZMQ)
mirror image build [--dir D]             the demo guest (Debian kernel + busybox initramfs)
mirror demo [--guest synthetic|qemu|libvirt] ... a primary and a secondary on this machine
mirror pool COMMAND ...                  pool HA on etcd (mirror pool --help)
mirror agent [--config F]                this host's agent: every pair role on the host
mirror pair DOMAIN --peer HOST [--check] mirror a libvirt domain onto HOST (via the agents)
mirror unpair DOMAIN | list              undo it | the pairs this host's agent runs
mirror status|failover|switchover DOMAIN the same for a pair the agent runs
"""

from __future__ import annotations

import argparse

from mirror.cli import demo, host, keys, output, pool, roles, status
from mirror.cli.args import LOG_JSON_HELP
from mirror.config import ConfigError, load


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each command group adds its own commands."""
    ap = argparse.ArgumentParser(
        prog="mirror", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--log-json", action="store_true", help=LOG_JSON_HELP)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    roles.add_run_parsers(sub)  # secondary, primary
    status.add_parsers(sub)
    roles.add_handover_parsers(sub)  # failover, switchover
    keys.add_parsers(sub)  # keygen, keys
    demo.add_parsers(sub)  # image, demo
    pool.add_parser(sub)
    host.add_parsers(sub)  # agent, pair, unpair, list
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mirror.ha.role import setup_logging

    setup_logging(args.verbose, args.log_json)
    try:
        if args.command == "pool":
            return pool.run(args)
        return run(args)
    except KeyboardInterrupt:
        return output.interrupted()
    except Exception as e:  # the last resort: every known bad input has its own message
        return output.internal_error(e, args.verbose)


def run(args: argparse.Namespace) -> int:
    """The command of ``args`` (except pool); a known error is one line, exit 2."""
    try:
        return dispatch(args)
    except output.KNOWN_ERRORS as e:
        return output.error(e)


def dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "keygen":
        return keys.keygen(args)
    if cmd == "image":
        return demo.build_image(args)
    if cmd == "demo":
        return demo.run(args)
    if cmd in host.HOST_COMMANDS:
        return host.run(args)
    if cmd == "keys" and not args.config:
        return keys.print_reload(
            host.ask(args, "reload-keys", timeout=keys.AGENT_RELOAD_WAIT_S))
    if cmd in ("status", "failover", "switchover") and not args.config:
        return through_agent(args)
    cfg = load(args.config)
    if cmd == "keys":
        return keys.reload_keys(cfg)
    if cmd == "status":
        return status.run(cfg, args)
    if cmd == "failover":
        return roles.manual_failover(cfg, args.force, args.timeout)
    if cmd == "switchover":
        return roles.switchover(cfg, args.timeout)
    return roles.run_role(cfg, args)


def through_agent(args: argparse.Namespace) -> int:
    """`mirror status|failover|switchover [DOMAIN]` without --config: through this host's
    agent, which names the pair's role configuration (and so its control socket)."""
    if args.domain is None:
        if args.command != "status":
            raise ConfigError(f"mirror {args.command}: give DOMAIN (a pair of this host's "
                              f"agent) or --config F (a role run by hand)")
        return host.list_pairs(args)
    path, st = host.role_config(args)
    if args.command == "status":
        return host.show_pair(st, args.json)
    cfg = load(path)
    if args.command == "failover":
        return roles.manual_failover(cfg, args.force, args.timeout)
    return roles.switchover(cfg, args.timeout)
