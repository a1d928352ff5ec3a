"""The output contract of every `mirror` command, in one place.

Exit codes: 0 done; 1 refused or failed (the reason is printed: admission control, a
domain that cannot be mirrored, a promotion that did not happen); 2 an error (a bad
option or configuration, no agent, etcd or libvirt unreachable); 3 `mirror status`: the
agent that last reported is not running; 130 interrupted.

stderr: an error is one line, ``mirror: error: ...`` (``mirror pool: error: ...``); a
refusal or a failure is one line ``mirror: ...``.  An error nobody foresaw is one line
too (`internal_error`), with the traceback only under ``-v``: never a traceback by
default.

``--json``: the answer is JSON on stdout; `mirror pool` prints every outcome there,
errors included, as one object with ``"exit"`` (`JsonErrorParser` for bad options).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from mirror.config import ConfigError

OK = 0
FAILED = 1  # refused, or did not happen: the reason is printed
ERROR = 2  # a known error: one line
NOT_RUNNING = 3  # `mirror status`: the agent that last reported is not running
INTERRUPTED = 130

# The errors a command expects (bad input, a peer or an agent unreachable): one line,
# exit 2. GuestError, StandbyError and ControlError are RuntimeErrors.
KNOWN_ERRORS: tuple[type[Exception], ...] = (ConfigError, ConnectionError, RuntimeError, OSError)


def fail(message: str, prog: str = "mirror") -> int:
    """A refusal or a failure (exit 1): ``mirror: MESSAGE`` on stderr."""
    print(f"{prog}: {message}", file=sys.stderr)
    return FAILED


def error(message: object, prog: str = "mirror", as_json: bool = False) -> int:
    """A known error (exit 2): ``mirror: error: MESSAGE`` on stderr; with ``as_json``
    first ``{"error": MESSAGE, "exit": 2}`` on stdout."""
    if as_json:
        print(json.dumps({"error": str(message), "exit": ERROR}))
    print(f"{prog}: error: {message}", file=sys.stderr)
    return ERROR


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=1))


def interrupted() -> int:
    print("mirror: interrupted", file=sys.stderr)
    return INTERRUPTED


def internal_error(e: Exception, verbose: bool) -> int:
    """The last resort: every known bad input has its own message; this is a bug."""
    if verbose:
        traceback.print_exc()
    print(
        f"mirror: error: internal error: {type(e).__name__}: {e} (a bug in mirror: "
        f"run it again with -v for the traceback, and report it)",
        file=sys.stderr,
    )
    return ERROR


class JsonErrorParser(argparse.ArgumentParser):
    """argparse for commands whose every outcome is JSON under ``--json`` (`mirror pool`):
    bad input also prints ``{"error": ..., "exit": 2}`` on stdout (the usage and message
    still go to stderr)."""

    _json = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is not None:
            self._json = "--json" in args
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if self._json:
            print(json.dumps({"error": f"{self.prog}: error: {message}", "exit": ERROR}))
        super().error(message)
