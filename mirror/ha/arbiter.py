"""The arbiter: heartbeats on shared storage, and claims that only one node can win.

Two things live on storage both hosts see (NFS or a shared disk in
production, any directory in tests), beside the network path:

- a heartbeat slot per node, rewritten and fsynced every interval with a
  sequence number, its role, generation and last committed (or released)
  epoch.  A reader judges a slot's age by when its sequence number last
  changed on the reader's own clock, so hosts need no synchronised clocks
  (the slot's wall time is there for people reading it);
- ``claim(generation, node, action)``, which succeeds for exactly one caller
  per generation: the claim is a file created with O_CREAT|O_EXCL, atomic
  on POSIX filesystems and NFS.  A node that loses a claim must never
  release output again in that generation.

:class:`Arbiter` is the interface; :class:`DirectoryArbiter` is the default
for a pair; an etcd arbiter for pools can implement the same interface.
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


class ArbiterError(OSError):
    """The shared storage could not be used."""


@dataclass(frozen=True)
class Slot:
    node: str
    seq: int
    role: str
    generation: int
    epoch: int


@dataclass(frozen=True)
class ClaimResult:
    won: bool
    holder: str  # the node that holds the claim for this generation
    action: str


class Arbiter(ABC):
    @abstractmethod
    def beat(self, role: str, generation: int, epoch: int) -> None:
        """Write this node's heartbeat slot (raises ArbiterError if storage fails)."""

    # Slots are judged by when their sequence number last changed on this reader's
    # clock (no common clock needed); a backend only says how to load one.
    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}  # peer -> (seq, local time it changed)
        self._slots: dict[str, Slot] = {}

    @abstractmethod
    def _load_slot(self, peer: str) -> Slot | None:
        """The peer's slot as stored now (None: absent, unreadable or being replaced)."""

    def _read(self, peer: str) -> None:
        slot = self._load_slot(peer)
        if slot is None:
            return  # judged by its age
        last = self._seen.get(peer)
        if last is None or last[0] != slot.seq:
            self._seen[peer] = (slot.seq, time.monotonic())
        self._slots[peer] = slot

    def peer_age(self, peer: str) -> float | None:
        """Seconds since the peer's slot last changed, as seen here (None: never seen)."""
        self._read(peer)
        last = self._seen.get(peer)
        return None if last is None else time.monotonic() - last[1]

    def peer_slot(self, peer: str) -> Slot | None:
        """The peer's last slot content."""
        self._read(peer)
        return self._slots.get(peer)

    @abstractmethod
    def claim(self, generation: int, node: str, action: str) -> ClaimResult:
        """Claim ``generation`` for ``action``: exactly one caller per generation wins."""

    @abstractmethod
    def generation(self) -> int:
        """The pair's current generation as recorded on the arbiter (0: none)."""

    @abstractmethod
    def set_generation(self, generation: int) -> None:
        """Record the pair's new generation."""


class DirectoryArbiter(Arbiter):
    def __init__(self, root: Path, pair: str, node: str) -> None:
        self.dir = Path(root) / pair
        self.node = node
        self._seq = 0
        super().__init__()
        try:
            (self.dir / "claims").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArbiterError(
                f"cannot use {self.dir} as the arbiter directory: {e.strerror}"
            ) from e

    def _slot_path(self, node: str) -> Path:
        return self.dir / f"slot-{node}.json"

    def beat(self, role: str, generation: int, epoch: int) -> None:
        self._seq += 1
        body = json.dumps(
            {
                "node": self.node,
                "seq": self._seq,
                "time": time.time(),  # for people reading it: ages are judged by seq
                "role": role,
                "generation": generation,
                "epoch": epoch,
            }
        ).encode()
        path = self._slot_path(self.node)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            raise ArbiterError(f"heartbeat write to {path} failed: {e.strerror}") from e

    def _load_slot(self, peer: str) -> Slot | None:
        try:
            d = json.loads(self._slot_path(peer).read_bytes())
            return Slot(
                str(d["node"]), int(d["seq"]), str(d["role"]), int(d["generation"]), int(d["epoch"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def generation(self) -> int:
        """The pair's generation as last recorded here (0: none recorded)."""
        try:
            return int((self.dir / "generation").read_text())
        except (OSError, ValueError):
            return 0

    def set_generation(self, generation: int) -> None:
        """Record a new generation (a promoted node leads the pair under it)."""
        path = self.dir / "generation"
        tmp = path.with_name(f".generation.{self.node}.tmp")
        try:
            tmp.write_text(str(generation))
            os.replace(tmp, path)
        except OSError as e:
            raise ArbiterError(
                f"cannot record generation {generation} at {path}: {e.strerror}"
            ) from e

    def claim(self, generation: int, node: str, action: str) -> ClaimResult:
        path = self.dir / "claims" / f"generation-{generation}"
        body = json.dumps({"node": node, "action": action, "time": time.time()}).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                d = json.loads(path.read_bytes())
                return ClaimResult(d.get("node") == node, str(d.get("node")), str(d.get("action")))
            except (OSError, ValueError):
                # the winner is still writing its claim: it is not us
                return ClaimResult(False, "?", "?")
        except OSError as e:
            raise ArbiterError(
                f"claim of generation {generation} at {path} failed: {e.strerror}"
            ) from e
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return ClaimResult(True, node, action)
