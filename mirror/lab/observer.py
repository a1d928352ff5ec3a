"""An external observer of the guest's outputs: a TCP server reading ``<seq> <payload>`` lines.

It is what a client of the VM sees.  It records every output with the time
it arrived and counts gaps and duplicates across all connections (a new
primary after a failover connects anew).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

# Every port an observer or free_ports() of this process has had.  Linux's bind to port 0
# hands the same port out again as soon as it is free (seen: the observers of two
# consecutive tests on one port), and whatever still knows an old port (a host, a stale
# connection, a retrying client of an earlier test) then reaches the new owner.  A rig
# never hands a port out twice: see fresh_sockets.
_handed_out: set[int] = set()
_handed_lock = threading.Lock()


def fresh_sockets(n: int, host: str = "127.0.0.1", *, listen: bool = False) -> list[socket.socket]:
    """``n`` TCP sockets bound on ``host`` to ports this process never had before
    (listening if ``listen``).  A port handed out before is held while the next is
    picked, so the kernel cannot offer it again."""
    picked: list[socket.socket] = []
    again: list[socket.socket] = []
    with _handed_lock:
        try:
            while len(picked) < n:
                s = socket.socket()
                try:
                    if listen:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, 0))
                    if listen:
                        s.listen()
                except OSError as e:
                    s.close()
                    raise OSError(
                        e.errno, f"no free port on {host} this process has not had before: {e}"
                    ) from e
                (again if s.getsockname()[1] in _handed_out else picked).append(s)
        except BaseException:
            for s in picked:
                s.close()
            raise
        finally:
            for s in again:
                s.close()
        _handed_out.update(s.getsockname()[1] for s in picked)
    return picked


@dataclass
class Seen:
    outputs: list[tuple[int, bytes, float]] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # the connection each output came on
    malformed: int = 0

    def interleaved(self) -> bool:
        """Whether an older connection delivered anything after a newer one began."""
        newest = -1
        for src in self.sources:
            if src < newest:
                return True
            newest = max(newest, src)
        return False

    @property
    def seqs(self) -> list[int]:
        return [s for s, _, _ in self.outputs]

    def gaps(self) -> int:
        seqs = sorted(set(self.seqs))
        if not seqs:
            return 0
        return (seqs[-1] - seqs[0] + 1) - len(seqs) + (seqs[0] - 1)

    def duplicates(self) -> int:
        return len(self.seqs) - len(set(self.seqs))


class Observer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # port 0: a port no earlier observer of this process listened on (fresh_sockets)
        self.server = (
            socket.create_server((host, port)) if port else fresh_sockets(1, host, listen=True)[0]
        )
        self.address = self.server.getsockname()[:2]
        self.seen = Seen()
        # (peer address, the position answered) of every connection accepted
        self.accepted: list[tuple[tuple[str, int], int]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    @property
    def port(self) -> int:
        return int(self.address[1])

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, peer = self.server.accept()
            except OSError:
                return
            with self._lock:
                last = max(self.seen.seqs, default=0)
                source = len(self._threads)
                self.accepted.append((peer[:2], last))
            try:
                conn.sendall(b"at %d\n" % last)  # where this observer is: see ObserverSink
            except OSError:
                conn.close()
                continue
            t = threading.Thread(target=self._read, args=(conn, source), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, conn: socket.socket, source: int) -> None:
        buf = b""
        with conn:
            while chunk := conn.recv(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = time.monotonic()
                with self._lock:
                    for line in lines:
                        seq, _, payload = line.partition(b" ")
                        if seq.isdigit():
                            self.seen.outputs.append((int(seq), payload, now))
                            self.seen.sources.append(source)
                        else:
                            self.seen.malformed += 1

    def count(self) -> int:
        with self._lock:
            return len(self.seen.outputs)

    def snapshot(self) -> list[tuple[int, bytes, float]]:
        with self._lock:
            return list(self.seen.outputs)

    def close(self) -> None:
        self._closing = True
        # shutdown first: a close() alone leaves the socket listening while the accept
        # thread is blocked in accept(), and it would answer one more connection with
        # this (stale) observer's position
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._accept.join(5)
