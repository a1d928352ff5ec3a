"""The arbiter: heartbeats on shared storage, and claims that only one node can win.

Two things live on storage both hosts see (NFS or a shared disk in
production, any directory in tests), beside the network path:

- a heartbeat slot per node, rewritten and fsynced every interval with a
  sequence number, its role, generation and last committed (or released)
  epoch.  A reader judges a slot's age by when its sequence number last
  changed on the reader's own clock, so hosts need no synchronised clocks
  (the slot's wall time is there for people reading it);
- ``claim(generation, node, action)``, which succeeds for exactly one caller
  per generation.  The claim is written whole to a file of the claimer's own,
  fsynced, then link()ed into place: link() fails with EEXIST when another
  claimer got there first (atomic on POSIX filesystems and NFS), so a claim
  file is never seen torn or empty and a failed write (ENOSPC, EIO) leaves no
  claim behind.  A node that loses a claim must never release output again in
  that generation.

Shared storage is not trusted: what is read from it is validated (a slot or
claim that is not what mirror writes is ignored as garbage, never a crash),
nothing in the pair's directory is followed if it is a symlink (every file is
opened relative to the directory's descriptor with O_NOFOLLOW), and storage
errors are :class:`ArbiterError`, which the roles survive.  ``arbiter.dir``
itself must exist (a missing mount is an error naming it); only the pair's
subdirectory in it is created.

:class:`Arbiter` is the interface; :class:`DirectoryArbiter` is the default
for a pair; mirror/ha/etcd_arbiter.py implements it on etcd.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_RECORD = 4096  # a slot or claim is ~150 bytes; anything larger is garbage
MAX_NUMBER = 2**63 - 1


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
        # peer -> the generations in which this reader saw its slot change (it wrote here,
        # live, while this reader watched): the only slots whose silence is evidence
        self._live: dict[str, set[int]] = {}

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
            if last is not None:  # a change seen here, not a file left from any earlier run
                live = self._live.setdefault(peer, set())
                live.add(slot.generation)
                if len(live) > 8:  # storage is not trusted: keep what can matter, bounded
                    live.discard(min(live))
        self._slots[peer] = slot

    def peer_seen(self, peer: str, generation: int) -> bool:
        """Whether this reader has seen ``peer``'s slot change on this arbiter in
        ``generation`` (at least two different sequence numbers read, the later one
        written in that generation).  Until then the peer's storage silence is no
        evidence of anything: the two nodes may not share this arbiter at all (each a
        local folder of its own), and a claim won here would prove nothing
        (docs/ARCHITECTURE.md, "one primary").  As of the last read (peer_age, peer_slot):
        the failover's tick reads the slot once for both."""
        return generation in self._live.get(peer, ())

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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number mirror writes")


def _record(data: bytes) -> dict[str, Any] | None:
    """A JSON object as mirror writes them, or None for anything else (too large,
    not UTF-8, not JSON, NaN or Infinity, nested too deep, not an object)."""
    if len(data) > MAX_RECORD:
        return None
    try:
        d = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return d if isinstance(d, dict) else None


def _count(v: Any) -> int | None:
    """A sequence number, generation or epoch: a JSON integer in 0..2**63-1 (not a float
    such as 1e400, not a bool, not a string)."""
    return v if type(v) is int and 0 <= v <= MAX_NUMBER else None


def _name(v: Any) -> str | None:
    return v if isinstance(v, str) and 0 < len(v) <= 256 and v.isprintable() else None


def parse_slot(data: bytes, peer: str) -> Slot | None:
    """``peer``'s heartbeat slot from stored bytes; None if they are not one (garbage)."""
    d = _record(data)
    if d is None or d.get("node") != peer:
        return None
    seq, gen, epoch = _count(d.get("seq")), _count(d.get("generation")), _count(d.get("epoch"))
    role = _name(d.get("role"))
    if seq is None or gen is None or epoch is None or role is None:
        return None
    return Slot(peer, seq, role, gen, epoch)


