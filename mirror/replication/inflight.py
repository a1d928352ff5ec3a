"""The engine's send/ack bookkeeping: one pairing's session with the standby.

The HELLO that opens a session; every PAGES message sent under the session's next send
number; what is in flight (sent, not yet acknowledged); acks, which release the outputs
of the epochs they cover (the output commit) and tell the disk server what the standby
committed; rejects and stalls, answered by sending what is in flight again.  Also the
engine's figures (CheckpointRecord, Stats) and the reused send buffers.

:class:`InFlight` is the state and methods of this part of
:class:`mirror.replication.checkpoint.CheckpointEngine` (its base class): the pause path
and the pre-copy send through :meth:`InFlight.send_pages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import secrets
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mirror.guests.base import Guest
from mirror.hoststate import percentile
from mirror.replication import pagecrypt, wire
from mirror.replication import pagediff as pd
from mirror.replication.disk import DiskError, replicated
from mirror.replication.keys import fingerprint as key_fingerprint
from mirror.replication.link import Link, LinkDown
from mirror.replication.metrics import Metrics
from mirror.replication.outputs import OutputBuffer
from mirror.replication.throttle import Capacity

log = logging.getLogger("mirror.replication.checkpoint")  # the engine's one log
RESEND_AFTER_S = 2.0  # no ack for that long: the checkpoints in flight go again
RESEND_MAX_S = 32.0  # each stall resend doubles the wait, up to this, until an ack
RECENT = 10_000  # checkpoints kept for percentiles (about 8 minutes at 50 ms)
PS = pd.PAGE_SIZE


def event(name: str, **fields: Any) -> None:
    """A structured event (the roles' format: one JSON object on one log line)."""
    log.warning("%s", json.dumps({"event": name, **fields}, default=str))


class ReplicationError(RuntimeError):
    """The standby refused the pair or could not be reached."""


class PairingStopped(ReplicationError):
    """The role was asked to stop (SIGTERM) before a standby answered its HELLO."""


@dataclass
class CheckpointRecord:
    epoch: int
    stop_ms: float
    scan_ms: float
    gather_ms: float
    state_ms: float
    resume_ms: float
    pause_ms: float
    pages: int
    bytes_sent: int
    outputs: int
    sent_at: float = 0.0
    ack_ms: float | None = None
    in_flight_bytes: int = 0  # after it was sent: its bytes and those still unacknowledged
    throttle_level: float = 0.0  # the throttle's level decided after it (0: full speed)
    # sent early, while the guest ran the epoch (checkpoint.early_send): its early parts,
    # their pages and bytes (in bytes_sent too), and the time they took (off the pause)
    early_parts: int = 0
    early_pages: int = 0
    early_bytes: int = 0
    early_ms: float = 0.0
    early_at: float = 0.0  # when (monotonic) its first early part was sent (0: none)


@dataclass
class Stats:
    """Counts since the start, and the recent checkpoints for percentiles and rates:
    a role runs for months, and its status is summarised every half second."""

    started: float = field(default_factory=time.monotonic)
    precopy_s: float = 0.0
    precopy_pages: int = 0
    records: deque[CheckpointRecord] = field(default_factory=lambda: deque(maxlen=RECENT))
    taken: int = 0
    acked: int = 0
    bytes_sent: int = 0
    rejects: int = 0
    scan: str = ""  # the dirty-page scan in use: log, hashed or exact
    scan_note: str = ""  # why it is not the one asked for (auto without the log)
    log_losses: int = 0  # times the dirty-page log was lost (a full hashed scan each)
    log_missed_pages: int = 0  # pages the safety net found changed but not logged
    ram_discards: int = 0  # times the guest's RAM was discarded (a balloon): a full compare
    ram_discarded_pages: int = 0  # holes the safety net found where a balloon punches them
    verified_pages: int = 0  # pages the safety net compared with the standby's table
    precopy_rounds: int = 0
    early_sends: int = 0  # early parts sent (checkpoint.early_send)
    early_skipped: int = 0  # early sends skipped: the window full, or too few dirty pages

    def add(self, rec: CheckpointRecord) -> None:
        self.records.append(rec)
        self.taken += 1
        self.bytes_sent += rec.bytes_sent

    def summary(self, outputs: OutputBuffer) -> dict[str, Any]:
        recs = list(self.records)
        pauses = [r.pause_ms for r in recs]
        acked = [r.ack_ms for r in recs if r.ack_ms is not None]
        span = (recs[-1].sent_at - recs[0].sent_at) if len(recs) > 1 else 0.0
        dirty = sum(r.pages for r in recs[1:]) * PS  # recent: the rate now
        lat = [x * 1000 for x in outputs.latencies]

        def split(name: str) -> float:
            return round(percentile([getattr(r, name) for r in recs], 50), 3)

        return {
            "checkpoints": self.taken,
            "acked": self.acked,
            "pause_ms_p50": round(percentile(pauses, 50), 3),
            "pause_ms_p99": round(percentile(pauses, 99), 3),
            "pause_split_ms_p50": {
                k: split(f"{k}_ms") for k in ("stop", "scan", "gather", "state", "resume")
            },
            "ack_ms_p50": round(percentile(acked, 50), 3),
            "dirty_pages_p50": percentile([float(r.pages) for r in recs], 50),
            "dirty_mb_per_s": round(dirty / span / 1e6, 2) if span else 0.0,
            "bytes_sent": self.bytes_sent,
            "output_latency_ms_p50": round(percentile(lat, 50), 3),
            "output_latency_ms_p99": round(percentile(lat, 99), 3),
            "outputs_released": outputs.released,
            "outputs_held": outputs.held,
            "precopy_s": round(self.precopy_s, 3),
            "precopy_pages": self.precopy_pages,
            "precopy_rounds": self.precopy_rounds,
            "rejects": self.rejects,
            "scan": self.scan,
            "scan_note": self.scan_note,
            "log_losses": self.log_losses,
            "log_missed_pages": self.log_missed_pages,
            "ram_discards": self.ram_discards,
            "ram_discarded_pages": self.ram_discarded_pages,
            "verified_pages": self.verified_pages,
            "early_sends": self.early_sends,
            "early_skipped": self.early_skipped,
            "early_pages_p50": percentile([float(r.early_pages) for r in recs], 50),
        }


class SendBuffers:
    """A ring of page-aligned send buffers, reused so that gathering a checkpoint
    does not page-fault a fresh buffer every epoch.

    zmq sends them without copying, so a buffer may be reused only once its
    message has surely left: the ring has one slot more than the messages
    that may await an ack, and a slot comes round again only after the
    message that used it was acknowledged.
    """

    def __init__(
        self, in_flight: int, prepare_max: int = 1 << 30, max_pages: int = 1 << 40
    ) -> None:
        self._slots: list[mmap.mmap | None] = [None] * (in_flight + 1)
        self.prepare_max = prepare_max  # pages: prepare() never faults in more
        # pages: no buffer is ever larger (a checkpoint never holds more pages than the
        # guest has), so the ring holds at most (in_flight + 1) x max_pages, whatever
        # the guest's dirty rate
        self.max_pages = max_pages

    @property
    def cap_bytes(self) -> int:
        """The most the ring can ever hold."""
        return len(self._slots) * self.max_pages * PS

    @property
    def held_bytes(self) -> int:
        """What the ring holds now."""
        return sum(len(b) for b in self._slots if b is not None and not b.closed)

    def get(self, seq: int, npages: int) -> mmap.mmap:
        slot = seq % len(self._slots)
        buf = self._slots[slot]
        if buf is None or len(buf) < npages * PS:
            if buf is not None:
                _drop(buf)
            # room to grow, never past the cap
            buf = pd.alloc_pages(max(1, min(npages + npages // 4, self.max_pages)))
            self._slots[slot] = buf
        return buf

    def prepare(self, seq: int, npages: int) -> None:
        """Off the pause: make the buffer that message ``seq`` will use hold ``npages``
        pages with room to grow, its memory faulted in now, so that the gather inside
        the next pause is a plain copy (a freshly grown buffer faults on every page:
        at 16k dirty pages that was 69 of a 77 ms pause).  The slot's previous message
        is acknowledged by the time ``seq - 1`` is sent (see the class docstring)."""
        slot = seq % len(self._slots)
        buf = self._slots[slot]
        want = min(npages + npages // 4, self.prepare_max, self.max_pages)
        if buf is not None and len(buf) >= want * PS:
            return
        if buf is not None:
            _drop(buf)
        buf = pd.alloc_pages(max(1, want))
        _populate(buf)
        self._slots[slot] = buf


def _drop(buf: mmap.mmap) -> None:
    """Unmap a buffer now, or, while zmq still holds a view of an acknowledged
    message's frame (it frees it a little later, on its own thread), when the last
    view goes."""
    with contextlib.suppress(BufferError):
        buf.close()


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; the mmap module does not name it


def _populate(buf: mmap.mmap) -> None:
    """Fault every page of ``buf`` in (writable), as a first write would."""
    try:
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # an older kernel: touch one byte per page
        view = memoryview(buf)
        view[::PS] = bytes(len(buf) // PS)
        view.release()


class InFlight:
    """One pairing's session with the standby, seen from the primary: what was sent,
    what is in flight, what was acknowledged (and so released)."""

    def __init__(
        self,
        guest: Guest,
        link: Link,
        outputs: OutputBuffer,
        *,
        pair: str,
        generation: int,
        node: str,
        fingerprint: str,
    ) -> None:
        self.guest, self.link, self.outputs = guest, link, outputs
        self.fingerprint = fingerprint
        self.pair, self.generation, self.node = pair, generation, node
        self.stats = Stats()
        self.acked = 0
        self.sent_epoch = 0  # the highest checkpoint sent: no ack above it is believed
        self.bogus_acks = 0  # acks of checkpoints never sent (refused, see on_reply)
        self.in_flight: dict[int, tuple[wire.Pages, CheckpointRecord]] = {}
        # the early parts of checkpoints not yet acknowledged (those of the running epoch
        # included): sent again, before their final part, by a resend
        self.early_parts: dict[int, list[wire.Pages]] = {}
        self.session = 0  # this pairing's session (0: not paired)
        self._seq = 0  # PAGES messages sent in this session, resends included
        self._resent_at_seq = 0  # the first send number of the last resend
        self._resent_at = 0.0  # when (monotonic)
        self._resend_wait = RESEND_AFTER_S  # no ack for this long: resend (see _check_stalled)
        self.metrics = Metrics.of(pair, node)
        outputs.metrics = self.metrics
        self.capacity = Capacity()  # the pair's, measured from the acks

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of the checkpoints sent and not yet acknowledged."""
        return sum(rec.bytes_sent for _, rec in self.in_flight.values())

    def handshake(self, timeout: float = 30.0, stop: threading.Event | None = None) -> int:
        """HELLO (a new session) until its WELCOME; returns the standby's committed epoch.
        Answers to anything else (an earlier HELLO, an earlier session) are skipped.
        ReplicationError after ``timeout`` seconds without one (saying whether the
        peer's CURVE handshake failed: a listener without keys or with another key);
        PairingStopped as soon as ``stop`` is set.  No send blocks: a connection whose
        handshake failed is made again for the next HELLO."""
        session = secrets.randbits(63) or 1
        hello = wire.Hello(
            self.pair, self.generation, self.node, len(self.guest.ram), session, self.fingerprint
        )
        deadline = time.monotonic() + timeout
        failed_before = self.link.handshake_failures
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                raise PairingStopped("stopped before a standby answered")
            if self.link.handshake_failed():
                self.link.reconnect()
            try:
                self.link.send(hello)
            except LinkDown:
                self.link.reconnect()
            until = min(deadline, time.monotonic() + 1.0)
            while (left := until - time.monotonic()) > 0:
                if stop is not None and stop.is_set():
                    raise PairingStopped("stopped before a standby answered")
                reply = self.recv(min(left, 0.2))
                if getattr(reply, "session", None) != session:
                    continue  # nothing, or the answer to something else
                if isinstance(reply, wire.Welcome):
                    log.info(
                        "paired with %s (generation %d), its committed epoch %d",
                        reply.node,
                        reply.generation,
                        reply.committed,
                    )
                    self.session = session
                    self._seq = self._resent_at_seq = 0
                    self.link.session[0] = session
                    keys = self.link.keys  # with keys, PAGES go sealed (pagecrypt), off CURVE
                    self.link.seal_pages(
                        reply.bulk_port,
                        pagecrypt.page_key(keys, self.pair, self.generation, session)
                        if keys is not None and reply.bulk_port
                        else None,
                    )
                    return reply.committed
                if isinstance(reply, wire.Reject) and reply.answers == wire.Kind.HELLO:
                    raise ReplicationError(
                        f"the standby refused this primary (pair {self.pair!r}, generation "
                        f"{self.generation}, {len(self.guest.ram) >> 20} MiB, guest "
                        f"{self.fingerprint!r}): {reply.reason}; the standby's log says why"
                    )
        self.link.handshake_failed()  # count the last ones
        where = f"{self.link.endpoint.host}:{self.link.endpoint.data_port}"
        failed = self.link.handshake_failures - failed_before
        if failed:
            mine = key_fingerprint(self.link.keys.public) if self.link.keys else "none"
            raise ReplicationError(
                f"no standby at {where} completed a CURVE handshake with this host in "
                f"{timeout:g} s ({failed} attempts failed): what listens there has no keys "
                f"(a peer with insecure = true, or another program) or is not the standby "
                f"whose public key is [keys] peer_public_key here, or it does not admit "
                f"this host's key (fingerprint {mine}); check [keys] "
                f"on both hosts"
            )
        raise ReplicationError(
            f"no answer from the standby at {where} in {timeout:g} s (is it running? do its "
            f"[keys] admit this host's key, and is peer_public_key here its key? its log "
            f"says so if not)"
        )

    def recv(self, timeout: float) -> wire.Message | None:
        try:
            return self.link.recv(timeout)
        except wire.WireError as e:
            log.error("malformed frame from the standby ignored: %s", e)
            self.metrics.rejected("data")
            return None

    def send_pages(self, msg: wire.Pages, *, corrupt: bool = False) -> None:
        """Send ``msg`` in this session under the next send number (``corrupt``: the
        ``MIRROR_FAULT=corrupt`` test fault, a frame damaged on the wire)."""
        self._seq += 1
        send = self.link.send_corrupted if corrupt else self.link.send
        try:
            send(replace(msg, session=self.session, seq=self._seq))
        except LinkDown as e:  # not sent: still in flight, sent again (see _check_stalled)
            self.link.handshake_failed()
            event("send-failed", checkpoint=msg.epoch, part=msg.part, reason=str(e))
            self.link.reconnect()
    def on_reply(self, reply: wire.Message) -> None:
        """Act on the standby's answer.  Nothing it says stops this primary: a REJECT of a
        checkpoint is answered by sending the checkpoints in flight again."""
        if getattr(reply, "session", None) != self.session:
            log.debug("answer of another session ignored: %s", reply)
            return
        if isinstance(reply, wire.Ack) and reply.epoch > self.sent_epoch:
            # no standby can hold a checkpoint this primary never sent: believing it would
            # release the outputs of epochs nobody holds (a faulty or hostile peer)
            self.bogus_acks += 1
            self.metrics.rejected("data")
            if self.bogus_acks == 1 or self.bogus_acks % 1000 == 0:
                event("ack-refused", checkpoint=reply.epoch, sent=self.sent_epoch,
                       refused=self.bogus_acks, note="an ack of a checkpoint never sent: "
                       "nothing released")  # fmt: skip
            return
        if isinstance(reply, wire.Ack) and reply.epoch > self.acked:
            now = time.monotonic()
            covered = sorted(e for e in self.in_flight if e <= reply.epoch)
            if covered:
                first = self.in_flight[covered[0]][1]  # its early parts were on the link first
                self.capacity.acked(
                    sum(self.in_flight[e][1].bytes_sent for e in covered),
                    first.early_at or first.sent_at,
                    now,
                )
            for e in covered:
                _, rec = self.in_flight.pop(e)
                rec.ack_ms = (now - rec.sent_at) * 1000
                self.stats.acked += 1
                self.metrics.acked.inc()
                self.metrics.ack_latency.observe(rec.ack_ms / 1000)
            for e in [e for e in self.early_parts if e <= reply.epoch]:
                del self.early_parts[e]
            self.acked = reply.epoch
            self._resend_wait = RESEND_AFTER_S
            self.outputs.release_through(reply.epoch)
            if self.guest.disk is not None:  # what a resync of the standby's disk would send
                try:
                    replicated(self.guest.disk).committed(reply.epoch)
                except DiskError as e:
                    log.warning("the disk server did not take commit %d: %s", reply.epoch, e)
            self.link.committed[0] = reply.epoch  # our heartbeats tell the standby
        elif (
            isinstance(reply, wire.Reject)
            and reply.answers == wire.Kind.PAGES
            and reply.epoch > self.acked
            and reply.seq >= self._resent_at_seq  # not about a sending already superseded
        ):
            self.stats.rejects += 1
            log.error(
                "the standby rejected checkpoint %d: %s; sending checkpoints %s again",
                reply.epoch,
                reply.reason,
                sorted(self.in_flight),
            )
            self.resend()

    def resend(self) -> None:
        """Send every checkpoint in flight again, in order, under new send numbers (each
        with its early parts, from part 0; the running epoch's early parts too): the
        standby acks again those it holds and takes the rest in order."""
        self._resent_at_seq = self._seq + 1
        self._resent_at = time.monotonic()
        for e in sorted(self.in_flight.keys() | self.early_parts.keys()):
            for part in self.early_parts.get(e, ()):  # early parts first, in order
                self.send_pages(part)
            if e in self.in_flight:
                self.send_pages(self.in_flight[e][0])

    def _check_stalled(self) -> None:
        """No ack for the oldest checkpoint in flight for a while (a message lost on a
        reconnect, or dropped by the standby as malformed): send them again.  The wait
        doubles with each such resend until an ack comes: a standby that is only slow
        (a large dirty set on a loaded host) would otherwise get every checkpoint again
        every 2 s, queued behind the ones it is still reading, and never catch up."""
        if not self.in_flight:
            return
        now = time.monotonic()
        oldest = self.in_flight[min(self.in_flight)][1].sent_at
        if now - max(oldest, self._resent_at) > self._resend_wait:
            log.warning(
                "no ack for checkpoint %d in %.1f s: sending checkpoints %s again",
                min(self.in_flight),
                now - oldest,
                sorted(self.in_flight),
            )
            self.resend()
            self._resend_wait = min(2 * self._resend_wait, RESEND_MAX_S)

    def pump(self, until: float) -> None:
        """Handle replies until the monotonic time ``until``."""
        while True:
            left = until - time.monotonic()
            reply = self.recv(max(0.0, left))
            if reply is not None:
                self.on_reply(reply)
            if left <= 0:
                return
    def records_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.stats.records]
