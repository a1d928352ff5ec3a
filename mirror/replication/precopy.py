"""The engine's pre-copy: all of RAM to the standby while the guest runs, before the
first checkpoint (the initial sync of a pairing).

With the dirty-page log, in rounds: all of RAM, then what was written meanwhile, until
what is left is small; what is written after the last round goes with the first
checkpoint.  Without it, once, with the scan's table (or the shadow) set to exactly
what the standby got.  Parts go with at most a window of them awaiting the standby's ack.
"""

from __future__ import annotations

import mmap
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.inflight import ReplicationError, SendBuffers

if TYPE_CHECKING:
    from mirror.replication.checkpoint import CheckpointEngine

PS = pd.PAGE_SIZE
PRECOPY_ROUNDS = 12  # log-driven pre-copy: at most this many rounds after the first


@dataclass
class Progress:
    done_pages: int
    total_pages: int
    round: int = 0  # log-driven pre-copy: 0 sends all of RAM, then what was written meanwhile


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
            reply = self.engine.recv(10.0)
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


def precopy(engine: CheckpointEngine, progress: Callable[[Progress], None] | None) -> None:
    """Copy all of RAM to ``engine``'s standby while the guest runs (with the log: then,
    in rounds, what was written meanwhile, until what is left is small)."""
    t0 = time.monotonic()
    if engine.method == "log":
        engine.log_state = "ok"
        engine.open_log()  # before the first copy: every later write is logged
    sender = _PartSender(engine, progress)
    if engine.method == "log":
        _precopy_rounds(engine, sender)
    else:
        _precopy_once(engine, sender)
    sender.finish()
    engine.stats.precopy_s = time.monotonic() - t0
    engine.stats.precopy_pages = sender.pages


def _precopy_once(engine: CheckpointEngine, sender: _PartSender) -> None:
    ram = engine.guest.ram
    chunk = max(1, (engine.cfg.precopy_chunk_mib << 20) // PS)
    if engine.exact:
        assert engine.shadow is not None
        pd.scan_exact(ram, engine.shadow, threads=engine.cfg.threads)  # shadow := RAM, live
    # The hashed scan's table must hold the hashes of exactly what the standby gets:
    # hashing live RAM and copying it a moment later lets a page that changes and
    # changes back in between (A-B-A) look clean forever.  So each part is copied
    # first (into the shadow, or a scratch buffer) and hashed from that copy.
    scratch = None if engine.exact or engine.shadow is not None else pd.alloc_pages(chunk)
    parts = [range(s, min(s + chunk, engine.npages)) for s in range(0, engine.npages, chunk)]
    sender.total = engine.npages
    for n, pages in enumerate(parts):
        buf = sender.buffer(len(pages))
        if engine.exact:
            assert engine.shadow is not None
            batch = pd.gather(engine.shadow, pages, out=buf)
        else:
            batch = _precopy_hashed(engine, pages, scratch, buf)
        sender.send(batch, final=n == len(parts) - 1)

def _precopy_rounds(engine: CheckpointEngine, sender: _PartSender) -> None:
    """Pre-copy driven by the log: all of RAM, then the pages written during the
    previous round, until they are few (or after PRECOPY_ROUNDS rounds); what
    is written after the last round's scan goes with the first checkpoint."""
    assert engine.log is not None and engine.table is not None
    chunk = max(1, (engine.cfg.precopy_chunk_mib << 20) // PS)
    small = max(256, engine.npages // 512)
    todo: array[int] | range = range(engine.npages)
    sender.total = engine.npages
    for rnd in range(PRECOPY_ROUNDS + 1):
        sender.round = rnd
        for a in range(0, len(todo), chunk):
            pages = todo[a : a + chunk]
            batch = pd.gather(engine.guest.ram, pages, out=sender.buffer(len(pages)))
            pd.hash_gathered(engine.table, batch)  # the table: what the standby holds
            if engine.shadow is not None:  # delta encoding: the shadow too
                pd.apply_encoded(engine.shadow, batch)
            last = a + chunk >= len(todo)
            left = len(engine.log.written(0, engine.npages)) if last else small + 1
            final = last and (left <= small or rnd == PRECOPY_ROUNDS)
            sender.send(batch, final=final)
            if final:
                engine.stats.precopy_rounds = rnd + 1
                return
        sent = len(todo)
        todo = engine.log.scan()
        sender.total += len(todo)
        if len(todo) > small and 2 * len(todo) > sent:  # not converging: slow the guest
            engine.slow_precopy()
        if not todo:  # nothing written during the round: an empty last part
            sender.send(pd.gather(engine.guest.ram, [], out=sender.buffer(1)), final=True)
            engine.stats.precopy_rounds = rnd + 1
            return

def _precopy_hashed(
    engine: CheckpointEngine, pages: range, scratch: mmap.mmap | None, buf: mmap.mmap
) -> pd.EncodedPages:
    """One pre-copy part for the hashed scan: copy, hash the copy, send the copy."""
    assert engine.table is not None
    a, b = pages.start * PS, pages.stop * PS
    if scratch is None:  # delta encoding keeps a shadow: the copy goes there
        assert engine.shadow is not None
        snap = memoryview(engine.shadow)[a:b]
    else:
        snap = memoryview(scratch)[: b - a]
    snap[:] = memoryview(engine.guest.ram)[a:b]
    per_page = pd.hash_table_size(PS)
    table = memoryview(engine.table)[pages.start * per_page : pages.stop * per_page]
    pd.scan_hashed(snap, table, threads=engine.cfg.threads)
    batch = pd.gather(snap, range(len(pages)), out=buf)
    return replace(batch, index=array("I", pages))
