"""The secondary: a reserved standby image that is always exactly one committed checkpoint.

Rule 2 of docs/ARCHITECTURE.md.  The image (a file in /dev/shm, reserved and
pre-faulted at start) changes only when a checkpoint is complete and every
page of it verifies: each PAGES message is validated (wire.py), staged (new
content of delta pages built aside, every page's checksum checked), and
only then committed in one step, with its device state written beside the
image; then it is acknowledged.  A bad frame or a checkpoint that fails to
verify is rejected (a REJECT naming that message) with a logged error, and the
image left as the last committed checkpoint; the session goes on, and the primary
sends it again.  Frames of no session or another one, and malformed frames, are
dropped unanswered: nothing a frame says can drop the committed checkpoint.

A checkpoint may come in parts (checkpoint.early_send): early parts, sent while the
primary's guest still runs the epoch, are staged and verified as they come and held
aside, unacknowledged; the final part names how many came before it, and only when it
arrives, verifies and all of them are staged are they committed (the early parts in
order, then the final one: a page sent again wins).  Until then the image is the last
committed checkpoint: a promotion, a new session or a rejected part discards them.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror.config import KeysConfig, LinkConfig
from mirror.hoststate import private_dir, process_record, write_atomic, write_json
from mirror.replication import keys, pagecrypt, wire
from mirror.replication import pagediff as pd
from mirror.replication.disk import DiskError, ReplicatedDisk, session_key
from mirror.replication.link import Endpoint, Link
from mirror.replication.metrics import STATES, Metrics, served

log = logging.getLogger("mirror.replication.standby")
SHM = Path("/dev/shm")
TAIL_OUTPUTS = 100_000  # committed outputs kept for a promotion
MAX_EARLY_PARTS = 16  # early parts of one checkpoint that a standby stages


class StandbyError(RuntimeError):
    """The standby cannot start or go on (e.g. its memory cannot be had)."""


class StandbyImage:
    """The standby's RAM image: a file of the guest's RAM size, all of it reserved now."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        fs = os.statvfs(path.parent)
        if fs.f_bavail * fs.f_frsize < size:
            raise StandbyError(
                f"cannot reserve {size >> 20} MiB for the standby image in {path.parent}: "
                f"only {fs.f_bavail * fs.f_frsize >> 20} MiB free there; free memory or lower "
                f"guest.ram_mib"
            )
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise StandbyError(
                f"standby image {path} already exists: another standby of this "
                f"pair runs here, or one died without cleaning up (remove it)"
            ) from None
        try:
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise StandbyError(
                f"cannot reserve {size >> 20} MiB for the standby image {path}: "
                f"{e.strerror}; free memory or lower guest.ram_mib"
            ) from e
        os.close(fd)

    def close(self, remove: bool = True) -> None:
        self.map.close()
        if remove:
            self.path.unlink(missing_ok=True)


