"""A role's log lines also to journald or syslog, with its pair as a field.

The host agent sets ``[log] sink`` in each role's configuration from ``[agent] log``
(:func:`resolve`); the role then sends every log line it writes to stderr (its
``role.log``) to that unix datagram socket too (:func:`attach`):

- ``journal:PATH`` (journald's native protocol, /run/systemd/journal/socket): the line
  as MESSAGE, with PRIORITY, SYSLOG_IDENTIFIER=mirror, PAIR, NODE, LOGGER, and EVENT for
  a structured event (``journalctl PAIR=web1``);
- ``syslog:PATH`` (/dev/log): ``<PRI>mirror[PID]: pair=P node=N LOGGER LEVEL message``,
  or with ``--log-json`` the JSON object with "pair" and "node" in it.

The line is the one stderr gets (JSON with ``--log-json``).  Sending never blocks and
never raises: a full or missing socket drops the line (stderr still has it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from typing import Any

from mirror.config import LOG_SOCKETS, LogConfig, parse_log_sink

IDENTIFIER = "mirror"
MAX_MESSAGE = 48 * 1024  # bytes of one line sent at most (the rest is cut)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}  # fmt: skip
_DAEMON = 3  # syslog facility


def priority(level: int) -> int:
    for lv in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= lv:
            return _PRIORITY[lv]
    return _PRIORITY[logging.DEBUG]


def resolve(setting: str) -> str:
    """The role's ``[log] sink`` for the host agent's ``[agent] log`` setting: "auto" is
    journald's socket when it exists, else /dev/log when it exists, else ""."""
    if setting == "none":
        return ""
    if setting == "auto":
        for kind in ("journal", "syslog"):
            if os.path.exists(LOG_SOCKETS[kind]):
                return kind + ":" + LOG_SOCKETS[kind]
        return ""
    target = parse_log_sink(setting, "[agent] log")
    return "" if target is None else f"{target[0]}:{target[1]}"


def journal_datagram(fields: dict[str, str]) -> bytes:
    """journald's native protocol: KEY=value lines; a value with a newline as KEY, its
    length (64-bit little endian), the value."""
    out = bytearray()
    for k, v in fields.items():
        b = v.encode("utf-8", "replace")
        if b"\n" in b:
            out += k.encode() + b"\n" + struct.pack("<Q", len(b)) + b + b"\n"
        else:
            out += k.encode() + b"=" + b + b"\n"
    return bytes(out)


class SinkHandler(logging.Handler):
    """Sends each record to a journald or syslog datagram socket (never blocking)."""

    def __init__(self, kind: str, path: str, pair: str, node: str,
                 json_lines: bool) -> None:
        super().__init__()
        self.kind, self.path, self.pair, self.node = kind, path, pair, node
        self.json_lines = json_lines
        self.dropped = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    def datagram(self, record: logging.LogRecord) -> bytes:
        line = self.format(record)[:MAX_MESSAGE]
        fields = getattr(record, "event_fields", None)
        if self.kind == "journal":
            f = {"MESSAGE": line, "PRIORITY": str(priority(record.levelno)),
                 "SYSLOG_IDENTIFIER": IDENTIFIER, "SYSLOG_FACILITY": str(_DAEMON),
                 "PAIR": self.pair, "NODE": self.node, "LOGGER": record.name}  # fmt: skip
            if isinstance(fields, dict) and isinstance(fields.get("event"), str):
                f["EVENT"] = fields["event"]
            return journal_datagram(f)
        if self.json_lines:
            try:
                obj: Any = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                body = json.dumps({"pair": self.pair, "node": self.node, **obj}, default=str)
            else:
                body = json.dumps({"pair": self.pair, "node": self.node, "message": line})
        else:
            body = f"pair={self.pair} node={self.node} {line}"
        pri = _DAEMON * 8 + priority(record.levelno)
        return f"<{pri}>{IDENTIFIER}[{os.getpid()}]: {body}".encode("utf-8", "replace")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.datagram(record)
            self.sock.sendto(data, self.path)
        except OSError:
            self.dropped += 1  # full, gone or too big: stderr still has the line
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        super().close()


def attach(cfg: LogConfig, pair: str, node: str) -> SinkHandler | None:
    """Send this process's log lines to ``cfg.sink`` too (replacing an earlier sink),
    formatted like its stderr lines (JSON with ``--log-json``); None when it is ""."""
    from mirror.ha.role import JsonFormatter  # role imports this module

    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, SinkHandler)]:
        root.removeHandler(h)
        h.close()
    target = cfg.target()
    if target is None:
        return None
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    handler = SinkHandler(*target, pair, node, json_lines)
    handler.setFormatter(JsonFormatter() if json_lines
                         else logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    return handler
