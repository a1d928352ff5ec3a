"""The primary's epoch engine: pre-copy, then a checkpoint every epoch, outputs released on ack.

One checkpoint (docs/ARCHITECTURE.md, "the checkpoint epoch"):

    pause guest -> scan RAM -> [gather] -> save device state -> resume
                -> (guest runs epoch N+1) gather from the shadow, checksums, send N
    ... ack N -> release the outputs of epochs <= N

Which pages changed comes from one of three scans (``checkpoint.scan``; ``auto``
takes the log where the kernel has it, else the hashed scan):

- the dirty-page log (mirror/replication/dirtylog.py): the kernel lists the pages
  the guest wrote; no pass over RAM.  Pages are gathered from RAM in the pause;
  after the resume the hash table is set to what was sent, so a lost log can fall
  back to a full hashed scan for one checkpoint, and a rotating slice of RAM is
  checked against the table (the safety net: a page the log missed is sent with
  the next checkpoint, counted and raised as an event);
- the exact scan copies each dirty page into the shadow while the guest is
  paused, so the pause is the scan plus a memcpy of the dirty bytes, and the send
  buffer is gathered from the shadow after the guest runs again;
- the hashed scan has no shadow: it gathers from RAM inside the pause.

Delta encoding compares against the shadow inside the pause.  At most
``max_in_flight`` checkpoints wait for their ack; when the window is full
the epoch stretches until an ack comes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import secrets
import signal
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mirror.config import CheckpointConfig
from mirror.guests.base import Guest
from mirror.hoststate import percentile
from mirror.replication import dirtylog, wire
from mirror.replication import pagediff as pd
from mirror.replication.disk import DiskError, ReplicatedDisk, replicated, session_key
from mirror.replication.keys import LinkKeys
from mirror.replication.keys import fingerprint as key_fingerprint
from mirror.replication.link import Link, LinkDown
from mirror.replication.metrics import Metrics
from mirror.replication.outputs import OutputBuffer

log = logging.getLogger("mirror.replication.checkpoint")
RESEND_AFTER_S = 2.0  # no ack for that long: the checkpoints in flight go again
RESEND_MAX_S = 32.0  # each stall resend doubles the wait, up to this, until an ack
RECENT = 10_000  # checkpoints kept for percentiles (about 8 minutes at 50 ms)
PS = pd.PAGE_SIZE
PRECOPY_ROUNDS = 12  # log-driven pre-copy: at most this many rounds after the first


def _event(name: str, **fields: Any) -> None:
    """A structured event (the agent's format: one JSON object on one log line)."""
    log.warning("%s", json.dumps({"event": name, **fields}, default=str))


def _fault_point() -> tuple[str, int, float] | None:
    """A testing hook: MIRROR_FAULT=POINT:EPOCH[:DELAY_MS] makes the primary host die
    (SIGKILL to its own process group) at that point of that checkpoint, DELAY_MS
    later, so that chaos tests hit moments random timing rarely does.  Points:
    "in-pause" (guest stopped, nothing sent), "after-send" (the checkpoint handed
    to zmq; with a delay, on the wire or being applied by the standby).  And
    "corrupt" (no kill): that checkpoint's first sending has one bit of its page
    data flipped, as a bad link would; the standby must reject it and the primary
    send it again, intact.  "lose-log" (no kill): just before that checkpoint the
    dirty-page log's userfaultfd is closed, as a lost registration would be."""
    spec = os.environ.get("MIRROR_FAULT")
    if not spec:
        return None
    point, epoch, *delay = spec.split(":")
    try:
        if point not in ("in-pause", "after-send", "corrupt", "lose-log") or len(delay) > 1:
            raise ValueError
        return point, int(epoch), float(delay[0]) if delay else 0.0
    except ValueError:
        raise ValueError(
            f"MIRROR_FAULT must be in-pause|after-send|corrupt|lose-log:EPOCH[:DELAY_MS], "
            f"got {spec!r}"
        ) from None


def _fault(fault: tuple[str, int, float] | None, point: str, epoch: int) -> None:
    if fault is None or fault[:2] != (point, epoch):
        return
    time.sleep(fault[2] / 1000)
    log.warning("MIRROR_FAULT: killing this host at %s of checkpoint %d", point, epoch)
    os.killpg(os.getpgrp(), signal.SIGKILL)


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


@dataclass
class Progress:
    done_pages: int
    total_pages: int
    round: int = 0  # log-driven pre-copy: 0 sends all of RAM, then what was written meanwhile


@dataclass
class Stats:
    """Counts since the start, and the recent checkpoints for percentiles and rates:
    an agent runs for months, and its status is summarised every half second."""

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
        }


