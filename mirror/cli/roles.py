"""The roles run by hand: `mirror primary|secondary --config F` run one, and
`mirror failover|switchover --config F` ask the one running on this host (through
STATE_DIR/control.sock) to promote now, or to hand over to its secondary. The engine
(mirror.ha.primary, .secondary: zmq, the C engine) is imported by the commands that run
it."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import LOG_JSON_HELP, domain_or_config, within

if TYPE_CHECKING:  # imported by the commands: not by `mirror --help`
    from mirror.config import Config


def add_run_parsers(sub: Any) -> None:
    """`mirror secondary` and `mirror primary`."""
    p = sub.add_parser("secondary", help="run this host's standby (until SIGTERM)")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                   help=LOG_JSON_HELP)

    p = sub.add_parser("primary", help="run the guest here, mirrored to the secondary")
    p.add_argument("--config", required=True, help="host configuration (TOML)")
    p.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                   help=LOG_JSON_HELP)
    p.add_argument(
        "--duration",
        type=within(float, 0.1, 1e9),
        metavar="S",
        help="stop after S seconds of checkpoints (default: until SIGTERM)",
    )
    p.add_argument(
        "--checkpoints",
        type=within(int, 1, 10**9),
        metavar="N",
        help="take N checkpoints, then hold the guest paused at the last one",
    )
    p.add_argument(
        "--leave-after-switchover",
        action="store_true",
        help="after a switchover exit instead of becoming the secondary (the pool's "
        "pool agent uses it: the new standby is on another host)",
    )


def add_handover_parsers(sub: Any) -> None:
    """`mirror failover` and `mirror switchover`."""
    p = sub.add_parser("failover", help="promote this host's secondary now (manual failover)")
    domain_or_config(p, "the secondary host's configuration (TOML)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even though the primary's storage heartbeat is fresh",
    )
    p.add_argument(
        "--timeout",
        type=within(float, 1, 3600),
        default=30.0,
        metavar="S",
        help="seconds to wait for the promotion (default 30)",
    )

    p = sub.add_parser(
        "switchover",
        help="planned role swap: the secondary takes over, this host becomes its secondary",
    )
    domain_or_config(p, "the primary host's configuration (TOML)")
    p.add_argument(
        "--timeout",
        type=within(float, 1, 3600),
        default=30.0,
        metavar="S",
        help="seconds to wait for the swap (default 30)",
    )


def run_role(cfg: Config, args: argparse.Namespace) -> int:
    """`mirror primary|secondary --config F`: until SIGTERM (or --duration)."""
    from mirror.config import require_arbiter
    from mirror.ha import control, primary, rekey, role, secondary

    require_arbiter(cfg.arbiter, args.config)  # before anything starts
    stop = role.stop_on_signals()
    rekey.install(cfg.keys, cfg.node.name, Path(args.config))  # SIGHUP: read the keys again
    lock, server = control.start(cfg.state_dir)  # one daemon per state_dir; its socket
    code: int | None = None
    try:
        if args.command == "secondary":
            code = secondary.run_secondary(cfg, stop)
        else:
            code = primary.run_primary(
                cfg,
                stop,
                duration=args.duration,
                epochs=args.checkpoints,
                stay=not args.leave_after_switchover,
            )
        return code
    finally:
        role.mark_stopped(cfg.state_dir, cfg.pair.name, cfg.node.name, code)
        server.close()
        lock.close()


def _wait_status(
    cfg: Config, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any] | None:
    """The role's status once ``done`` holds for it, or None after ``timeout`` s."""
    from mirror.ha import control

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            st = control.ask(cfg.state_dir, "status", timeout=max(0.5, deadline - time.monotonic()))
        except control.ControlError:
            continue  # between roles, or gone (then the timeout says so)
        if done(st):
            return st
    return None


def manual_failover(cfg: Config, force: bool, timeout: float) -> int:
    """`mirror failover`: ask this host's secondary (through its control socket) to
    promote now."""
    from mirror.ha import control

    st = control.ask(cfg.state_dir, "status")
    if st.get("role") != "secondary":
        return output.fail(
            f"the role in {cfg.state_dir} is not a secondary (role "
            f"{st.get('role')!r}): nothing to promote"
        )
    if not st.get("committed"):
        return output.fail("the standby holds no committed checkpoint yet: cannot promote")
    primary = st.get("primary")
    if primary and not force:
        from mirror.ha import role
        from mirror.ha.claims import manual_failover_refusal

        arbiter = role.make_arbiter(cfg.arbiter, cfg.pair.name, f"{cfg.node.name}-cli",
                                    prepare=True)
        why = manual_failover_refusal(arbiter, str(primary), cfg.arbiter.silent_after_ms / 1000)
        if why is not None:
            return output.fail(why)
    control.ask(cfg.state_dir, "failover")
    now = _wait_status(cfg, lambda s: s.get("role") == "primary", timeout)
    if now is None:
        return output.fail(
            f"{cfg.node.name} did not promote within {timeout:g} s (it may have "
            f"lost the claim: see its log)"
        )
    print(f"promoted {cfg.node.name} from checkpoint {now.get('promoted_from')}")
    return output.OK


def switchover(cfg: Config, timeout: float) -> int:
    """`mirror switchover`: ask this host's primary (through its control socket) to hand
    over to its secondary."""
    from mirror.ha import control

    st = control.ask(cfg.state_dir, "status")
    if st.get("role") != "primary" or st.get("phase") != "protected":
        return output.fail(
            f"the role in {cfg.state_dir} is not a protected primary (role "
            f"{st.get('role')!r}, phase {st.get('phase')!r}): nothing to hand over"
        )
    answer = control.ask(cfg.state_dir, "switchover")
    if not answer.get("accepted"):
        return output.fail(
            f"the primary is no longer protected (phase {answer.get('phase')!r}): "
            f"nothing to hand over"
        )
    if _wait_status(cfg, lambda s: s.get("role") == "secondary", timeout) is None:
        return output.fail(
            f"no switchover within {timeout:g} s: see {cfg.node.name}'s log"
        )
    print(
        f"switched over: {cfg.node.name} is now the secondary; its peer runs the guest "
        f"from the last checkpoint"
    )
    return output.OK
