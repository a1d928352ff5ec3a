"""The primary's epoch engine: pre-copy, then a checkpoint every epoch, outputs released on ack.

One checkpoint (docs/ARCHITECTURE.md, "the checkpoint epoch"):

    pause guest -> scan RAM -> [gather] -> save device state -> resume
                -> (guest runs epoch N+1) gather from the shadow, checksums, send N
    ... ack N -> release the outputs of epochs <= N

With the exact scan (the default) the scan itself copies each dirty page
into the shadow while the guest is paused, so the pause is the scan plus a
memcpy of the dirty bytes, and the send buffer is gathered from the shadow
after the guest runs again.  The hashed scan has no shadow: it gathers from
RAM inside the pause.  Delta encoding compares against the shadow inside the
pause.  At most ``max_in_flight`` checkpoints wait for their ack; when the
window is full the epoch stretches until an ack comes.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mirror.config import CheckpointConfig
from mirror.guests.base import Guest
from mirror.guests.disk import DiskError, DiskServer
from mirror.hoststate import percentile
from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.link import Link
from mirror.replication.outputs import OutputBuffer

log = logging.getLogger("mirror.replication.checkpoint")
RECENT = 10_000  # checkpoints kept for percentiles (about 8 minutes at 50 ms)
PS = pd.PAGE_SIZE


def _fault_point() -> tuple[str, int, float] | None:
    """A testing hook: MIRROR_FAULT=POINT:EPOCH[:DELAY_MS] makes the primary host die
    (SIGKILL to its own process group) at that point of that checkpoint, DELAY_MS
    later, so that chaos tests hit moments random timing rarely does.  Points:
    "in-pause" (guest stopped, nothing sent), "after-send" (the checkpoint handed
    to zmq; with a delay, on the wire or being applied by the standby).  And
    "corrupt" (no kill): that checkpoint's first sending has one bit of its page
    data flipped, as a bad link would; the standby must reject it and the primary
    send it again, intact."""
    spec = os.environ.get("MIRROR_FAULT")
    if not spec:
        return None
    point, epoch, *delay = spec.split(":")
    try:
        if point not in ("in-pause", "after-send", "corrupt") or len(delay) > 1:
            raise ValueError
        return point, int(epoch), float(delay[0]) if delay else 0.0
    except ValueError:
        raise ValueError(
            f"MIRROR_FAULT must be in-pause|after-send|corrupt:EPOCH[:DELAY_MS], got {spec!r}"
        ) from None


def _fault(fault: tuple[str, int, float] | None, point: str, epoch: int) -> None:
    if fault is None or fault[:2] != (point, epoch):
        return
    time.sleep(fault[2] / 1000)
    log.warning("MIRROR_FAULT: killing this host at %s of checkpoint %d", point, epoch)
    os.killpg(os.getpgrp(), signal.SIGKILL)


class ReplicationError(RuntimeError):
    """The standby refused the pair or could not be reached."""


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
            "rejects": self.rejects,
        }


class SendBuffers:
    """A ring of page-aligned send buffers, reused so that gathering a checkpoint
    does not page-fault a fresh buffer every epoch.

    zmq sends them without copying, so a buffer may be reused only once its
    message has surely left: the ring has one slot more than the messages
    that may await an ack, and a slot comes round again only after the
    message that used it was acknowledged.
    """

    def __init__(self, in_flight: int) -> None:
        self._slots: list[mmap.mmap | None] = [None] * (in_flight + 1)

    def get(self, seq: int, npages: int) -> mmap.mmap:
        slot = seq % len(self._slots)
        buf = self._slots[slot]
        if buf is None or len(buf) < npages * PS:
            if buf is not None:
                buf.close()
            buf = pd.alloc_pages(max(1, npages + npages // 4))  # room to grow
            self._slots[slot] = buf
        return buf


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
        self.exact = cfg.scan == "exact"
        self.shadow = pd.alloc_pages(self.npages) if self.exact or cfg.encoding == "delta" else None
        self.table = bytearray(pd.hash_table_size(len(guest.ram))) if not self.exact else None
        self.epoch = 0  # last checkpoint taken
        self.acked = 0
        self.in_flight: dict[int, tuple[wire.Pages, CheckpointRecord]] = {}
        self.stats = Stats()
        self._buffers = SendBuffers(cfg.max_in_flight)
        self._fault = _fault_point()

    # -- session ---------------------------------------------------------------

    def handshake(self, timeout: float = 30.0) -> int:
        """HELLO until WELCOME; returns the standby's committed epoch."""
        hello = wire.Hello(
            self.pair, self.generation, self.node, len(self.guest.ram), self.fingerprint
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.link.send(hello)
            reply = self._recv(1.0)
            if isinstance(reply, wire.Welcome):
                log.info(
                    "paired with %s (generation %d), its committed epoch %d",
                    reply.node,
                    reply.generation,
                    reply.committed,
                )
                return reply.committed
            if isinstance(reply, wire.Reject):
                raise ReplicationError(f"the standby refused this primary: {reply.reason}")
        raise ReplicationError(
            f"no answer from the standby at {self.link.endpoint.host}:"
            f"{self.link.endpoint.data_port} in {timeout:g} s"
        )

    def _recv(self, timeout: float) -> wire.Message | None:
        try:
            return self.link.recv(timeout)
        except wire.WireError as e:
            log.error("malformed frame from the standby ignored: %s", e)
            return None

    # -- pre-copy -------------------------------------------------------------

    def precopy(self, progress: Callable[[Progress], None] | None = None) -> None:
        """Copy all of RAM to the standby while the guest runs."""
        t0 = time.monotonic()
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
        window = max(2, self.cfg.max_in_flight)
        buffers = SendBuffers(window)
        acked = 0
        for n, pages in enumerate(parts):
            buf = buffers.get(n, len(pages))
            if self.exact:
                assert self.shadow is not None
                batch = pd.gather(self.shadow, pages, out=buf)
            else:
                batch = self._precopy_hashed(pages, scratch, buf)
            self.link.send(wire.Pages.of(0, batch, part=n, final=n == len(parts) - 1))
            sent = n + 1
            while sent - acked >= window or (n == len(parts) - 1 and acked < sent):
                reply = self._recv(10.0)
                if reply is None:
                    raise ReplicationError("the standby stopped answering during pre-copy")
                if isinstance(reply, wire.Reject):
                    raise ReplicationError(
                        f"the standby rejected pre-copy part {reply.part}: {reply.reason}"
                    )
                if isinstance(reply, wire.Ack) and reply.epoch == 0:
                    acked += 1
                    if progress:
                        progress(Progress(min(self.npages, acked * chunk), self.npages))
        self.stats.precopy_s = time.monotonic() - t0
        self.stats.precopy_pages = self.npages

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
        t0 = time.perf_counter()
        guest.pause()
        t1 = time.perf_counter()
        buf = None
        if self.exact:
            assert self.shadow is not None
            delta = cfg.encoding == "delta"
            dirty = pd.scan_exact(ram, self.shadow, update_shadow=not delta, threads=cfg.threads)
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
        if guest.disk is not None:  # `stop` drained the guest's I/O: close its disk epoch
            self._disk_barrier(guest.disk, epoch)
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
        if self._fault is not None and self._fault[:2] == ("corrupt", epoch) and batch.data:
            self.link.send_corrupted(msg)
        else:
            self.link.send(msg)
        _fault(self._fault, "after-send", epoch)
        self.epoch = epoch
        self.in_flight[epoch] = (msg, rec)
        self.stats.add(rec)
        return rec

    def _disk_barrier(self, disk: DiskServer, epoch: int) -> None:
        """Close the disk's epoch.  If the disk's stream to the standby has ended, the
        standby can commit no later checkpoint (no disk for it), and this primary has no
        way to copy the disk again while it runs (no resync yet): it stops, so that the
        standby goes on from its last checkpoint, memory and disk, rather than the pair
        holding every output from now on."""
        problem = disk.barrier(epoch)
        if problem is not None:
            raise ReplicationError(
                f"the guest's disk is no longer replicated (checkpoint {epoch}): {problem}; "
                f"the standby holds the last committed checkpoint"
            )

    def start_disk(self, address: str, port: int, progress: Callable[[int, int], None]) -> None:
        """Pairing with a disk: stream it to the standby's disk server, copying all of it
        live (the guest runs); returns when the standby's replica is complete."""
        disk = self.guest.disk
        if disk is None:
            return
        try:
            disk.replicate(address, port, self.epoch + 1)
            disk.wait_synced(progress=progress)
        except DiskError as e:
            raise ReplicationError(f"the disk's copy to {address}:{port} failed: {e}") from e

    def on_reply(self, reply: wire.Message) -> None:
        if isinstance(reply, wire.Ack) and reply.epoch > self.acked:
            now = time.monotonic()
            for e in sorted(e for e in self.in_flight if e <= reply.epoch):
                _, rec = self.in_flight.pop(e)
                rec.ack_ms = (now - rec.sent_at) * 1000
                self.stats.acked += 1
            self.acked = reply.epoch
            self.outputs.release_through(reply.epoch)
            self.link.committed[0] = reply.epoch  # our heartbeats tell the standby
        elif isinstance(reply, wire.Reject):
            self.stats.rejects += 1
            log.error(
                "the standby rejected checkpoint %d: %s; re-pairing", reply.epoch, reply.reason
            )
            self.resync()

    def resync(self) -> None:
        """After a reject: say HELLO again and resend what the standby lacks."""
        committed = self.handshake()
        if committed < self.acked:
            raise ReplicationError(
                f"the standby lost committed checkpoints (it has {committed}, {self.acked} "
                f"were acknowledged): a full re-pairing is needed"
            )
        if committed > self.acked:
            self.on_reply(wire.Ack(committed, 0))
        for e in sorted(self.in_flight):
            self.link.send(self.in_flight[e][0])

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

    def records_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.stats.records]
