"""The demo's client: one TCP connection to the guest's service, checked line by line.

It reads the counter stream (``n=1``, ``n=2``, ...) and sends ``ping K`` every
``--echo-every`` seconds, expecting ``echo ping K`` back in order.  It never
reconnects: a reset, an EOF, a gap or a repeat in the counter, or a wrong echo
is a failure, reported as such.  Events go to ``--log`` as JSON lines with wall
clock times (the demo lines them up with the kill); ``SIGTERM`` ends it with a
summary line.  With ``--write-every`` (a guest with a disk) it also sends
``write K`` (the guest appends K to a journal on its disk, fsync, answers
``ok K``) and, at the end, reads the journal back: every K answered ``ok`` must
be there, in order.

    python -m mirror.lab.tcpclient --connect 10.0.0.10:7000 --log client.jsonl
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import time
from typing import Any, TextIO


class Client:
    def __init__(self, log: TextIO) -> None:
        self.log = log
        self.last_n = 0
        self.gaps = 0
        self.repeats = 0
        self.echo_sent = 0
        self.echo_ok = 0
        self.echo_bad = 0
        self.lines = 0
        self.max_silence = 0.0  # longest wait between two received bytes, seconds
        self.max_silence_at = 0.0
        self.error: str | None = None
        self.write_sent = 0  # "write K" sent (with a disk)
        self.write_ok: list[int] = []  # the K the guest answered "ok K" for, in order
        self.journal: list[int] | None = None  # the guest's journal, read back at the end

    def emit(self, event: str, **fields: Any) -> None:
        self.log.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")
        self.log.flush()

    def line(self, text: str, at: float) -> None:
        self.lines += 1
        if text.startswith("n="):
            n = int(text[2:])
            if n != self.last_n + 1:
                if n <= self.last_n:
                    self.repeats += 1
                else:
                    self.gaps += 1
                self.emit("counter-break", expected=self.last_n + 1, got=n)
            self.last_n = n
            self.emit("counter", n=n)
        elif text.startswith("echo ping "):
            k = int(text.split()[2])
            if k == self.echo_ok + self.echo_bad + 1:
                self.echo_ok += 1
            else:
                self.echo_bad += 1
                self.emit("echo-wrong", expected=self.echo_ok + self.echo_bad, got=k)
        elif text.startswith("ok "):
            self.write_ok.append(int(text.split()[1]))
        elif text.startswith("journal"):
            self.journal = [int(k) for k in text.split()[1:]]
        else:
            self.emit("unexpected-line", line=text[:80])

    def summary(self) -> dict[str, Any]:
        return {
            "last_n": self.last_n, "gaps": self.gaps, "repeats": self.repeats,
            "echo_sent": self.echo_sent, "echo_ok": self.echo_ok, "echo_bad": self.echo_bad,
            "lines": self.lines, "max_silence_s": round(self.max_silence, 3),
            "max_silence_at": self.max_silence_at, "error": self.error,
            **self.journal_check(),
        }  # fmt: skip

    def journal_check(self) -> dict[str, Any]:
        """Every K answered "ok K" is in the journal, in order (an empty dict without one)."""
        if not self.write_sent:
            return {}
        j = self.journal or []
        at = {k: i for i, k in enumerate(j)}
        missing = [k for k in self.write_ok if k not in at]
        pos = [at[k] for k in self.write_ok if k in at]
        in_order = pos == sorted(pos)
        return {
            "write_sent": self.write_sent, "write_ok": len(self.write_ok),
            "journal_read": self.journal is not None, "journal_len": len(j),
            "journal_missing": missing[:20], "journal_in_order": in_order,
            "journal_intact": self.journal is not None and not missing and in_order,
        }  # fmt: skip


def run(
    host: str,
    port: int,
    echo_every: float,
    connect_for: float,
    log: TextIO,
    write_every: float = 0.0,
    gaps_over: float = 0.0,
) -> int:
    c = Client(log)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    deadline = time.monotonic() + connect_for
    sock = None
    while sock is None:  # the guest may still be booting: try until it answers
        try:
            sock = socket.create_connection((host, port), timeout=1.0)
        except OSError as e:
            if time.monotonic() > deadline:
                c.error = f"cannot connect to {host}:{port}: {e}"
                c.emit("summary", **c.summary())
                return 2
            time.sleep(0.2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    c.emit("connected", peer=f"{host}:{port}")
    buf = pending = b""
    last_rx = time.time()
    next_echo = time.monotonic() + echo_every
    next_write = time.monotonic() + write_every if write_every else float("inf")
    asked_journal = 0.0
    while True:
        if stop:  # at the end, with a disk: read the journal back (10 s at most)
            if not write_every or c.journal is not None:
                break
            if not asked_journal:
                asked_journal = time.monotonic() + 10
                pending += b"journal\n"
            elif time.monotonic() > asked_journal:
                break
        wait = min(0.05, max(0.0, next_echo - time.monotonic()))
        r, _, _ = select.select([sock], [], [], wait)
        now = time.time()
        if r:
            try:
                data = sock.recv(65536)
            except ConnectionError as e:
                c.error = f"connection broken: {e}"
                break
            if not data:
                c.error = "the guest closed the connection (EOF)"
                break
            if now - last_rx > c.max_silence:
                c.max_silence, c.max_silence_at = now - last_rx, now
            if now - last_rx > 0.3:
                c.emit("resumed-after-silence", silence_s=round(now - last_rx, 3))
            elif gaps_over and now - last_rx > gaps_over:
                c.emit("silence", silence_s=round(now - last_rx, 4))
            last_rx = now
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                c.line(raw.decode(errors="replace"), now)
        if time.monotonic() >= next_echo and not stop:
            next_echo += echo_every
            c.echo_sent += 1
            pending += f"ping {c.echo_sent}\n".encode()
        if time.monotonic() >= next_write and not stop:
            next_write += write_every
            c.write_sent += 1
            pending += f"write {c.write_sent}\n".encode()
        if pending:
            try:
                pending = pending[sock.send(pending) :]
            except BlockingIOError:
                pass  # the window is full (the peer is away for a moment): later
            except ConnectionError as e:
                c.error = f"connection broken: {e}"
                break
    sock.close()
    c.emit("summary", **c.summary())
    return 1 if c.error else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mirror.lab.tcpclient",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--connect", required=True, metavar="HOST:PORT")
    ap.add_argument("--echo-every", type=float, default=0.2, metavar="S")
    ap.add_argument(
        "--connect-for",
        type=float,
        default=60.0,
        metavar="S",
        help="keep trying to connect this long (the guest may be booting)",
    )
    ap.add_argument(
        "--write-every",
        type=float,
        default=0.0,
        metavar="S",
        help="send `write K` this often (a guest with a disk); read the journal back at the end",
    )
    ap.add_argument("--gaps-over", type=float, default=0.0, metavar="S",
                    help="log every silence longer than S (event `silence`; 0: none)")
    ap.add_argument("--log", required=True, help="JSON lines of events")
    args = ap.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    with open(args.log, "a") as log:
        return run(host, int(port), args.echo_every, args.connect_for, log, args.write_every,
                   args.gaps_over)


if __name__ == "__main__":
    sys.exit(main())