def parse_claim(data: bytes) -> tuple[str, str] | None:
    """(node, action) of a stored claim; None if the bytes are not a claim mirror wrote."""
    d = _record(data)
    if d is None:
        return None
    node, action = _name(d.get("node")), _name(d.get("action"))
    return None if node is None or action is None else (node, action)


def parse_generation(data: bytes) -> int:
    """A recorded generation (decimal, 1..2**62); 0 for garbage."""
    text = data.strip()
    if not text.isdigit() or len(text) > 19:
        return 0
    g = int(text)
    return g if 1 <= g <= 2**62 else 0


def _component(what: str, name: str) -> str:
    """``name`` as one path component (a pair's or node's name is a file name here)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ArbiterError(f"{what} {name!r} cannot be a file name in the arbiter directory")
    return name


class DirectoryArbiter(Arbiter):
    """The arbiter in a directory both hosts see: ``ROOT/PAIR/slot-NODE.json``,
    ``ROOT/PAIR/generation`` and ``ROOT/PAIR/claims/generation-G``.  ``ROOT`` must
    exist (it is the shared mount); ``PAIR`` and ``claims`` are created in it."""

    def __init__(self, root: Path, pair: str, node: str, *, prepare: bool = True) -> None:
        """``prepare``: check now that ``root`` exists and create the pair's directory
        in it (a role does at start; later a storage failure is an ArbiterError of
        the operation that meets it, which the role survives)."""
        self.root = Path(root)
        self.pair = _component("pair name", pair)
        self.node = _component("node name", node)
        self.dir = self.root / pair
        self._seq = 0
        super().__init__()
        if prepare:
            self.prepare()

    def prepare(self) -> None:
        """Check that the arbiter directory exists; create PAIR and PAIR/claims in it."""
        try:
            rfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ArbiterError(
                f"cannot use {self.root} as the arbiter directory: it does not exist. It is "
                f"the storage both hosts share: mount it there (or create it); mirror "
                f"creates only the pair's directory {self.pair!r} inside it"
            ) from None
        except OSError as e:
            raise ArbiterError(
                f"cannot use {self.root} as the arbiter directory: {e.strerror}"
            ) from e
        try:
            self._mkdir(rfd, self.pair, self.dir)
            with self._pair_fd() as d:
                self._mkdir(d, "claims", self.dir / "claims")
        finally:
            os.close(rfd)

    def _mkdir(self, dfd: int, name: str, path: Path) -> None:
        try:
            os.mkdir(name, 0o755, dir_fd=dfd)
        except FileExistsError:
            pass
        except OSError as e:
            raise ArbiterError(
                f"cannot use {self.root} as the arbiter directory: cannot create {path}: "
                f"{e.strerror}"
            ) from e

    @contextmanager
    def _pair_fd(self, sub: str = "") -> Iterator[int]:
        """A descriptor of the pair's directory (or of ``sub`` in it), opened afresh
        (a remounted share is seen) and never through a symlink."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        where = self.dir
        try:
            rfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = os.open(self.pair, flags, dir_fd=rfd)
            finally:
                os.close(rfd)
            if sub:
                where = self.dir / sub
                try:
                    sfd = os.open(sub, flags, dir_fd=fd)
                finally:
                    os.close(fd)
                fd = sfd
        except OSError as e:
            why = e.strerror
            with suppress(OSError):  # O_DIRECTORY|O_NOFOLLOW says ENOTDIR or ELOOP for a link
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                    os.lstat(where).st_mode
                ):
                    why = "a symlink (not followed)"
            raise ArbiterError(f"cannot open the arbiter directory {where}: {why}") from e
        try:
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _write_new(dfd: int, name: str, body: bytes) -> None:
        """Create ``name`` afresh in ``dfd`` (never through a symlink), write ``body``
        and fsync it; on any failure nothing of it is left behind."""
        with suppress(FileNotFoundError):  # a leftover, or a planted link (never followed)
            os.unlink(name, dir_fd=dfd)
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=dfd,
        )
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            with suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
        os.close(fd)

    @staticmethod
    def _read_file(dfd: int, name: str) -> bytes | None:
        """The bytes of regular file ``name`` in ``dfd`` (at most MAX_RECORD + 1 of
        them); None if it is absent.  Never follows a symlink, never blocks on a FIFO."""
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                dir_fd=dfd,
            )
        except FileNotFoundError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""  # a FIFO, device or directory: garbage
            return os.read(fd, MAX_RECORD + 1)
        finally:
            os.close(fd)

    def _replace(self, name: str, body: bytes, what: str) -> None:
        """Replace ``name`` in the pair's directory by ``body``, whole and fsynced."""
        path = self.dir / name
        tmp = f".{name}.{self.node}.tmp"
        try:
            with self._pair_fd() as d:
                self._write_new(d, tmp, body)
                os.replace(tmp, name, src_dir_fd=d, dst_dir_fd=d)  # a link there is replaced
        except ArbiterError as e:
            raise ArbiterError(f"{what} {path} failed: {e}") from e
        except OSError as e:
            raise ArbiterError(f"{what} {path} failed: {e.strerror}") from e

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
        self._replace(f"slot-{self.node}.json", body, "heartbeat write to")

    def _load_slot(self, peer: str) -> Slot | None:
        try:
            with self._pair_fd() as d:
                data = self._read_file(d, f"slot-{peer}.json")
        except (OSError, ValueError):  # ArbiterError is an OSError; ValueError: a NUL
            return None
        return None if data is None else parse_slot(data, peer)

    def generation(self) -> int:
        """The pair's generation as last recorded here (0: none recorded, or garbage)."""
        try:
            with self._pair_fd() as d:
                data = self._read_file(d, "generation")
        except OSError:
            return 0
        return 0 if data is None else parse_generation(data)

    def set_generation(self, generation: int) -> None:
        """Record a new generation (a promoted node leads the pair under it)."""
        self._replace(
            "generation", str(generation).encode(), f"recording generation {generation} at"
        )

    def claim(self, generation: int, node: str, action: str) -> ClaimResult:
        """Write the claim whole to a file of our own, fsync it, then link() it into
        place: EEXIST means someone holds the generation (read and validate theirs)."""
        name = f"generation-{generation}"
        path = self.dir / "claims" / name
        body = json.dumps({"node": node, "action": action, "time": time.time()}).encode()
        tmp = f".{name}.{_component('node name', node)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            with self._pair_fd("claims") as d:
                self._write_new(d, tmp, body)  # ENOSPC, EIO, EROFS: no claim left behind
                try:
                    os.link(tmp, name, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
                except FileExistsError:
                    return self._holder(d, name, path, node)
                finally:
                    with suppress(OSError):
                        os.unlink(tmp, dir_fd=d)
                os.fsync(d)  # the link is durable before the win is acted on (asked
                # again after a failure here, the claim is found to be ours)
        except ArbiterError as e:
            raise ArbiterError(f"claim of generation {generation} at {path} failed: {e}") from e
        except OSError as e:
            raise ArbiterError(
                f"claim of generation {generation} at {path} failed: {e.strerror}"
            ) from e
        return ClaimResult(True, node, action)

    def _holder(self, d: int, name: str, path: Path, node: str) -> ClaimResult:
        """The result of a claim that someone already holds (perhaps this node, asking
        again).  A claim that cannot be read now is an error (ask again later); one that
        is not a claim mirror wrote (mirror's appear whole) is nobody's: lost, as it
        cannot be told whose it is, and the holder says which file to look at."""
        try:
            data = self._read_file(d, name)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            data = b""  # a planted symlink: garbage
        if data is None:
            raise ArbiterError(f"claim {path} vanished while it was being read")
        held = parse_claim(data)
        if held is None:
            return ClaimResult(
                False, f"nobody (invalid claim file {path}: not written by mirror)", "?"
            )
        return ClaimResult(held[0] == node, held[0], held[1])
