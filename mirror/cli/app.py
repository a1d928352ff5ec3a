"""The `mirror` command: thin; it reads configuration and runs a role or the demo.

mirror secondary --config F              run this host's standby
mirror primary --config F [--duration S] [--checkpoints N]
mirror status --config F [--json]        what this host's role reports
mirror failover --config F [--force]     promote this host's secondary now
mirror switchover --config F             planned role swap (run on the primary's host)
(failover and switchover reach the role through STATE_DIR/control.sock)
mirror keygen [--dir D] [--name N]       this host's interconnect key pair (CurveZMQ)
mirror image build [--dir D]             the demo guest (Debian kernel + busybox initramfs)
mirror demo [--guest synthetic|qemu|libvirt] ... a primary and a secondary on this machine
mirror pool COMMAND ...                  pool HA on etcd (mirror pool --help)
mirror agent [--config F]                this host's host agent: every pair role on the host
mirror pair DOMAIN --peer HOST [--check] mirror a libvirt domain onto HOST (via the host agents)
mirror unpair DOMAIN | list              undo it | the pairs this host agent runs
mirror status|failover|switchover DOMAIN the same for a pair the host agent runs
mirror completion bash | man             a bash completion script | the manual page

-v and --log-json go anywhere on the command line. Exit codes: 0 done, 1 refused or not
protected, 2 error, 3 not running, 130 interrupted; with --json every outcome is one
JSON object on stdout (docs/operating.md, "Exit codes and --json").
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from mirror.cli import demo, host, keys, output, pool, roles, status
from mirror.cli.args import LOG_JSON_HELP


class _Version(argparse.Action):
    """``--version``: the installed package's version (read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"mirror {version()}")
        parser.exit()


def version() -> str:
    """The installed distribution's version, else mirror.__version__ (a source tree)."""
    from importlib import metadata

    try:
        return metadata.version("mirror")
    except metadata.PackageNotFoundError:
        import mirror

        return mirror.__version__


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each command group adds its own commands."""
    ap = output.JsonErrorParser(
        prog="mirror", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--log-json", action="store_true", help=LOG_JSON_HELP)
    ap.add_argument("--version", action=_Version, help="print the version and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    roles.add_run_parsers(sub)  # secondary, primary
    status.add_parsers(sub)
    roles.add_handover_parsers(sub)  # failover, switchover
    keys.add_parsers(sub)  # keygen, keys
    demo.add_parsers(sub)  # image, demo
    pool.add_parser(sub)
    host.add_parsers(sub)  # agent, pair, unpair, list
    sub.add_parser("completion", help="print a bash completion script "
                   "(source <(mirror completion bash))").add_argument("shell", choices=["bash"])
    sub.add_parser("man", help="print the manual page (roff: mirror man | man -l -)")
    for cmd in commands(ap):
        _anywhere(cmd)
    return ap


def commands(ap: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``ap`` (commands, their subcommands ...), depth first."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in dict.fromkeys(action.choices.values()):  # aliases once
                yield p
                yield from commands(p)


def subcommands(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``ap``'s commands by name (empty for a leaf command)."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _anywhere(p: argparse.ArgumentParser) -> None:
    """``-v`` and ``--log-json`` after a command too: they only set what they set before
    it (SUPPRESS: a command's parser leaves the value given before it alone)."""
    have = {s for a in p._actions for s in a.option_strings}
    if "-v" not in have:
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging (as before the command)")
    if "--log-json" not in have:
        p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                       help=LOG_JSON_HELP)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    from mirror.ha.role import setup_logging

    setup_logging(args.verbose, args.log_json)
    try:
        if args.command == "pool":
            return pool.run(args)
        return run(args)
    except KeyboardInterrupt:
        return output.interrupted(as_json)
    except Exception as e:  # the last resort: every known bad input has its own message
        return output.internal_error(e, args.verbose, as_json)


def run(args: argparse.Namespace) -> int:
    """The command of ``args`` (except pool); a known error is one line, exit 2."""
    try:
        return dispatch(args)
    except output.known_errors() as e:
        return output.error(e, as_json=bool(getattr(args, "json", False)))


def dispatch(args: argparse.Namespace) -> int:
    from mirror.config import load

    cmd = args.command
    if cmd == "keygen":
        return keys.keygen(args)
    if cmd == "image":
        return demo.build_image(args)
    if cmd == "demo":
        return demo.run(args)
    if cmd == "completion":
        from mirror.cli import manual

        print(manual.bash_completion(build_parser()), end="")
        return output.OK
    if cmd == "man":
        from mirror.cli import manual

        print(manual.manpage(build_parser(), version()), end="")
        return output.OK
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
    """`mirror status|failover|switchover [DOMAIN]` without --config: through this
    host agent, which names the pair's role configuration (and so its control socket)."""
    from mirror.config import ConfigError, load

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
