"""Output commit: the guest's outputs held per epoch until their checkpoint is acknowledged.

Rule 1 of docs/ARCHITECTURE.md: whatever the guest emits during epoch N
stays here until the secondary acknowledges checkpoint N; then it is
released, in order, to the sink (the outside world).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mirror.guests.base import GuestOutput

if TYPE_CHECKING:
    from mirror.replication.metrics import Metrics

Sink = Callable[[list[GuestOutput]], None]


class OutputBuffer:
    """Epoch-tagged outputs; thread-safe (the guest's reader thread adds)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        # held across every call of the sink: outputs reach it in order, also when the
        # guest's thread releases a new output while older held ones are being released
        self._releasing = threading.Lock()
        self._held: deque[tuple[int, GuestOutput]] = deque()
        self.epoch = 1  # the epoch now running: outputs added now belong to it
        self.released = 0
        # seconds from produced to released, of the recent outputs made after the
        # first checkpoint (those made during the pre-copy wait for it by design)
        self.latencies: deque[float] = deque(maxlen=100_000)
        self.unprotected = False
        # a running domain paired as it runs (`mirror pair --live`): its outputs pass as they
        # come until the first checkpoint's pause (nothing protects them before it, as
        # nothing did before pairing; that checkpoint holds the state that made them)
        self.passing = False
        self.metrics: Metrics | None = None  # the epoch engine's: hold times observed

    def add(self, output: GuestOutput) -> None:
        with self._lock:
            if not self.unprotected and not self.passing:
                self._held.append((self.epoch, output))
                return
        with self._releasing:
            self._sink([output])
            self.released += 1

    def go_unprotected(self) -> int:
        """No standby any more (a won "unprotected" claim): release everything held,
        and from now on release each output as it comes.  Returns how many were held."""
        with self._releasing:  # first: a new output must wait for the held ones
            with self._lock:
                self.unprotected = True
                held = [o for _, o in self._held]
                self._held.clear()
            if held:
                self._sink(held)
                self.released += len(held)
        return len(held)

    def hold(self) -> None:
        """From now on every output waits for its checkpoint (the end of ``passing``)."""
        with self._releasing, self._lock:
            self.passing = False

    def close_epoch(self) -> list[tuple[int, bytes]]:
        """End the running epoch (guest paused); returns its outputs, which ride
        in the checkpoint so that a promoted standby knows them."""
        with self._lock:
            ended = self.epoch
            self.epoch += 1
            return [(o.seq, o.payload) for e, o in self._held if e == ended]

    def release_through(self, epoch: int) -> int:
        """Release every output of epochs <= ``epoch`` to the sink; returns how many.
        An epoch not yet ended (so in no checkpoint) is refused: ValueError, nothing
        released."""
        out: list[tuple[int, GuestOutput]] = []
        with self._releasing:
            with self._lock:
                if epoch >= self.epoch and not self.unprotected:
                    raise ValueError(
                        f"cannot release the outputs of epoch {epoch}: it has not ended "
                        f"(the running epoch is {self.epoch}), so no checkpoint holds it"
                    )
                while self._held and self._held[0][0] <= epoch:
                    out.append(self._held.popleft())
            if out:
                self._sink([o for _, o in out])
                now = time.monotonic()
                held = [now - o.produced_at for e, o in out if e > 1]
                self.latencies.extend(held)
                if self.metrics is not None:
                    for h in held:
                        self.metrics.output_hold.observe(h)
                self.released += len(out)
        return len(out)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)


class ObserverSink:
    """Sends released outputs to a TCP endpoint, one line per output: ``<seq> <payload>``.

    An observer may first send one line ``at <seq>``: the last output it holds.
    A promoted standby uses it to release exactly the committed outputs the
    observer lacks, as a TCP receiver's acknowledgements let a resumed sender
    go on without loss or repetition; an endpoint that says nothing gets
    at-least-once delivery across a failover (see docs/failover.md).
    """

    def __init__(self, host: str, port: int, *, connect_timeout: float = 10.0) -> None:
        self.address = (host, port)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock = socket.create_connection(self.address, timeout=5)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"cannot reach the observer at {host}:{port}: {e.strerror or e}"
                    ) from e
                time.sleep(0.1)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # this end's port: with it, an observer's log tells which connection was ours
        self.local_port: int = self._sock.getsockname()[1]
        self.position = self._read_position()
        self._sock.settimeout(10)

    def _read_position(self, wait: float = 0.3) -> int | None:
        self._sock.settimeout(wait)
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = self._sock.recv(1)
                if not chunk:
                    break
                line += chunk
        except TimeoutError:
            return None
        word, _, seq = line.strip().partition(b" ")
        return int(seq) if word == b"at" and seq.isdigit() else None

    def __call__(self, outputs: list[GuestOutput]) -> None:
        self._sock.sendall(b"".join(b"%d %s\n" % (o.seq, o.payload) for o in outputs))

    def close(self) -> None:
        self._sock.close()