class Standby:
    def __init__(
        self,
        link: LinkConfig,
        key_files: KeysConfig,
        *,
        pair: str,
        node: str,
        generation: int,
        ram_mib: int,
        state_dir: Path,
        silent_after_ms: int,
        image_dir: Path = SHM,
        fingerprint: str = "synthetic",
    ) -> None:
        """The standby of ``pair`` on ``node``, listening where ``link`` says, with the
        interconnect keys ``key_files`` names; a guest of ``ram_mib`` MiB (its image in
        ``image_dir``).  ``silent_after_ms``: the arbiter's, for whether a primary still
        heartbeats."""
        self.link_cfg, self.pair, self.node = link, pair, node
        self.ram_mib, self.silent_after_ms = ram_mib, silent_after_ms
        self.keys = keys.load(key_files)  # before anything is reserved: no keys, no standby
        self.fingerprint = fingerprint  # the guest this standby can run
        self.state_dir = state_dir
        private_dir(self.state_dir)
        self.ram_bytes = ram_mib << 20
        self.image = StandbyImage(image_dir / f"mirror-{pair}-{node}-standby.img", self.ram_bytes)
        self.state_path = self.state_dir / "committed.state"
        self.committed = 0  # epoch of the checkpoint the image holds (0: none yet)
        self.generation = generation
        # the pair's current generation, the arbiter's: a HELLO of another is refused
        self.generation_now: Callable[[], int] = lambda: self.generation
        self.committed_generation = 0  # the generation whose checkpoint the image holds
        self.session: wire.Hello | None = None
        self.precopied = 0
        self.rejected = 0
        self.dropped = 0  # frames of no session or another, or malformed
        self.commits = 0
        # outputs of committed epochs, (epoch, seq, payload): a promoted standby
        # releases those the observer lacks
        self.outputs_tail: list[tuple[int, int, bytes]] = []
        self.primary: str | None = None  # the node of the last accepted HELLO
        self.paired_at: float | None = None  # monotonic time of the last accepted HELLO
        self._status_at = 0.0
        self.last_ack_at = 0.0  # monotonic time of the last ack sent
        self.handover = False  # the primary handed over (planned switchover)
        self.extra_status: Callable[[], dict[str, Any]] = dict  # the role adds its part
        self.link: Link | None = None
        self.bind_wait = 10.0  # seconds serve() waits for ports in use (see serve)
        self.metrics = Metrics.of(pair, node)
        self.disk: ReplicatedDisk | None = None  # the disk replica, committed with each checkpoint
        # the early parts of checkpoint committed + 1 staged so far (never in the image
        # before its final part), and their page data's bytes (at most the guest's RAM)
        # per part: (its staged batches, its page data bytes, its pages)
        self.early: list[tuple[list[pd.StagedBatch], int, int]] = []
        self.early_epoch = 0
        self.early_bytes = 0
        self.early_pages = 0  # pages staged early and committed (counted at the commit)

    # -- the protocol ---------------------------------------------------------

    def handle(self, msg: wire.Message) -> wire.Message | None:
        """The reply to one decoded message (None: no reply).  Only a HELLO may open a
        session; anything else must belong to the live one, or it is dropped unanswered
        with nothing changed."""
        if isinstance(msg, wire.Hello):
            return self._hello(msg)
        session = getattr(msg, "session", None)
        if self.session is None or session != self.session.session:
            self._drop(f"{type(msg).__name__} of session {session} (live: "
                       f"{self.session.session if self.session else 'none'})")  # fmt: skip
            return None
        match msg:
            case wire.Pages():
                return self._pages(msg)
            case wire.Handover():
                if msg.node != self.primary or msg.epoch != self.committed:
                    return self._reject(
                        msg,
                        f"handover at checkpoint {msg.epoch} from {msg.node}, but this "
                        f"standby holds checkpoint {self.committed} of {self.primary}",
                    )
                log.info("handover from %s at checkpoint %d: taking over", msg.node, msg.epoch)
                self.handover = True
                return wire.Ack(msg.session, msg.epoch, 0)
            case wire.Bye():
                log.info(
                    "primary %s stopped on purpose (%s): standing down, not promoting",
                    msg.node,
                    msg.reason,
                )
                self.session = None
                self.primary = None  # nobody to judge until a new HELLO
                if self.link:
                    self.link.session[0] = 0
                return None
        self._drop(f"unexpected {type(msg).__name__} on the data link")
        return None

    def _sealed_refused(self, e: pagecrypt.SealError) -> wire.Reject | None:
        """A sealed part refused (pagecrypt): nothing of it applied.  When the message's
        head had verified (it is the live primary's, damaged on the way) it is REJECTed,
        so that the primary sends it again at once; anything else is dropped unanswered."""
        if e.refused is None or self.session is None or e.refused[0] != self.session.session:
            self._drop(f"a sealed part ({e})")
            return None
        session, seq, epoch, part = e.refused
        log.error("checkpoint %d part %d rejected: %s; image stays at checkpoint %d",
                  epoch, part, e, self.committed)  # fmt: skip
        self.rejected += 1
        self.metrics.rejected("data")
        return wire.Reject(session, wire.Kind.PAGES, seq, epoch, part, str(e))

    def _drop(self, what: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("dropped %s (%d dropped so far); the session is untouched", what,
                        self.dropped)  # fmt: skip

    def _hello(self, h: wire.Hello) -> wire.Message:
        if self.session is not None and h.session == self.session.session:
            return self._welcome()  # the same HELLO again: its WELCOME was lost or late
        problem = reason = None
        try:
            current = self.generation_now()
        except Exception as e:  # the arbiter's storage: any failure means "not now"
            current, problem, reason = None, f"cannot read the pair's generation: {e}", "busy"
        if problem:
            pass
        elif h.pair != self.pair:
            problem = f"pair {h.pair!r} is not this standby's pair {self.pair!r}"
            reason = "wrong pair"
        elif h.generation != current:
            problem = (
                f"generation {h.generation} is not the pair's current generation {current} "
                f"(the arbiter's)"
            )
            reason = "not the current generation"
        elif (
            self.primary is not None
            and h.node != self.primary
            and h.generation <= self.generation
            and self._primary_alive()
        ):
            problem = (
                f"this standby is paired with {self.primary} (generation "
                f"{self.generation}), whose heartbeats are fresh"
            )
            reason = "paired with another primary"
        elif h.ram_bytes != self.ram_bytes:
            problem = (
                f"guest RAM of {h.ram_bytes} bytes does not match this standby's "
                f"{self.ram_bytes} (guest.ram_mib = {self.ram_mib})"
            )
            reason = "guest RAM size differs"
        elif h.guest != self.fingerprint:
            problem = (
                f"the primary's guest is {h.guest!r} but this standby runs {self.fingerprint!r}: "
                f"both hosts need the same QEMU version and machine configuration"
            )
            reason = "guest differs (QEMU version or machine configuration)"
        if not problem and self.disk is not None:
            try:  # the disk stream of this session: its key (from both key pairs), this generation
                k = self.keys
                self.disk.session(
                    session_key(k.secret if k else None, k.peer if k else None,
                                h.pair, h.generation, h.session),
                    h.generation,
                )  # fmt: skip
            except DiskError as e:
                problem, reason = f"the disk server did not take the session: {e}", "busy"
        if problem:
            log.error("HELLO from %s refused: %s", h.node, problem)
            self.rejected += 1  # a refused HELLO does not end the current session
            self.metrics.refused_peers.inc()
            # the reason says nothing of this pair's names, generation or sizes
            return wire.Reject(h.session, wire.Kind.HELLO, 0, 0, 0, f"refused: {reason}")
        assert current is not None
        self.drop_early()
        self.session = h
        self.primary = h.node
        self.paired_at = time.monotonic()
        self.generation = current
        if self.link:
            self.link.session[0] = h.session
            self.link.pair_with_last_sender()
            if self.link.bulk is not None and self.keys is not None:  # this session's pages key
                self.link.open_pages(
                    pagecrypt.page_key(self.keys, h.pair, h.generation, h.session)
                )
        log.info(
            "session with %s (generation %d), committed epoch %d",
            h.node,
            h.generation,
            self.committed,
        )
        return self._welcome()

    def _welcome(self) -> wire.Welcome:
        assert self.session is not None
        return wire.Welcome(
            self.pair,
            self.generation,
            self.node,
            self.committed,
            self.session.session,
            self.link.bulk_port if self.link and self.link.opener is not None else 0,
        )

    def _primary_alive(self) -> bool:
        age = self.link.peer.age() if self.link else None
        return age is not None and age <= self.silent_after_ms / 1000

    def _reject(self, msg: wire.Pages | wire.Handover, reason: str) -> wire.Reject:
        """Refuse one message of the live session; the session and the image stay."""
        self.rejected += 1
        self.metrics.rejected("data")
        if isinstance(msg, wire.Pages):
            return wire.Reject(msg.session, wire.Kind.PAGES, msg.seq, msg.epoch, msg.part, reason)
        return wire.Reject(msg.session, wire.Kind.HANDOVER, 0, msg.epoch, 0, reason)

    def drop_early(self) -> None:
        """Forget the staged early parts (nothing of them was applied)."""
        self.early, self.early_epoch, self.early_bytes = [], 0, 0

    def _early_part(self, m: wire.Pages) -> wire.Message | None:
        """An early part of checkpoint ``m.epoch``: staged and verified, held aside, not
        answered (a REJECT if it cannot be staged: the primary sends the epoch again)."""
        if m.epoch <= self.committed:
            return None  # a resend of a checkpoint it holds: its final part is acked
        if m.epoch != self.committed + 1:
            return self._reject(
                m, f"early part of checkpoint {m.epoch} out of order: committed is "
                f"{self.committed}"
            )
        staged_parts = len(self.early) if self.early_epoch == m.epoch else 0
        problem = None
        if m.state or m.outputs:
            problem = "an early part carries no device state and no outputs"
        elif pd.PageKind.DELTA in bytes(m.kinds):
            problem = "an early part carries no delta pages"
        elif m.part >= MAX_EARLY_PARTS:
            problem = f"more than {MAX_EARLY_PARTS} early parts"
        elif m.part > staged_parts:
            problem = (
                f"early part {m.part} of checkpoint {m.epoch} out of order: "
                f"{staged_parts} staged"
            )
        else:
            if self.early_epoch != m.epoch:
                self.drop_early()
            # a part sent again (a resend starts over at part 0): it and those after go
            del self.early[m.part :]
            self.early_bytes = sum(n for _, n, _ in self.early)
            if self.early_bytes + m.data_len > self.ram_bytes:
                problem = "early parts of more page data than the guest's RAM"
        if problem is not None:
            self.drop_early()
            return self._reject(m, problem)
        try:
            staged = self._stage(m)
        except pd.PageDiffError as e:
            log.error("checkpoint %d early part %d rejected: %s; image stays at checkpoint %d",
                      m.epoch, m.part, e, self.committed)  # fmt: skip
            self.drop_early()
            return self._reject(m, str(e))
        self.early_epoch = m.epoch
        self.early.append((staged, m.data_len, m.count))
        self.early_bytes += m.data_len
        return None

    def _stage(self, m: wire.Pages) -> list[pd.StagedBatch]:
        """Every data frame of ``m`` staged and verified (PageDiffError), nothing written."""
        return [
            pd.stage_pages(self.image.map, m.index[a:b], m.kinds[a:b], m.lens[a:b], frame,
                           m.checksums[a:b])
            for a, b, frame in m.slices()
        ]  # fmt: skip

    def _pages(self, m: wire.Pages) -> wire.Message | None:
        assert self.session is not None
        if m.epoch and not m.final:
            return self._early_part(m)
        if m.epoch == 0:
            if self.committed and self.committed_generation >= self.session.generation:
                # only a primary of a later generation starts over with a pre-copy
                return self._reject(
                    m,
                    f"pre-copy refused: this standby holds checkpoint {self.committed} of "
                    f"this generation",
                )
        elif 1 <= m.epoch <= self.committed:
            return wire.Ack(m.session, m.epoch, m.part)  # a resend of what it holds
        elif m.epoch != self.committed + 1:
            return self._reject(
                m, f"checkpoint {m.epoch} out of order: committed is {self.committed}"
            )
        early: list[tuple[list[pd.StagedBatch], int, int]] = []
        if m.epoch:
            early = self.early if self.early_epoch == m.epoch else []
            problem = None
            if len(early) != m.part:
                problem = (
                    f"checkpoint {m.epoch} follows {m.part} early parts, {len(early)} staged"
                )
            elif early and pd.PageKind.DELTA in bytes(m.kinds):
                problem = "a checkpoint sent in parts carries no delta pages"
            if problem is not None:
                log.error("checkpoint %d rejected: %s; image stays at checkpoint %d",
                          m.epoch, problem, self.committed)  # fmt: skip
                self.drop_early()
                return self._reject(m, problem)
        try:
            if m.state and pd.checksum_bytes(m.state) != m.state_sum:
                raise pd.CorruptEncoding("device state does not match its checksum")
            # every data frame staged and verified before any page is written
            staged = self._stage(m)
        except pd.PageDiffError as e:
            log.error(
                "checkpoint %d part %d rejected: %s; image stays at checkpoint %d",
                m.epoch,
                m.part,
                e,
                self.committed,
            )
            self.drop_early()
            return self._reject(m, str(e))
        if m.epoch and self.disk is not None:
            try:  # the disk's epoch N, durably, before RAM N commits and is acknowledged
                self.disk.commit(m.epoch)
            except DiskError as e:
                log.error("checkpoint %d rejected: its disk epoch: %s", m.epoch, e)
                self.drop_early()
                return self._reject(m, f"disk: {e}")
        if m.epoch == 0 and self.committed:
            # A new generation's pre-copy overwrites the image: it holds no committed
            # checkpoint again until the next commit.
            log.warning(
                "pre-copy of generation %d after commit %d: standby unprotected until the "
                "next checkpoint",
                self.session.generation,
                self.committed,
            )
            self.committed = 0
        # the early parts in the order sent, then the final part: the last copy of a page wins
        for batches, _, _ in early:
            for batch in batches:
                batch.commit()
        self.early_pages += sum(n for _, _, n in early)
        for batch in staged:
            batch.commit()
        self.drop_early()
        if m.epoch == 0:
            self.precopied += m.count
        else:
            write_atomic(self.state_path, bytes(m.state))
            self.committed = m.epoch
            self.committed_generation = self.session.generation
            self.commits += 1
            self.metrics.committed.set(m.epoch)
            self.outputs_tail += [(m.epoch, seq, payload) for seq, payload in m.outputs]
            del self.outputs_tail[:-TAIL_OUTPUTS]
            if self.link:
                self.link.committed[0] = m.epoch
        return wire.Ack(m.session, m.epoch, m.part)

    # -- running -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peer = self.link.peer if self.link else None
        return {
            "role": "secondary",
            "phase": "standby" if self.primary else "waiting for a primary",
            "pair": self.pair,
            "node": self.node,
            "generation": self.generation,
            "committed": self.committed,
            "image": str(self.image.path),
            "state": str(self.state_path),
            "session": self.session.node if self.session else None,
            "primary": self.primary,
            "precopied_pages": self.precopied,
            "commits": self.commits,
            "early_pages": self.early_pages,
            "early_staged_parts": len(self.early),
            "early_staged_epoch": self.early_epoch if self.early else 0,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "refused_keys": self.link.guard.refused if self.link and self.link.guard else 0,
            "failed_handshakes": (
                self.link.guard.failed_handshakes if self.link and self.link.guard else 0
            ),
            # the pages sealed off CURVE (pagecrypt): their port, the parts opened this session
            "pages_port": self.link.bulk_port if self.link else 0,
            "sealed_parts": self.link.opener.opened if self.link and self.link.opener else 0,
            **process_record(),
            "metrics": served(),
            "heartbeat_age_s": peer.age() if peer else None,
            "last_outputs": [[s, p.decode(errors="replace")] for _, s, p in self.outputs_tail[-5:]],
            **({"disk": self.disk.summary()} if self.disk else {}),
            **self.extra_status(),
        }

    def write_status(self) -> None:
        st = self.status()
        write_json(self.state_dir / "status.json", st)
        self.metrics.role.state("secondary")
        self.metrics.generation.set(self.generation)
        if st.get("protection") in STATES:
            self.metrics.state.state(st["protection"])
        self._status_at = time.monotonic()

    def serve(self, stop: threading.Event, tick: Callable[[], bool] = lambda: False) -> None:
        """Serve the primary until ``stop`` is set or ``tick()`` (called at least
        every 50 ms) returns True.  Ports in use: ConnectionError after ``bind_wait`` s."""
        link_cfg = self.link_cfg
        self.link = self._bind(stop, self.bind_wait)
        log.info(
            "standby of pair %s listening on %s:%d, image %s (%d MiB reserved)",
            self.pair,
            link_cfg.host,
            link_cfg.data_port,
            self.image.path,
            self.ram_bytes >> 20,
        )
        try:
            self.write_status()
            while not stop.is_set() and not tick():
                reply: wire.Message | None = None
                sealed = False  # answers to sealed pages go to the session's primary
                try:
                    msg = self.link.recv(0.05)
                    sealed = self.link.last_sealed
                except pagecrypt.SealError as e:
                    reply, sealed = self._sealed_refused(e), True
                except wire.WireError as e:
                    self._drop(f"a malformed frame ({e})")
                else:
                    reply = self.handle(msg) if msg is not None else None
                if reply is not None:
                    self.link.send(reply, to_primary=sealed)
                    if isinstance(reply, wire.Ack):
                        self.last_ack_at = time.monotonic()
                if isinstance(reply, wire.Reject) or time.monotonic() - self._status_at > 0.2:
                    self.write_status()
        finally:
            self.write_status()
            self.link.close()

    def _bind(self, stop: threading.Event, wait: float, bulk_port: int = 0) -> Link:
        """The interconnect's ports, bound (retried for ``wait`` s: after a switchover or a
        key reload their old holder may still be letting go)."""
        link_cfg = self.link_cfg
        deadline = time.monotonic() + wait
        while True:
            try:
                link = Link.server(
                    Endpoint(link_cfg.host, link_cfg.data_port, link_cfg.heartbeat_port),
                    self.node,
                    keys=self.keys,
                    bulk_port=bulk_port or link_cfg.bulk_port,
                    heartbeat_interval=link_cfg.heartbeat_interval_ms / 1000,
                    max_pages=self.ram_bytes // pd.PAGE_SIZE,
                )
                link.heartbeats.on_reject = lambda: self.metrics.rejected("heartbeat")
                return link
            except ConnectionError:
                if time.monotonic() > deadline or stop.is_set():
                    raise
                time.sleep(0.1)

    def use_keys(self, new: keys.LinkKeys | None, stop: threading.Event) -> bool:
        """Reloaded keys (SIGHUP, `mirror keys reload`): if they differ, bind the ports
        again with them, so that every connection made with the old ones ends; the
        session, and what the primary's heartbeats told, go on (its heartbeats resume
        within an interval when its key is still the admitted one).  True: changed."""
        if new == self.keys:
            return False
        old = self.link
        assert old is not None
        self.keys = new
        old.close()
        link = self._bind(stop, 10.0, old.bulk_port)  # the port the primary was told
        link.heartbeats.peer = old.heartbeats.peer  # a reload is no sign of the peer's death
        link.committed[0], link.session[0] = old.committed[0], old.session[0]
        if link.bulk is not None:  # the session's pages key: the session goes on
            link.opener = old.opener
        link.primary_id = old.primary_id  # its routing id survives its reconnection
        self.link = link
        log.info("interconnect bound again with the reloaded keys (peer key %s)",
                 keys.fingerprint(new.peer) if new else "none")  # fmt: skip
        return True

    def close(self, *, remove_image: bool = True, keep_state: bool = False) -> None:
        """Release the image (and remove it, unless a promoted guest now owns it, or it
        is kept after an error) and, unless ``keep_state``, the committed device state."""
        self.image.close(remove=remove_image)
        if not keep_state:
            self.state_path.unlink(missing_ok=True)