class SendBuffers:
    """A ring of page-aligned send buffers, reused so that gathering a checkpoint
    does not page-fault a fresh buffer every epoch.

    zmq sends them without copying, so a buffer may be reused only once its
    message has surely left: the ring has one slot more than the messages
    that may await an ack, and a slot comes round again only after the
    message that used it was acknowledged.
    """

    def __init__(self, in_flight: int, prepare_max: int = 1 << 30) -> None:
        self._slots: list[mmap.mmap | None] = [None] * (in_flight + 1)
        self.prepare_max = prepare_max  # pages: prepare() never faults in more

    def get(self, seq: int, npages: int) -> mmap.mmap:
        slot = seq % len(self._slots)
        buf = self._slots[slot]
        if buf is None or len(buf) < npages * PS:
            if buf is not None:
                _drop(buf)
            buf = pd.alloc_pages(max(1, npages + npages // 4))  # room to grow
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
        want = min(npages + npages // 4, self.prepare_max)
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


class _PartSender:
    """Pre-copy parts sent with at most a window of them awaiting the standby's ack."""

    def __init__(self, engine: CheckpointEngine, progress: Callable[[Progress], None] | None):
        self.engine, self.progress = engine, progress
        self.window = max(2, engine.cfg.max_in_flight)
        self.buffers = SendBuffers(self.window)
        self.sent = self.acked = self.pages = self.total = self.done = self.round = 0
        self.sizes: dict[int, int] = {}

    def buffer(self, npages: int) -> mmap.mmap:
        return self.buffers.get(self.sent, npages)

    def send(self, batch: pd.EncodedPages, *, final: bool) -> None:
        self.engine.send_pages(wire.Pages.of(0, batch, part=self.sent, final=final))
        self.engine.metrics.replicated.inc(len(batch.data))
        self.sizes[self.sent] = len(batch.index)
        self.sent += 1
        self.pages += len(batch.index)
        self._wait(self.window - 1)

    def finish(self) -> None:
        self._wait(0)

    def _wait(self, allowed: int) -> None:
        while self.sent - self.acked > allowed:
            reply = self.engine._recv(10.0)
            if reply is None:
                raise ReplicationError("the standby stopped answering during pre-copy")
            if getattr(reply, "session", None) != self.engine.session:
                continue  # not of this session: a stale answer
            if isinstance(reply, wire.Reject) and reply.answers == wire.Kind.PAGES:
                raise ReplicationError(
                    f"the standby rejected pre-copy part {reply.part}: {reply.reason}"
                )
            if isinstance(reply, wire.Ack) and reply.epoch == 0:
                self.done += self.sizes.pop(self.acked, 0)
                self.acked += 1
                if self.progress:
                    self.progress(Progress(self.done, max(self.total, self.done), self.round))


class CheckpointEngine:
    def __init__(
        self,
        guest: Guest,
        link: Link,
        cfg: CheckpointConfig,
        outputs: OutputBuffer,
        *,
        pair: str,
        generation: int,
        node: str,
        fingerprint: str = "synthetic",
    ) -> None:
        self.guest, self.link, self.cfg, self.outputs = guest, link, cfg, outputs
        self.fingerprint = fingerprint
        self.pair, self.generation, self.node = pair, generation, node
        self.npages = len(guest.ram) // PS
        self.stats = Stats()
        self.method = self._choose_scan()
        self.exact = self.method == "exact"
        self.shadow = pd.alloc_pages(self.npages) if self.exact or cfg.encoding == "delta" else None
        self.table = bytearray(pd.hash_table_size(len(guest.ram))) if not self.exact else None
        self.log: dirtylog.DirtyLog | None = None
        # "ok": the log lists the dirty pages; "lost": the next checkpoint scans all of
        # RAM and the log is set up again after it; "fresh": set up again after the
        # guest resumed, so the next checkpoint still scans all of RAM (writes between
        # the resume and the new protection are not in it).
        self.log_state = "ok"
        self._pending: set[int] = set()  # pages to send with the next checkpoint (safety net)
        self._verify_next = 0  # the safety net's next slice
        self.epoch = 0  # last checkpoint taken
        self.acked = 0
        self.sent_epoch = 0  # the highest checkpoint sent: no ack above it is believed
        self.bogus_acks = 0  # acks of checkpoints never sent (refused, see on_reply)
        self.in_flight: dict[int, tuple[wire.Pages, CheckpointRecord]] = {}
        # a dirty set that outgrows a 16th of RAM is a guest writing faster than the
        # pair replicates: no point holding (N+1) buffers that large in memory
        self._buffers = SendBuffers(cfg.max_in_flight, prepare_max=max(1, self.npages // 16))
        self._fault = _fault_point()
        self.session = 0  # this pairing's session (0: not paired)
        self._seq = 0  # PAGES messages sent in this session, resends included
        self._resent_at_seq = 0  # the first send number of the last resend
        self._resent_at = 0.0  # when (monotonic)
        self._resend_wait = RESEND_AFTER_S  # no ack for this long: resend (see _check_stalled)
        self.metrics = Metrics.of(pair, node)
        outputs.metrics = self.metrics
        # the disk's stream to the standby ended (why, when): no checkpoints any more
        self.disk_lost: tuple[str, float] | None = None

    # -- the dirty-page scan ------------------------------------------------------

    def _choose_scan(self) -> str:
        """``checkpoint.scan`` resolved: ``auto`` is the log where it can be kept for
        this guest on this kernel, else hashed (the reason goes in the status)."""
        want = self.cfg.scan
        if want in ("exact", "hashed"):
            self.stats.scan = want
            return want
        reason = dirtylog.probe()
        if reason is None and self.guest.log_source() is None:
            reason = f"the {self.guest.kind} guest was not started with the preload library"
        if reason is None:
            blockers = self.guest.log_blockers()
            if blockers:
                reason = "the guest has what the log cannot see: " + "; ".join(blockers)
        if reason is None:
            self.stats.scan = "log"
            return "log"
        return self._without_log(reason)

    def _without_log(self, reason: str) -> str:
        if self.cfg.scan == "log":
            raise ReplicationError(f'checkpoint.scan = "log" cannot be used: {reason}')
        log.warning('checkpoint.scan = "auto": the hashed scan, as %s', reason)
        self.stats.scan, self.stats.scan_note = "hashed", f"no dirty-page log: {reason}"
        return "hashed"

    def _open_log(self) -> bool:
        """Set the log up (its first scan write-protects all of RAM); False if it cannot."""
        self.close_log()
        try:
            self.log = dirtylog.DirtyLog(self.guest)
        except dirtylog.DirtyLogError as e:
            if self.log_state == "ok":  # at the start: the choice falls to hashed
                self.method = self._without_log(str(e))
            else:
                log.warning("the dirty-page log could not be set up again: %s", e)
            return False
        return True

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def close(self) -> None:
        """Release what the engine holds in the guest (the log's registration)."""
        self.close_log()

    # -- session ---------------------------------------------------------------

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
                reply = self._recv(min(left, 0.2))
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

    def _recv(self, timeout: float) -> wire.Message | None:
        try:
            return self.link.recv(timeout)
        except wire.WireError as e:
            log.error("malformed frame from the standby ignored: %s", e)
            self.metrics.rejected("data")
            return None

    # -- pre-copy -------------------------------------------------------------

    def precopy(self, progress: Callable[[Progress], None] | None = None) -> None:
        """Copy all of RAM to the standby while the guest runs (with the log: then, in
        rounds, what was written meanwhile, until what is left is small)."""
        t0 = time.monotonic()
        if self.method == "log":
            self.log_state = "ok"
            self._open_log()  # before the first copy: every later write is logged
        sender = _PartSender(self, progress)
        if self.method == "log":
            self._precopy_rounds(sender)
        else:
            self._precopy_once(sender)
        sender.finish()
        self.stats.precopy_s = time.monotonic() - t0
        self.stats.precopy_pages = sender.pages

    def _precopy_once(self, sender: _PartSender) -> None:
        ram = self.guest.ram
        chunk = max(1, (self.cfg.precopy_chunk_mib << 20) // PS)
        if self.exact:
            assert self.shadow is not None
            pd.scan_exact(ram, self.shadow, threads=self.cfg.threads)  # shadow := RAM, live
        # The hashed scan's table must hold the hashes of exactly what the standby gets:
        # hashing live RAM and copying it a moment later lets a page that changes and
        # changes back in between (A-B-A) look clean forever.  So each part is copied
        # first (into the shadow, or a scratch buffer) and hashed from that copy.
        scratch = None if self.exact or self.shadow is not None else pd.alloc_pages(chunk)
        parts = [range(s, min(s + chunk, self.npages)) for s in range(0, self.npages, chunk)]
        sender.total = self.npages
        for n, pages in enumerate(parts):
            buf = sender.buffer(len(pages))
            if self.exact:
                assert self.shadow is not None
                batch = pd.gather(self.shadow, pages, out=buf)
            else:
                batch = self._precopy_hashed(pages, scratch, buf)
            sender.send(batch, final=n == len(parts) - 1)

    def _precopy_rounds(self, sender: _PartSender) -> None:
        """Pre-copy driven by the log: all of RAM, then the pages written during the
        previous round, until they are few (or after PRECOPY_ROUNDS rounds); what
        is written after the last round's scan goes with the first checkpoint."""
        assert self.log is not None and self.table is not None
        chunk = max(1, (self.cfg.precopy_chunk_mib << 20) // PS)
        small = max(256, self.npages // 512)
        todo: array[int] | range = range(self.npages)
        sender.total = self.npages
        for rnd in range(PRECOPY_ROUNDS + 1):
            sender.round = rnd
            for a in range(0, len(todo), chunk):
                pages = todo[a : a + chunk]
                batch = pd.gather(self.guest.ram, pages, out=sender.buffer(len(pages)))
                pd.hash_gathered(self.table, batch)  # the table: what the standby holds
                if self.shadow is not None:  # delta encoding: the shadow too
                    pd.apply_encoded(self.shadow, batch)
                last = a + chunk >= len(todo)
                left = len(self.log.written(0, self.npages)) if last else small + 1
                final = last and (left <= small or rnd == PRECOPY_ROUNDS)
                sender.send(batch, final=final)
                if final:
                    self.stats.precopy_rounds = rnd + 1
                    return
            todo = self.log.scan()
            sender.total += len(todo)
            if not todo:  # nothing written during the round: an empty last part
                sender.send(pd.gather(self.guest.ram, [], out=sender.buffer(1)), final=True)
                self.stats.precopy_rounds = rnd + 1
                return

    def _precopy_hashed(
        self, pages: range, scratch: mmap.mmap | None, buf: mmap.mmap
    ) -> pd.EncodedPages:
        """One pre-copy part for the hashed scan: copy, hash the copy, send the copy."""
        assert self.table is not None
        a, b = pages.start * PS, pages.stop * PS
        if scratch is None:  # delta encoding keeps a shadow: the copy goes there
            assert self.shadow is not None
            snap = memoryview(self.shadow)[a:b]
        else:
            snap = memoryview(scratch)[: b - a]
        snap[:] = memoryview(self.guest.ram)[a:b]
        per_page = pd.hash_table_size(PS)
        table = memoryview(self.table)[pages.start * per_page : pages.stop * per_page]
        pd.scan_hashed(snap, table, threads=self.cfg.threads)
        batch = pd.gather(snap, range(len(pages)), out=buf)
        return replace(batch, index=array("I", pages))

    # -- checkpoints ----------------------------------------------------------

    def checkpoint(self, *, resume: bool = True) -> CheckpointRecord:
        """Take and send one checkpoint (the guest is running when called); with
        ``resume=False`` the guest stays paused at it."""
        guest, ram, cfg = self.guest, self.guest.ram, self.cfg
        epoch = self.epoch + 1
        if self._fault is not None and self._fault[:2] == ("lose-log", epoch) and self.log:
            log.warning("MIRROR_FAULT: dropping the dirty-page log before checkpoint %d", epoch)
            self.log.drop()
        t0 = time.perf_counter()
        guest.pause()
        t1 = time.perf_counter()
        buf = None
        logged = False  # the dirty pages came from the log: the table is set after the resume
        if self.exact:
            assert self.shadow is not None
            delta = cfg.encoding == "delta"
            dirty = pd.scan_exact(ram, self.shadow, update_shadow=not delta, threads=cfg.threads)
        elif self.method == "log":
            dirty, logged = self._log_scan(epoch)
        else:
            assert self.table is not None
            dirty = pd.scan_hashed(ram, self.table, threads=cfg.threads)
        t2 = time.perf_counter()
        batch = None
        if cfg.encoding == "delta":
            assert self.shadow is not None
            buf = self._buffers.get(epoch, len(dirty))
            batch = pd.encode_pages(ram, self.shadow, dirty, out=buf)
        elif not self.exact:
            buf = self._buffers.get(epoch, len(dirty))
            batch = pd.gather(ram, dirty, out=buf)
        t3 = time.perf_counter()
        state = guest.save_state()
        outs = self.outputs.close_epoch()
        if guest.disk is not None and not self._disk_barrier(replicated(guest.disk), epoch):
            if resume:  # not sent: no standby can commit it; its outputs stay held
                guest.resume()
            self.epoch = epoch
            return CheckpointRecord(epoch, 0, 0, 0, 0, 0, 0, 0, 0, len(outs))
        _fault(self._fault, "in-pause", epoch)
        t4 = time.perf_counter()
        if resume:
            guest.resume()
        t5 = time.perf_counter()
        # The guest runs again; what follows is off the pause.
        if batch is None:  # exact scan, raw: the shadow holds the checkpoint's pages
            assert self.shadow is not None
            buf = self._buffers.get(epoch, len(dirty))
            batch = pd.gather(self.shadow, dirty, out=buf)
        elif batch.checksums is None:  # delta: the shadow now holds each page's new content
            assert self.shadow is not None
            batch = replace(batch, checksums=pd.checksums(self.shadow, batch.index))
        if logged:  # the table describes what the standby holds once this commits
            assert self.table is not None
            if self.shadow is not None:
                pd.hash_pages(self.shadow, batch.index, self.table)
            else:
                pd.hash_gathered(self.table, batch)
        msg = wire.Pages.of(epoch, batch, state=state, outputs=outs)
        ms = 1000.0
        rec = CheckpointRecord(
            epoch,
            (t1 - t0) * ms,
            (t2 - t1) * ms,
            (t3 - t2) * ms,
            (t4 - t3) * ms,
            (t5 - t4) * ms,
            (t5 - t0) * ms,
            len(dirty),
            len(batch.data) + len(state),
            len(outs),
        )
        rec.sent_at = time.monotonic()
        corrupt = self._fault is not None and self._fault[:2] == ("corrupt", epoch)
        self.send_pages(msg, corrupt=corrupt and bool(batch.data))
        self.sent_epoch = epoch
        _fault(self._fault, "after-send", epoch)
        if not self.exact or cfg.encoding == "delta":  # gathered in the pause: see prepare
            self._buffers.prepare(epoch + 1, len(dirty))
        self.epoch = epoch
        self.in_flight[epoch] = (msg, rec)
        self.stats.add(rec)
        # after the resume and the send: the metrics never lengthen the pause
        self.metrics.checkpoint(
            {"stop": rec.stop_ms, "scan": rec.scan_ms, "gather": rec.gather_ms,
             "state": rec.state_ms, "resume": rec.resume_ms},
            rec.pause_ms, rec.pages, rec.bytes_sent,
        )  # fmt: skip
        if self.method == "log":
            self._after_log_checkpoint(epoch, logged)
        return rec

    def send_pages(self, msg: wire.Pages, *, corrupt: bool = False) -> None:
        """Send ``msg`` in this session under the next send number (``corrupt``: the
        ``MIRROR_FAULT=corrupt`` test fault, a frame damaged on the wire)."""
        self._seq += 1
        send = self.link.send_corrupted if corrupt else self.link.send
        try:
            send(replace(msg, session=self.session, seq=self._seq))
        except LinkDown as e:  # not sent: still in flight, sent again (see _check_stalled)
            self.link.handshake_failed()
            _event("send-failed", checkpoint=msg.epoch, part=msg.part, reason=str(e))
            self.link.reconnect()

    def _log_scan(self, epoch: int) -> tuple[array[int], bool]:
        """In the pause: the pages the log lists (and those the safety net found),
        or, with the log lost or just set up again, a full hashed scan."""
        assert self.table is not None
        if self.log_state == "ok" and self.log is not None:
            try:
                dirty = self.log.scan()
            except dirtylog.DirtyLogError as e:
                self._lost(epoch, e)
            else:
                if self._pending:
                    dirty = array("I", sorted(self._pending.union(dirty)))
                    self._pending.clear()
                return dirty, True
        elif self.log is not None and self.log_state == "fresh":
            try:
                self.log.scan()  # protect again what was written since it was set up
            except dirtylog.DirtyLogError:
                self.log_state = "lost"
        self._pending.clear()  # the full scan finds them (the table is still the standby's)
        dirty = pd.scan_hashed(self.guest.ram, self.table, threads=self.cfg.threads)
        if self.log_state == "fresh":
            self.log_state = "ok"
        return dirty, False

    def _lost(self, epoch: int, e: Exception) -> None:
        self.stats.log_losses += 1
        self.log_state = "lost"
        _event("dirty-log-lost", checkpoint=epoch, reason=str(e), fallback="hashed scan")

    def _after_log_checkpoint(self, epoch: int, logged: bool) -> None:
        """After the resume: set a lost log up again, or check a slice of RAM."""
        if self.log_state == "lost":
            if self._open_log():
                self.log_state = "fresh"
                _event("dirty-log-restored", checkpoint=epoch)
            return
        if self._ram_discarded(epoch):
            return
        if logged and self.cfg.verify_slices:
            self._verify_slice(epoch)

    def _ram_discarded(self, epoch: int) -> bool:
        """Whether the guest's RAM was discarded behind the log (a balloon that changed
        size punches holes the log cannot see): then the next pause compares all of RAM
        with the table, as after a log set up again."""
        if not self.guest.ram_discarded():
            return False
        self.log_state = "fresh"
        self.stats.ram_discards += 1
        _event("ram-discarded", checkpoint=epoch, fallback="hashed scan of all of RAM")
        return True

    def _verify_slice(self, epoch: int) -> None:
        """The safety net: compare the next slice of RAM with the table (what the
        standby holds).  A page that differs although the log says it was not written
        since the pause was missed by the log: it goes with the next checkpoint."""
        assert self.table is not None and self.log is not None
        slices = min(self.cfg.verify_slices, self.npages)
        k = self._verify_next
        self._verify_next = (k + 1) % slices
        first = k * self.npages // slices
        count = (k + 1) * self.npages // slices - first
        differ = pd.hash_verify(self.guest.ram, self.table, first, count)
        self.stats.verified_pages += count
        if not differ:
            return
        try:
            written = set(self.log.written(first, count))  # asked after hashing: see above
        except dirtylog.DirtyLogError as e:
            self._lost(epoch + 1, e)  # the next checkpoint scans all of RAM
            return
        missed = [p for p in differ if p not in written]
        if missed:
            self._pending.update(missed)
            # a balloon's holes found before the guest told its new size: asked again now
            if self._ram_discarded(epoch):
                return
            if self.guest.discards_ram():
                # pages that read as a hole (zero) where a balloon punches them without a
                # change of size (it moves its pages: compaction): not the log's miss
                zero, ram = bytes(PS), self.guest.ram
                holes = [p for p in missed if ram[p * PS : (p + 1) * PS] == zero]
                if holes:
                    self.stats.ram_discarded_pages += len(holes)
                    _event("ram-holes", checkpoint=epoch, pages=len(holes), first=holes[:8])
                    punched = set(holes)
                    missed = [p for p in missed if p not in punched]
                if not missed:
                    return
            self.stats.log_missed_pages += len(missed)
            self.metrics.missed_pages.inc(len(missed))
            _event(
                "dirty-log-missed-pages",
                checkpoint=epoch,
                pages=len(missed),
                first=missed[:8],
                total=self.stats.log_missed_pages,
            )

    def _disk_barrier(self, disk: ReplicatedDisk, epoch: int) -> bool:
        """Close the disk's epoch (in the pause).  False: the disk's stream to the standby
        has ended, so the standby can commit no later checkpoint (no disk for it): the
        engine takes no more checkpoints (``disk_lost`` says why; outputs stay held)
        until the caller decides, as for a lost standby: run unprotected once the
        controller says so (the disk server records the blocks written meanwhile, for
        the resync of a returning standby), or stop."""
        if self.disk_lost is not None:
            return False
        problem = disk.barrier(epoch)
        if problem is None:
            return True
        self.disk_lost = (problem, time.monotonic())
        _event("disk-stream-lost", checkpoint=epoch, reason=problem, acked=self.acked,
               note="no checkpoints: outputs held until the standby is judged")  # fmt: skip
        return False

    def start_disk(
        self,
        address: str,
        port: int,
        progress: Callable[[int, int], None],
        keys: LinkKeys | None = None,
    ) -> tuple[str, int]:
        """Pairing with a disk: stream it to the standby's disk server, copying all of it
        live (the guest runs); returns when the standby's replica is complete: ("resync",
        blocks sent) if the replica was known, else ("copy", 0).  The stream is under this
        session's key (derived from ``keys``, the interconnect's; None: insecure)."""
        if self.guest.disk is None:
            return "none", 0
        disk = replicated(self.guest.disk)
        try:
            disk.session(
                session_key(keys.secret if keys else None, keys.peer if keys else None,
                            self.pair, self.generation, self.session),
                self.generation,
            )  # fmt: skip
            mode = "resync"
            try:  # a standby whose replica is this disk server's gets only what it lacks
                disk.replicate(address, port, self.epoch + 1, resync=True)
                log.info("the standby's disk replica is known: resync of the blocks written since")
            except DiskError as e:
                log.info("disk: full copy to the standby (%s)", e)
                mode = "copy"
                disk.replicate(address, port, self.epoch + 1)
            disk.wait_synced(progress=progress)
            return mode, int(disk.status()["resync_blocks"]) if mode == "resync" else 0
        except DiskError as e:
            raise ReplicationError(f"the disk's copy to {address}:{port} failed: {e}") from e

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
                _event("ack-refused", checkpoint=reply.epoch, sent=self.sent_epoch,
                       refused=self.bogus_acks, note="an ack of a checkpoint never sent: "
                       "nothing released")  # fmt: skip
            return
        if isinstance(reply, wire.Ack) and reply.epoch > self.acked:
            now = time.monotonic()
            for e in sorted(e for e in self.in_flight if e <= reply.epoch):
                _, rec = self.in_flight.pop(e)
                rec.ack_ms = (now - rec.sent_at) * 1000
                self.stats.acked += 1
                self.metrics.acked.inc()
                self.metrics.ack_latency.observe(rec.ack_ms / 1000)
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
        """Send every checkpoint in flight again, in order, under new send numbers: the
        standby acks again those it holds and takes the rest in order."""
        self._resent_at_seq = self._seq + 1
        self._resent_at = time.monotonic()
        for e in sorted(self.in_flight):
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
            reply = self._recv(max(0.0, left))
            if reply is not None:
                self.on_reply(reply)
            if left <= 0:
                return

    def run(self, should_stop: Callable[[], bool], *, epochs: int | None = None) -> None:
        """Checkpoint every epoch until ``should_stop()``, or after ``epochs`` checkpoints
        (then wait for their acks and leave the guest paused at the last one)."""
        interval = self.cfg.epoch_ms / 1000
        next_at = time.monotonic() + interval
        while not should_stop():
            self.pump(next_at)
            self._check_stalled()
            if self.disk_lost is not None:  # no standby can commit a checkpoint now
                next_at = time.monotonic() + interval
                continue
            if len(self.in_flight) >= self.cfg.max_in_flight:
                next_at = time.monotonic() + 0.001  # window full: the epoch stretches
                continue
            if epochs is not None and self.epoch == epochs - 1:
                self._final_checkpoint(should_stop)
                return
            self.checkpoint()
            next_at = max(next_at + interval, time.monotonic() + interval / 4)

    def _final_checkpoint(self, should_stop: Callable[[], bool]) -> None:
        self.checkpoint(resume=False)
        while self.in_flight and not should_stop():
            self.pump(time.monotonic() + 0.05)
            self._check_stalled()

    def records_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.stats.records]
