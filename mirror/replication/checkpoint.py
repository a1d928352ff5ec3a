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

With the log and ``checkpoint.early_send``, the pages written early in the epoch are
read from the log (which protects them again), copied and sent while the guest runs, as
uncommitted early parts of the epoch (:meth:`CheckpointEngine.early_send`); the pause
then carries only what was written since.  The standby commits them only with the
epoch's final part (mirror/replication/standby.py).

Delta encoding compares against the shadow inside the pause.  At most
``max_in_flight`` checkpoints wait for their ack; when the window is full
the epoch stretches until an ack comes.
The engine's three parts: this module, the pause path (stop, scan, gather, save the
device state, resume) and the loop that takes a checkpoint every epoch; the send/ack
bookkeeping, its base class (mirror/replication/inflight.py: the session, what is in
flight, acks and the output release, resends); the pre-copy before the first
checkpoint (mirror/replication/precopy.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from array import array
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mirror.config import CheckpointConfig
from mirror.guests.base import Guest, GuestError
from mirror.replication import dirtylog, wire
from mirror.replication import pagediff as pd
from mirror.replication import precopy as precopy_mod
from mirror.replication.disk import DiskError, ReplicatedDisk, replicated, session_key
from mirror.replication.inflight import (
    CheckpointRecord,
    InFlight,
    ReplicationError,
    SendBuffers,
    event,
)
from mirror.replication.keys import LinkKeys
from mirror.replication.link import Link
from mirror.replication.outputs import OutputBuffer
from mirror.replication.throttle import Throttle

log = logging.getLogger("mirror.replication.checkpoint")
PS = pd.PAGE_SIZE


def _fault_point() -> tuple[str, int, float] | None:
    """A testing hook: MIRROR_FAULT=POINT:EPOCH[:DELAY_MS] makes the primary host die
    (SIGKILL to its own process group) at that point of that checkpoint, DELAY_MS
    later, so that chaos tests hit moments random timing rarely does.  Points:
    "in-pause" (guest stopped, nothing sent), "after-send" (the checkpoint handed
    to zmq; with a delay, on the wire or being applied by the standby), "after-early"
    (the first early part from that checkpoint on handed to zmq, the guest running:
    checkpoint.early_send).  And
    "corrupt" (no kill): that checkpoint's first sending has one bit of its page
    data flipped, as a bad link would; the standby must reject it and the primary
    send it again, intact.  "lose-log" (no kill): just before that checkpoint the
    dirty-page log's userfaultfd is closed, as a lost registration would be."""
    spec = os.environ.get("MIRROR_FAULT")
    if not spec:
        return None
    point, epoch, *delay = spec.split(":")
    try:
        if point not in ("in-pause", "after-send", "after-early", "corrupt", "lose-log") or len(
            delay
        ) > 1:
            raise ValueError
        return point, int(epoch), float(delay[0]) if delay else 0.0
    except ValueError:
        raise ValueError(
            f"MIRROR_FAULT must be in-pause|after-send|after-early|corrupt|lose-log:EPOCH"
            f"[:DELAY_MS], "
            f"got {spec!r}"
        ) from None


def _fault(fault: tuple[str, int, float] | None, point: str, epoch: int) -> None:
    if fault is None or fault[:2] != (point, epoch):
        return
    time.sleep(fault[2] / 1000)
    log.warning("MIRROR_FAULT: killing this host at %s of checkpoint %d", point, epoch)
    os.killpg(os.getpgrp(), signal.SIGKILL)


class CheckpointEngine(InFlight):
    """The primary's engine for one pairing: the pre-copy, then a checkpoint every epoch
    (the session, sends and acks are its base class's)."""

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
        super().__init__(
            guest, link, outputs, pair=pair, generation=generation, node=node,
            fingerprint=fingerprint,
        )  # fmt: skip
        self.cfg = cfg
        self.epoch = 0  # last checkpoint taken
        self.npages = len(guest.ram) // PS
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
        # a dirty set that outgrows a 16th of RAM is a guest writing faster than the
        # pair replicates: no point holding (N+1) buffers that large in memory
        self._buffers = SendBuffers(
            cfg.max_in_flight, prepare_max=max(1, self.npages // 16), max_pages=self.npages
        )
        self._fault = _fault_point()
        # the disk's stream to the standby ended (why, when): no checkpoints any more
        self.disk_lost: tuple[str, float] | None = None
        # the throttle (checkpoint.max_pause_ms; mirror/replication/throttle.py)
        self.throttle: Throttle | None = None
        self.throttle_note = ""  # why there is none although one was asked for
        self._window_full = False  # the window of checkpoints in flight filled this epoch
        # send while the guest runs (checkpoint.early_send): their own ring of buffers,
        # each at most a quarter of RAM (more pages than that go in the pause)
        self.early_note = ""  # why there is no early send although one was asked for
        self._early_buffers: SendBuffers | None = None
        self._early_due: list[float] = []  # when (monotonic) this epoch's early sends are due
        self._early_rec = [0, 0, 0, 0.0]  # this epoch's early parts, pages, bytes, ms
        self._last_epoch_pages = 0  # the last checkpoint's pages, early ones included
        self._resumed_at = 0.0  # when (monotonic) the guest last resumed after a checkpoint
        self._early_at = 0.0  # when this epoch's first early part went (capacity: see on_reply)
        self._applied_speed = 1.0  # the speed the guest was last set to
        if cfg.max_pause_ms > 0:
            blocker = guest.throttle_blocker()
            if blocker is None:
                self.throttle = Throttle(cfg.max_pause_ms, cfg.epoch_ms)
            else:
                self.throttle_note = f"no throttle: {blocker}"
                event("throttle-unavailable", reason=blocker,
                      note="checkpoints go on unthrottled")  # fmt: skip

    # -- send while the guest runs (checkpoint.early_send) --------------------------

    def _early_ready(self) -> bool:
        """Whether early sends can be made now (the log, raw pages); the first time it
        cannot although asked, why goes in ``early_note``."""
        cfg = self.cfg
        if not cfg.early_send:
            return False
        why = ""
        if self.method != "log":
            why = f"needs the dirty-page log (the scan is {self.method})"
        elif cfg.encoding != "raw":
            why = "needs checkpoint.encoding = \"raw\""
        if why:
            if not self.early_note:  # on by default: said once, and in the status
                self.early_note = f"no early send: {why}"
                log.info("checkpoint.early_send: %s", self.early_note)
            return False
        if self._early_buffers is None:
            slots = (cfg.max_in_flight + 1) * cfg.early_sends
            self._early_buffers = SendBuffers(
                slots - 1, prepare_max=max(1, self.npages // 16),
                max_pages=max(1, self.npages // 4),
            )  # fmt: skip
        return True

    def _plan_early(self, next_at: float) -> None:
        """The early sends of the epoch that ends at ``next_at``: at ``early_send_at_pct``
        of the time from the guest's resume to ``next_at`` (an epoch shortened because
        the engine is behind keeps its early send), none closer than a tenth of an epoch
        to the stop (nothing to gain there)."""
        if not self._early_ready():
            self._early_due = []
            return
        interval = self.cfg.epoch_ms / 1000
        now = time.monotonic()
        start = min(self._resumed_at or now, now)
        n, pct = self.cfg.early_sends, self.cfg.early_send_at_pct / 100
        points = (max(now, start + (next_at - start) * pct * k / n) for k in range(1, n + 1))
        self._early_due = [t for t in points if t < next_at - interval / 10]

    def early_send(self) -> int:
        """While the guest runs: the pages the log lists since its last scan (which
        protects them again, so later writes are seen) copied and sent to the standby as
        an early part of the running epoch, uncommitted until its final part.  Skipped
        (0) when the window of checkpoints in flight is full (the link is busy) or the
        last checkpoint had fewer than ``early_send_min_pages`` pages.  Returns the pages
        sent."""
        cfg, epoch = self.cfg, self.epoch + 1
        if (
            self.log is None
            or self.log_state != "ok"
            or self.disk_lost is not None
            or not self._early_ready()
        ):
            return 0
        if (
            len(self.in_flight) >= cfg.max_in_flight
            or self._last_epoch_pages < cfg.early_send_min_pages
        ):
            self.stats.early_skipped += 1
            return 0
        assert self._early_buffers is not None and self.table is not None
        t0 = time.perf_counter()
        try:
            dirty = self.log.scan()
        except dirtylog.DirtyLogError as e:
            self._lost(epoch, e)  # the pause scans all of RAM against the table
            return 0
        if not dirty:
            return 0
        cap = self._early_buffers.max_pages
        if len(dirty) > cap:  # the rest goes in the pause (the safety net's way in)
            self._pending.update(dirty[cap:])
            dirty = dirty[:cap]
        parts = self.early_parts.setdefault(epoch, [])
        part = len(parts)
        buf = self._early_buffers.get(epoch * cfg.early_sends + part, len(dirty))
        batch = pd.gather(self.guest.ram, dirty, out=buf)
        msg = wire.Pages.of(epoch, batch, part=part, final=False)
        self.send_pages(msg)
        parts.append(msg)
        if self._fault is not None and self._fault[0] == "after-early" and epoch >= self._fault[1]:
            _fault(self._fault, "after-early", self._fault[1])  # the first from that epoch on
        # the table describes what the standby holds once this epoch commits (the copy,
        # not live RAM: a page written since is in the log again)
        pd.hash_gathered(self.table, batch)
        self._early_buffers.prepare(epoch * cfg.early_sends + part + 1, len(dirty))
        acc = self._early_rec
        if not acc[0]:
            self._early_at = time.monotonic() - (time.perf_counter() - t0)
        acc[0] += 1
        acc[1] += len(dirty)
        acc[2] += len(batch.data)
        acc[3] += (time.perf_counter() - t0) * 1000
        self.stats.early_sends += 1
        return len(dirty)

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

    def open_log(self) -> bool:
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

    # -- pre-copy (mirror/replication/precopy.py) ------------------------------

    def precopy(self, progress: Callable[[precopy_mod.Progress], None] | None = None) -> None:
        """Copy all of RAM to the standby while the guest runs (with the log: then, in
        rounds, what was written meanwhile, until what is left is small)."""
        try:
            precopy_mod.precopy(self, progress)
        except BaseException:  # the pairing failed: a guest that runs on runs at full speed
            self.release_throttle()
            raise

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
        if self.outputs.passing:  # paired live: the first checkpoint holds what they came from
            self.outputs.hold()
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
            self.early_parts.pop(epoch, None)
            self._early_rec = [0, 0, 0, 0.0]
            self.epoch = epoch
            return CheckpointRecord(epoch, 0, 0, 0, 0, 0, 0, 0, 0, len(outs))
        _fault(self._fault, "in-pause", epoch)
        t4 = time.perf_counter()
        if resume:
            guest.resume()
        t5 = time.perf_counter()
        self._resumed_at = time.monotonic()
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
        early_parts, early_pages, early_bytes, early_ms = self._early_rec
        self._early_rec = [0, 0, 0, 0.0]
        # the final part counts the early parts before it: the standby commits all or none
        msg = wire.Pages.of(epoch, batch, part=int(early_parts), state=state, outputs=outs)
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
            len(batch.data) + len(state) + int(early_bytes),
            len(outs),
            early_parts=int(early_parts),
            early_pages=int(early_pages),
            early_bytes=int(early_bytes),
            early_ms=early_ms,
        )
        self._last_epoch_pages = len(dirty) + int(early_pages)
        rec.sent_at = time.monotonic()
        rec.early_at, self._early_at = (self._early_at if early_parts else 0.0), 0.0
        corrupt = self._fault is not None and self._fault[:2] == ("corrupt", epoch)
        self.send_pages(msg, corrupt=corrupt and bool(batch.data))
        self.sent_epoch = epoch
        _fault(self._fault, "after-send", epoch)
        if not self.exact or cfg.encoding == "delta":  # gathered in the pause: see prepare
            # sized for the whole epoch, early pages included: a skipped early send (the
            # window full) must not fault a fresh buffer in inside the next pause
            self._buffers.prepare(epoch + 1, self._last_epoch_pages)
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
        self._throttle_after(rec)
        return rec

    # -- the throttle (after the resume and the send: never in the pause) ----------

    def _throttle_after(self, rec: CheckpointRecord) -> None:
        """Tell the throttle this checkpoint's figures and apply its decision."""
        window_full, self._window_full = self._window_full, False
        rec.in_flight_bytes = self.in_flight_bytes
        self.metrics.in_flight(rec.in_flight_bytes, self._buffers.held_bytes + self._early_held())
        throttle = self.throttle
        if throttle is None:
            return
        was_holding = throttle.cannot_hold
        now = time.monotonic()
        d = throttle.observe(rec.pause_ms, rec.bytes_sent, window_full=window_full,
                             capacity=self.capacity.bytes_per_s, now=now)  # fmt: skip
        rec.throttle_level = d.level
        self.metrics.throttle(
            d.level, throttle.throttled_s, self.capacity.bytes_per_s, throttle.cannot_hold
        )
        if d.changed:
            log.debug("throttle: %s", d.why)
            self._set_speed(d.speed)
        if throttle.cannot_hold and not was_holding:
            event("throttle-cannot-hold", level=d.level, load=round(d.load, 2),
                  pause_ms=round(rec.pause_ms, 2), max_pause_ms=self.cfg.max_pause_ms,
                  bytes=rec.bytes_sent, capacity_mb_per_s=round(self.capacity.bytes_per_s / 1e6, 1),
                  note="the guest at its slowest still overruns the budget")  # fmt: skip

    def _set_speed(self, speed: float) -> None:
        throttle = self.throttle
        assert throttle is not None
        before = self._applied_speed
        try:
            self.guest.set_speed(speed)
        except (GuestError, OSError) as e:
            self.throttle = None
            self.throttle_note = f"no throttle: {e}"
            event("throttle-unavailable", reason=str(e), note="checkpoints go on unthrottled")
            return
        self._applied_speed = speed
        if before == 1.0 and speed < 1.0:
            event("throttle-engaged", level=throttle.level, checkpoint=self.epoch,
                  capacity_mb_per_s=round(self.capacity.bytes_per_s / 1e6, 1))  # fmt: skip
        elif before < 1.0 and speed == 1.0:
            event("throttle-released", checkpoint=self.epoch,
                  throttled_s=round(throttle.throttled_s, 2))  # fmt: skip

    def slow_precopy(self) -> None:
        """A pre-copy round did not converge: the throttle, if any, halves the speed."""
        if self.throttle is not None:
            d = self.throttle.converge(time.monotonic())
            log.info("throttle: %s", d.why)
            if d.changed:
                self._set_speed(d.speed)

    def release_throttle(self) -> None:
        """The guest at full speed again (checkpoints end: it runs on alone, or stops)."""
        if self.throttle is None:
            return
        self.throttle.release(time.monotonic())
        self.metrics.throttle(0.0, self.throttle.throttled_s, self.capacity.bytes_per_s)
        if self._applied_speed < 1.0:
            with contextlib.suppress(GuestError, OSError):  # a guest that is gone
                self._set_speed(1.0)

    def throttle_status(self) -> dict[str, Any]:
        """The throttle in the status (``summary.throttle``)."""
        t = self.throttle
        return {
            "max_pause_ms": self.cfg.max_pause_ms,
            "active": t is not None,
            "level": t.level if t else 0.0,
            "throttled_s": round(t.throttled_s, 2) if t else 0.0,
            "engaged": t.engaged if t else 0,
            "cannot_hold": t.cannot_hold if t else False,
            "note": self.throttle_note,
            "capacity_mb_per_s": round(self.capacity.bytes_per_s / 1e6, 1),
            "in_flight_bytes": self.in_flight_bytes,
            "send_buffer_bytes": self._buffers.held_bytes + self._early_held(),
            "send_buffer_cap_bytes": self._buffers.cap_bytes + self._early_cap(),
        }

    def _early_held(self) -> int:
        return self._early_buffers.held_bytes if self._early_buffers else 0

    def _early_cap(self) -> int:
        return self._early_buffers.cap_bytes if self._early_buffers else 0

    def early_status(self) -> dict[str, Any]:
        """The early send in the status (``summary.early_send``)."""
        return {
            "on": self.cfg.early_send and not self.early_note,
            "note": self.early_note,
            "at_pct": self.cfg.early_send_at_pct,
            "sends": self.stats.early_sends,
            "skipped": self.stats.early_skipped,
            "buffer_bytes": self._early_held(),
            "buffer_cap_bytes": self._early_cap(),
        }

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
        event("dirty-log-lost", checkpoint=epoch, reason=str(e), fallback="hashed scan")

    def _after_log_checkpoint(self, epoch: int, logged: bool) -> None:
        """After the resume: set a lost log up again, or check a slice of RAM."""
        if self.log_state == "lost":
            if self.open_log():
                self.log_state = "fresh"
                event("dirty-log-restored", checkpoint=epoch)
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
        event("ram-discarded", checkpoint=epoch, fallback="hashed scan of all of RAM")
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
                    event("ram-holes", checkpoint=epoch, pages=len(holes), first=holes[:8])
                    punched = set(holes)
                    missed = [p for p in missed if p not in punched]
                if not missed:
                    return
            self.stats.log_missed_pages += len(missed)
            self.metrics.missed_pages.inc(len(missed))
            event(
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
        event("disk-stream-lost", checkpoint=epoch, reason=problem, acked=self.acked,
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
    def run(
        self,
        should_stop: Callable[[], bool],
        *,
        epochs: int | None = None,
        release: bool = True,
    ) -> None:
        """Checkpoint every epoch until ``should_stop()``, or after ``epochs`` checkpoints
        (then wait for their acks and leave the guest paused at the last one).  The
        throttle is released at the end unless ``release`` is false (a bench going on)."""
        try:
            self._run(should_stop, epochs)
        finally:
            if release:
                self.release_throttle()

    def _run(self, should_stop: Callable[[], bool], epochs: int | None) -> None:
        interval = self.cfg.epoch_ms / 1000
        next_at = time.monotonic() + interval
        self._plan_early(next_at)
        while not should_stop():
            early = self._early_due[0] if self._early_due else None
            self.pump(next_at if early is None else min(early, next_at))
            self._check_stalled()
            if self.disk_lost is not None:  # no standby can commit a checkpoint now
                next_at = time.monotonic() + interval
                self._early_due = []
                continue
            if early is not None and time.monotonic() < next_at:  # the guest runs on
                self._early_due.pop(0)
                self.early_send()
                continue
            if len(self.in_flight) >= self.cfg.max_in_flight:
                next_at = time.monotonic() + 0.001  # window full: the epoch stretches
                self._window_full = True  # over capacity: the throttle is told
                continue
            if epochs is not None and self.epoch == epochs - 1:
                self._final_checkpoint(should_stop)
                return
            self.checkpoint()
            next_at = max(next_at + interval, time.monotonic() + interval / 4)
            self._plan_early(next_at)

    def _final_checkpoint(self, should_stop: Callable[[], bool]) -> None:
        self.checkpoint(resume=False)
        while self.in_flight and not should_stop():
            self.pump(time.monotonic() + 0.05)
            self._check_stalled()
