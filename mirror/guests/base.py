"""The Guest interface: what the checkpoint engine and the standby need of a VM.

A guest has RAM that mirror can map (a shared file), can be paused and
resumed, can save its device state while paused, can be launched on another
host from a RAM image and a device state (a backend's ``launch_from``), and
hands its outputs to a handler.  Backends (synthetic today; qemu and libvirt
next) implement it.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mirror.guests.disk import DiskServer


class GuestError(RuntimeError):
    """A guest could not be started, paused, resumed or saved."""


@dataclass(frozen=True)
class GuestOutput:
    """One output of the guest, as it left the guest (before output commit)."""

    seq: int
    payload: bytes
    produced_at: float  # time.monotonic() when mirror received it


OutputHandler = Callable[[GuestOutput], None]


@dataclass(frozen=True)
class LogSource:
    """Where the role gets a userfaultfd of the process that writes guest RAM
    (mirror/guests/uffd.py), for the dirty-page log."""

    pid: int
    socket: str  # a path, or "@name" for an abstract unix socket; "": made by injection


class Guest(ABC):
    """One running guest on this host."""

    kind: ClassVar[str]
    disk: DiskServer | None = None  # its disk server, if it has a replicated disk

    @property
    @abstractmethod
    def ram(self) -> mmap.mmap:
        """The guest's RAM, mapped shared: what the scans read."""

    @property
    @abstractmethod
    def ram_path(self) -> Path:
        """The file that backs the guest's RAM."""

    @abstractmethod
    def pause(self) -> None:
        """Stop the guest; returns only once it no longer touches RAM and every
        output it produced before stopping has been handed to the handler."""

    @abstractmethod
    def resume(self) -> None:
        """Let a paused guest run again."""

    @abstractmethod
    def save_state(self) -> bytes:
        """The device/CPU state of a paused guest (no RAM)."""

    @abstractmethod
    def stop(self) -> None:
        """End the guest and release what it holds (idempotent)."""

    def detach(self) -> None:
        """Let go of the guest, leaving it running where the backend can (a libvirt domain
        goes on under libvirt); by default it stops."""
        self.stop()

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Whether the guest is still there (not crashed or stopped)."""

    def end_reason(self) -> str | None:
        """None while the guest runs; else how it ended: "shutdown" (the guest powered
        itself off: not a host failure, its standby must not bring it back), or another
        word ("killed", "crashed", "unknown") for an end a failover answers."""
        return None if self.alive else "unknown"

    def log_source(self) -> LogSource | None:
        """The process whose writes to RAM a dirty-page log must see, and where it
        hands out userfaultfds; None if this guest cannot have the log."""
        return None

    def ram_discarded(self) -> bool:
        """Whether the hypervisor may have discarded guest pages since the last call,
        unseen by a dirty-page log (a balloon that changed size): the next checkpoint then
        compares all of RAM.  Asked after a checkpoint's resume, never in the pause."""
        return False

    def discards_ram(self) -> bool:
        """Whether the hypervisor may punch holes in this guest's RAM at any time (a
        balloon moving its pages): a page the safety net finds changed to zero behind
        the log is then such a hole (sent all the same), not a page the log missed."""
        return False

    def output_faults(self) -> list[str]:
        """What keeps this guest's outputs from passing output commit as they should,
        found while it runs (a libvirt domain's broken NIC gate); empty while all is
        well.  Cheap: for a role's status."""
        return []
    def throttle_blocker(self) -> str | None:
        """None if this guest can be slowed (checkpoint.max_pause_ms, the throttle),
        else why not: one line for the operator.  Asked once, when a pairing starts."""
        return f"the {self.kind} guest has no way to be slowed"

    def set_speed(self, speed: float) -> None:
        """Let the guest run at ``speed`` (0 < speed <= 1) of its full speed; 1 releases
        it.  Called after a checkpoint's resume, never in the pause."""
        raise GuestError(self.throttle_blocker() or f"the {self.kind} guest cannot be slowed")

    def log_blockers(self) -> list[str]:
        """What this guest has that changes RAM behind a dirty-page log's back
        (a balloon, virtio-mem, discard of RAM, vhost-user): the log is refused."""
        return []
