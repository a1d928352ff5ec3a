"""The `mirror` command: thin; it reads configuration and runs an agent role or the demo.

mirror secondary --config F              run this host's standby
mirror primary --config F [--duration S] [--checkpoints N]
mirror status --config F [--json]        what this host's agent reports
mirror demo [options]                    a primary and a secondary on this machine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace

from mirror import agent, demo
from mirror.config import Config, ConfigError, load, parse_hostport
from mirror.guests.base import GuestError
from mirror.hoststate import read_json
from mirror.standby import StandbyError


def _positive(kind: type, lo: float, hi: float):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be within {lo:g}..{hi:g}, got {text}")
        return v  # type: ignore[no-any-return]

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mirror", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("secondary", help="run this host's standby (until SIGTERM)")
    p.add_argument("--config", required=True, help="host configuration (TOML)")

    p = sub.add_parser("primary", help="run the guest here, mirrored to the secondary")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument(
        "--duration",
        type=_positive(float, 0.1, 1e9),
        metavar="S",
        help="stop after S seconds of checkpoints (default: until SIGTERM)",
    )
    p.add_argument(
        "--checkpoints",
        type=_positive(int, 1, 10**9),
        metavar="N",
        help="take N checkpoints, then hold the guest paused at the last one",
    )

    p = sub.add_parser("status", help="what this host's agent reports")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("demo", help="a primary and a secondary on this machine, then a summary")
    p.add_argument("--config", help="base configuration (TOML); the options below override it")
    p.add_argument("--ram-mib", type=_positive(int, 1, 1 << 20), help="guest RAM (default 256)")
    p.add_argument(
        "--dirty-rate",
        type=_positive(int, 0, 10**8),
        metavar="PAGES_PER_S",
        help="pages the guest dirties per second (default 20000)",
    )
    p.add_argument(
        "--outputs-per-s",
        type=_positive(int, 1, 100_000),
        help="outputs the guest emits per second (default 200)",
    )
    p.add_argument(
        "--shape",
        choices=["uniform", "hot", "sequential"],
        help="where the guest's writes land (default uniform)",
    )
    p.add_argument("--epoch-ms", type=_positive(int, 10, 1000), help="epoch (default 50)")
    p.add_argument("--scan", choices=["exact", "hashed"], help="dirty-page scan (default exact)")
    p.add_argument(
        "--duration",
        type=_positive(float, 0.5, 1e6),
        default=10.0,
        metavar="S",
        help="seconds of checkpoints (default 10)",
    )
    p.add_argument(
        "--observer",
        metavar="HOST:PORT",
        help="send the outputs to this TCP endpoint instead of the built-in observer",
    )
    p.add_argument(
        "--kill-after",
        type=_positive(float, 0.5, 1e6),
        metavar="S",
        help="SIGKILL the primary host's whole process group S seconds after it "
        "starts; the secondary promotes and the guest goes on there",
    )
    p.add_argument(
        "--run-on",
        type=_positive(float, 0, 1e6),
        default=3.0,
        metavar="S",
        help="with --kill-after: seconds the promoted guest runs before the end (default 3)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--keep", action="store_true", help="keep the hosts' files (logs, stats)")
    return ap


def demo_config(args: argparse.Namespace) -> Config:
    base = load(args.config) if args.config else Config()
    g = base.guest
    guest = replace(
        g,
        ram_mib=args.ram_mib or g.ram_mib,
        dirty_pages_per_s=g.dirty_pages_per_s if args.dirty_rate is None else args.dirty_rate,
        outputs_per_s=args.outputs_per_s or g.outputs_per_s,
        shape=args.shape or g.shape,
    )
    ck = replace(
        base.checkpoint,
        epoch_ms=args.epoch_ms or base.checkpoint.epoch_ms,
        scan=args.scan or base.checkpoint.scan,
    )
    return replace(base, guest=guest, checkpoint=ck)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        if args.command == "demo":
            if args.observer:
                parse_hostport(args.observer, "--observer")
            result = demo.run(
                demo_config(args),
                duration=args.duration,
                observer=args.observer,
                keep=args.keep,
                quiet=args.json,
                kill_after=args.kill_after,
                run_on=args.run_on,
            )
            (demo.dump_json if args.json else demo.print_summary)(result)
            return 0
        cfg = load(args.config)
        if args.command == "status":
            return show_status(cfg, args.json)
        stop = agent.stop_on_signals()
        if args.command == "secondary":
            return agent.run_secondary(cfg, stop)
        return agent.run_primary(cfg, stop, duration=args.duration, epochs=args.checkpoints)
    except (ConfigError, GuestError, StandbyError, ConnectionError, RuntimeError, OSError) as e:
        print(f"mirror: error: {e}", file=sys.stderr)
        return 2


def show_status(cfg: Config, as_json: bool) -> int:
    path = cfg.state_dir / "status.json"
    try:
        st = read_json(path)
    except OSError:
        print(f"mirror: no agent has reported in {cfg.state_dir} (no {path.name})", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(st, indent=1))
    else:
        for k, v in st.items():
            print(f"{k:>16}: {v}")
    return 0
