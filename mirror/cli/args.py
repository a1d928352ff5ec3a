"""The options several commands share, and the one check of a number option."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)

# mirror.config.DEFAULT_AGENT_CONFIG (a unit test checks they agree): not imported here,
# so that `mirror --help` needs no configuration code
DEFAULT_AGENT_CONFIG = "/etc/mirror/agent.toml"

LOG_JSON_HELP = (
    "log one JSON object per line (time, level, logger, and an event's fields or "
    "the message), for journald or a log shipper"
)


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def within(kind: type[N], lo: float, hi: float) -> Callable[[str], N]:
    """An option's number: ``kind`` (int or float) of the text, within lo..hi."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> N:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(
                f"must be within {_bound(lo)}..{_bound(hi)}, got {text}")
        return v

    return parse


def agent_config(p: argparse.ArgumentParser, help: str) -> None:
    """``--agent-config F``: this host agent's configuration (and so its socket)."""
    p.add_argument("--agent-config", default=DEFAULT_AGENT_CONFIG, metavar="F",
                   help=f"{help} (default {DEFAULT_AGENT_CONFIG})")


def domain_or_config(p: argparse.ArgumentParser, config_help: str) -> None:
    """A role run by hand (``--config F``) or a pair of this host agent (``DOMAIN``)."""
    p.add_argument("domain", nargs="?", metavar="DOMAIN",
                   help="a pair this host agent runs (instead of --config)")
    p.add_argument("--config", help=config_help)
    agent_config(p, "with DOMAIN: the host agent's configuration")


def json_flag(p: argparse.ArgumentParser, help: str = "print JSON") -> None:
    p.add_argument("--json", action="store_true", help=help)
