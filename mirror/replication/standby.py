"""The secondary: a reserved standby image that is always exactly one committed checkpoint.

Rule 2 of docs/ARCHITECTURE.md.  The image (a file in /dev/shm, reserved and
pre-faulted at start) changes only when a checkpoint is complete and every
page of it verifies: each PAGES message is validated (wire.py), staged (new
content of delta pages built aside, every page's checksum checked), and
only then committed in one step, with its device state written beside the
image; then it is acknowledged.  A bad frame or a checkpoint that fails to
verify is rejected with a logged error, the session reset (the primary must
say HELLO again), and the image left as the last committed checkpoint.
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

from mirror.config import Config
from mirror.guests.disk import DiskError, DiskServer
from mirror.hoststate import write_atomic, write_json
from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.link import Endpoint, Link

log = logging.getLogger("mirror.replication.standby")
SHM = Path("/dev/shm")
TAIL_OUTPUTS = 100_000  # committed outputs kept for a promotion


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
        cfg: Config,
        *,
        image_dir: Path = SHM,
        generation: int | None = None,
        fingerprint: str = "synthetic",
    ) -> None:
        self.cfg = cfg
        self.fingerprint = fingerprint  # the guest this standby can run
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ram_bytes = cfg.guest.ram_mib << 20
        self.image = StandbyImage(
            image_dir / f"mirror-{cfg.pair.name}-{cfg.node.name}-standby.img", self.ram_bytes
        )
        self.state_path = self.state_dir / "committed.state"
        self.committed = 0  # epoch of the checkpoint the image holds (0: none yet)
        self.generation = cfg.pair.generation if generation is None else generation
        self.session: wire.Hello | None = None
        self.precopied = 0
        self.rejected = 0
        self.commits = 0
        # outputs of committed epochs, (epoch, seq, payload): a promoted standby
        # releases those the observer lacks
        self.outputs_tail: list[tuple[int, int, bytes]] = []
        self.primary: str | None = None  # the node of the last accepted HELLO
        self._status_at = 0.0
        self.last_ack_at = 0.0  # monotonic time of the last ack sent
        self.handover = False  # the primary handed over (planned switchover)
        self.extra_status: Callable[[], dict[str, Any]] = dict  # the agent adds its part
        self.link: Link | None = None
        self.disk: DiskServer | None = None  # the disk replica, committed with each checkpoint

    # -- the protocol ---------------------------------------------------------

    def handle(self, msg: wire.Message) -> wire.Message | None:
        """The reply to one decoded message (None: no reply)."""
        match msg:
            case wire.Hello():
                return self._hello(msg)
            case wire.Pages():
                if self.session is None:
                    return self._reject(msg.epoch, msg.part, "no session: send HELLO first")
                return self._pages(msg)
            case wire.Handover():
                if msg.node != self.primary or msg.epoch != self.committed:
                    return self._reject(
                        msg.epoch,
                        0,
                        f"handover at checkpoint {msg.epoch} from "
                        f"{msg.node}, but this standby holds checkpoint "
                        f"{self.committed} of {self.primary}",
                    )
                log.info("handover from %s at checkpoint %d: taking over", msg.node, msg.epoch)
                self.handover = True
                return wire.Ack(msg.epoch, 0)
            case wire.Bye():
                log.info(
                    "primary %s stopped on purpose (%s): standing down, not promoting",
                    msg.node,
                    msg.reason,
                )
                self.session = None
                self.primary = None  # nobody to judge until a new HELLO
                return None
            case wire.Heartbeat() | wire.Ack() | wire.Welcome() | wire.Reject():
                return self._reject(0, 0, f"unexpected {type(msg).__name__} on the data link")
        return None

    def _hello(self, h: wire.Hello) -> wire.Message:
        problem = None
        if h.pair != self.cfg.pair.name:
            problem = f"pair {h.pair!r} is not this standby's pair {self.cfg.pair.name!r}"
        elif h.generation < self.generation:
            problem = (
                f"generation {h.generation} is older than this standby's "
                f"generation {self.generation}"
            )
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
        elif h.ram_bytes != self.ram_bytes:
            problem = (
                f"guest RAM of {h.ram_bytes} bytes does not match this standby's "
                f"{self.ram_bytes} (guest.ram_mib = {self.cfg.guest.ram_mib})"
            )
        elif h.guest != self.fingerprint:
            problem = (
                f"the primary's guest is {h.guest!r} but this standby runs {self.fingerprint!r}: "
                f"both hosts need the same QEMU version and machine configuration"
            )
        if problem:
            log.error("HELLO from %s refused: %s", h.node, problem)
            self.rejected += 1  # a refused stranger does not end the current session
            return wire.Reject(0, 0, problem)
        self.session = h
        self.primary = h.node
        self.generation = h.generation
        log.info(
            "session with %s (generation %d), committed epoch %d",
            h.node,
            h.generation,
            self.committed,
        )
        return wire.Welcome(self.cfg.pair.name, self.generation, self.cfg.node.name, self.committed)

    def _primary_alive(self) -> bool:
        age = self.link.peer.age() if self.link else None
        return age is not None and age <= self.cfg.arbiter.silent_after_ms / 1000

    def _reject(self, epoch: int, part: int, reason: str) -> wire.Reject:
        self.rejected += 1
        self.session = None
        return wire.Reject(epoch, part, reason)

    def _pages(self, m: wire.Pages) -> wire.Message:
        if m.epoch == 0:
            if self.committed:
                # A new pre-copy overwrites the image: it holds no committed checkpoint
                # again until the next commit.
                log.warning(
                    "pre-copy after commit %d: standby unprotected until the next checkpoint",
                    self.committed,
                )
                self.committed = 0
        elif m.epoch != self.committed + 1:
            return self._reject(
                m.epoch, m.part, f"checkpoint {m.epoch} out of order: committed is {self.committed}"
            )
        try:
            if m.state and pd.checksum_bytes(m.state) != m.state_sum:
                raise pd.CorruptEncoding("device state does not match its checksum")
            # every data frame staged and verified before any page is written
            staged = [
                pd.stage_pages(self.image.map, m.index[a:b], m.kinds[a:b], m.lens[a:b], frame,
                               m.checksums[a:b])
                for a, b, frame in m.slices()
            ]  # fmt: skip
        except pd.PageDiffError as e:
            log.error(
                "checkpoint %d part %d rejected: %s; image stays at checkpoint %d",
                m.epoch,
                m.part,
                e,
                self.committed,
            )
            return self._reject(m.epoch, m.part, str(e))
        if m.epoch and self.disk is not None:
            try:  # the disk's epoch N, durably, before RAM N commits and is acknowledged
                self.disk.commit(m.epoch)
            except DiskError as e:
                log.error("checkpoint %d rejected: its disk epoch: %s", m.epoch, e)
                return self._reject(m.epoch, m.part, f"disk: {e}")
        for batch in staged:
            batch.commit()
        if m.epoch == 0:
            self.precopied += m.count
        else:
            write_atomic(self.state_path, bytes(m.state))
            self.committed = m.epoch
            self.commits += 1
            self.outputs_tail += [(m.epoch, seq, payload) for seq, payload in m.outputs]
            del self.outputs_tail[:-TAIL_OUTPUTS]
            if self.link:
                self.link.committed[0] = m.epoch
        return wire.Ack(m.epoch, m.part)

    # -- running -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peer = self.link.peer if self.link else None
        return {
            "role": "secondary",
            "pair": self.cfg.pair.name,
            "node": self.cfg.node.name,
            "generation": self.generation,
            "committed": self.committed,
            "image": str(self.image.path),
            "state": str(self.state_path),
            "session": self.session.node if self.session else None,
            "primary": self.primary,
            "precopied_pages": self.precopied,
            "commits": self.commits,
            "rejected": self.rejected,
            "pid": os.getpid(),
            "heartbeat_age_s": peer.age() if peer else None,
            "last_outputs": [[s, p.decode(errors="replace")] for _, s, p in self.outputs_tail[-5:]],
            **({"disk": self.disk.summary()} if self.disk else {}),
            **self.extra_status(),
        }

    def write_status(self) -> None:
        write_json(self.state_dir / "status.json", self.status())
        self._status_at = time.monotonic()

    def serve(self, stop: threading.Event, tick: Callable[[], bool] = lambda: False) -> None:
        """Serve the primary until ``stop`` is set or ``tick()`` (called at least
        every 50 ms) returns True."""
        link_cfg = self.cfg.link
        deadline = time.monotonic() + 10
        while True:  # after a switchover the ports' old holder may still be letting go
            try:
                self.link = Link.server(
                    Endpoint(link_cfg.host, link_cfg.data_port, link_cfg.heartbeat_port),
                    self.cfg.node.name,
                    heartbeat_interval=link_cfg.heartbeat_interval_ms / 1000,
                )
                break
            except ConnectionError:
                if time.monotonic() > deadline or stop.is_set():
                    raise
                time.sleep(0.1)
        log.info(
            "standby of pair %s listening on %s:%d, image %s (%d MiB reserved)",
            self.cfg.pair.name,
            link_cfg.host,
            link_cfg.data_port,
            self.image.path,
            self.ram_bytes >> 20,
        )
        try:
            self.write_status()
            while not stop.is_set() and not tick():
                try:
                    msg = self.link.recv(0.05)
                except wire.WireError as e:
                    log.error("frame rejected: %s; session reset", e)
                    reply: wire.Message | None = self._reject(0, 0, f"malformed frame: {e}")
                else:
                    reply = self.handle(msg) if msg is not None else None
                if reply is not None:
                    self.link.send(reply)
                    if isinstance(reply, wire.Ack):
                        self.last_ack_at = time.monotonic()
                if isinstance(reply, wire.Reject) or time.monotonic() - self._status_at > 0.2:
                    self.write_status()
        finally:
            self.write_status()
            self.link.close()

    def close(self, *, remove_image: bool = True) -> None:
        """Release the image (and remove it, unless a promoted guest now owns it)."""
        self.image.close(remove=remove_image)
        self.state_path.unlink(missing_ok=True)
