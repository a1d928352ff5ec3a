"""The output contract of every `mirror` command, in one place (the table is in
docs/operating.md, "Exit codes and --json").

Exit codes: 0 done; 1 refused or not protected (the reason is printed: admission
control, a domain that cannot be mirrored, a promotion that did not happen, a demo that
lost or repeated outputs); 2 an error (a bad option or configuration, no host agent, etcd or
libvirt unreachable); 3 not running (`mirror status`: no role has reported, or the one
that last reported is not running); 130 interrupted.

stderr: an error is one line, ``mirror: error: ...`` (``mirror pool: error: ...``); a
refusal or a failure is one line ``mirror: ...``.  An error nobody foresaw is one line
too (`internal_error`), with the traceback only under ``-v``: never a traceback by
default.

``--json``: every outcome is one JSON object on stdout: the answer, or for an error, a
refusal or an interruption ``{"ok": false, "error": MESSAGE, "exit": CODE}`` (the one
line also goes to stderr). Bad options too (`JsonErrorParser`), whenever ``--json`` is
on the command line.

Nothing here imports more than the standard library's json: `mirror --help` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

OK = 0
FAILED = 1  # refused, or did not happen / not protected: the reason is printed
ERROR = 2  # a known error: one line
NOT_RUNNING = 3  # `mirror status`: no role has reported, or it is not running
INTERRUPTED = 130


def known_errors() -> tuple[type[Exception], ...]:
    """The errors a command expects (bad input, a peer or a host agent unreachable): one
    line, exit 2. GuestError, StandbyError and ControlError are RuntimeErrors."""
    from mirror.config import ConfigError  # not at import: `mirror --help` is fast

    return (ConfigError, ConnectionError, RuntimeError, OSError)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=1))


def json_outcome(message: object, code: int, **extra: Any) -> None:
    """The JSON object of an outcome that is not an answer: an error, a refusal."""
    print(json.dumps({"ok": False, "error": str(message), "exit": code, **extra}))


def fail(message: str, prog: str = "mirror", as_json: bool = False) -> int:
    """A refusal or a failure (exit 1): ``mirror: MESSAGE`` on stderr."""
    if as_json:
        json_outcome(message, FAILED)
    print(f"{prog}: {message}", file=sys.stderr)
    return FAILED


def error(message: object, prog: str = "mirror", as_json: bool = False) -> int:
    """A known error (exit 2): ``mirror: error: MESSAGE`` on stderr; with ``as_json``
    first ``{"ok": false, "error": MESSAGE, "exit": 2}`` on stdout."""
    if as_json:
        json_outcome(message, ERROR)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return ERROR


def not_running(message: object, as_json: bool = False, **extra: Any) -> int:
    """Nothing runs to answer (exit 3, `mirror status`): ``mirror: error: MESSAGE``."""
    if as_json:
        json_outcome(message, NOT_RUNNING, running=False, **extra)
    print(f"mirror: error: {message}", file=sys.stderr)
    return NOT_RUNNING


def interrupted(as_json: bool = False) -> int:
    if as_json:
        json_outcome("interrupted", INTERRUPTED)
    print("mirror: interrupted", file=sys.stderr)
    return INTERRUPTED


def internal_error(e: Exception, verbose: bool, as_json: bool = False) -> int:
    """The last resort: every known bad input has its own message; this is a bug."""
    if verbose:
        import traceback

        traceback.print_exc()
    message = (f"internal error: {type(e).__name__}: {e} (a bug in mirror: run it again "
               f"with -v for the traceback, and report it)")
    return error(message, as_json=as_json)


def wants_json(args: Sequence[str]) -> bool:
    """``--json`` is on the command line (before a ``--``)."""
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


class JsonErrorParser(argparse.ArgumentParser):
    """The parser of every `mirror` command: with ``--json`` on the command line, bad
    input also prints ``{"ok": false, "error": ..., "exit": 2}`` on stdout (the usage
    and the message still go to stderr)."""

    _json = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        self._json = wants_json(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if self._json:
            json_outcome(message, ERROR, usage=" ".join(self.format_usage().split()))
        super().error(message)
