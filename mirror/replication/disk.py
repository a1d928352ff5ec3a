"""The guest's disk, replicated per epoch: a role's commands to its disk server's
replication (the epoch engine and the standby drive them, as they drive RAM's).

The disk server (native/diskserver.c and its parts; its process and NBD export, the
guest's device, are mirror.guests.disk) writes the local image on the primary and
streams every change to the secondary's server as it happens;
:meth:`ReplicatedDisk.barrier` closes an epoch inside the checkpoint's pause (after QMP
``stop`` drained the guest's I/O).  On the secondary it journals the stream;
:meth:`ReplicatedDisk.commit` applies epoch N (durably) when checkpoint N commits,
before the ack; :meth:`ReplicatedDisk.promote` drops every uncommitted epoch.

Why a socket of the server's own rather than the zmq interconnect: the records
are produced by C threads on the guest's I/O path; sending them through the
role's Python would put a per-write Python step back on that path.  The stream
is under the pair's keys all the same: both roles derive a key for each pairing
session from their CurveZMQ key pairs (:func:`session_key`) and hand it, with the
pair's generation, to their disk server on its control socket
(:meth:`ReplicatedDisk.session`); a connection that does not prove it is refused, and
the records go under AES-256-GCM (docs/security.md).  The secondary also refuses
another pair, another generation than its own role's, or another disk size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mirror.guests.disk import DiskError, DiskServer, DiskSpec

__all__ = ["DiskError", "DiskSpec", "ReplicatedDisk", "replicated", "session_key"]


def session_key(
    secret: bytes | None,
    peer: bytes | None,
    pair: str,
    generation: int,
    session: int,
    *,
    stream: bytes = b"mirror disk stream 1",
) -> bytes:
    """The disk stream's key for one pairing session, which both hosts derive on their own:
    HMAC-SHA256 of X25519(this host's CurveZMQ secret key, the peer's public key) over the
    pair, the generation and the interconnect session (a random number the primary's HELLO
    carries under CurveZMQ).  Keys are z85 (40 characters) or raw (32 bytes); both None:
    an insecure pair (no keys), whose stream proves only the session number.  ``stream``
    names what the key is for (the disk stream's, or the checkpoint pages' of
    mirror.replication.pagecrypt): one derivation, a key of its own for each."""
    from mirror._diskserver import ffi, lib  # type: ignore[import-not-found]

    def raw(k: bytes) -> bytes:
        if len(k) == 40:
            from zmq.utils import z85

            k = z85.decode(k)
        if len(k) != 32:
            raise DiskError("a CurveZMQ key is 32 bytes (40 in z85)")
        return k

    ctx = stream + b"\0" + pair.encode() + b"\0"
    ctx += generation.to_bytes(8, "little") + (session & (2**64 - 1)).to_bytes(8, "little")
    out = ffi.new("unsigned char[32]")
    if secret is None or peer is None:
        rc = lib.mirror_disk_session_key(ffi.NULL, ffi.NULL, ctx, len(ctx), out)
    else:
        rc = lib.mirror_disk_session_key(raw(secret), raw(peer), ctx, len(ctx), out)
    if rc:
        raise DiskError("cannot derive the disk stream's session key from the CurveZMQ keys")
    return bytes(ffi.buffer(out, 32))


class ReplicatedDisk(DiskServer):
    """A running disk server, with the commands of its replication: the one the
    backends start for a guest's disk (and tests and benches for a pair of them)."""

    def __init__(self, spec: DiskSpec, *, timeout: float = 10.0) -> None:
        super().__init__(spec, timeout=timeout)
        if spec.session_key is not None:
            try:
                self.session(spec.session_key, spec.generation)
            except BaseException:
                self.close()
                raise

    def session(self, key: bytes, generation: int) -> None:
        """The pairing session's stream key (32 bytes, :func:`session_key`) and the pair's
        generation (the arbiter's): a replica takes only a stream that proves this key
        and names this generation; a primary proves it when it next replicates."""
        if len(key) != 32 or generation < 1:
            raise DiskError("a disk session is a 32-byte key and a generation >= 1")
        self.call(f"session {key.hex()} {generation}")

    # -- the primary -----------------------------------------------------------------

    def replicate(self, host: str, port: int, first_epoch: int, *, resync: bool = False) -> None:
        """Start streaming to the secondary's server, with a live copy of the whole disk;
        ``resync``: only the blocks its replica lacks (DiskError if this server cannot
        tell which, or the replica does not hold this server's disk: copy it all then).
        A promoted replica's server, asked for a resync, offers its old primary's image a
        hashsync instead: both hash every block, and the blocks that differ (and those
        written since promotion) are sent; the hashing runs after this returns (status
        ``peer`` true, ``synced`` false, as during any copy)."""
        self.call(f"replicate {host} {port} {first_epoch}{' resync' if resync else ''}")

    def committed(self, epoch: int) -> None:
        """The secondary acknowledged checkpoint ``epoch``: its replica holds the disk's
        epochs <= ``epoch`` (what a resync after a break needs to send shrinks)."""
        self.call(f"committed {epoch}")

    def wait_synced(
        self, timeout: float = 600.0, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Until the initial copy is done (``progress(done, total)`` as it goes)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if progress:
                progress(st["sync_bytes"], st["sync_total"])
            if st["synced"]:
                return
            if not st["peer"]:
                raise DiskError(f"the disk stream to the secondary ended: {st['lost']}")
            if time.monotonic() > deadline:
                raise DiskError(f"the initial disk sync did not finish in {timeout:g} s")
            time.sleep(0.05)

    def barrier(self, epoch: int) -> str | None:
        """Close epoch ``epoch`` (in the checkpoint's pause); None, or why the
        disk is not replicated (the guest's I/O goes on either way)."""
        try:
            self.call(f"barrier {epoch}")
        except DiskError as e:
            return str(e)
        return None

    # -- the secondary ---------------------------------------------------------------

    def commit(self, epoch: int, timeout_ms: int = 10_000) -> None:
        """Apply epochs <= ``epoch`` to the replica, fdatasync; DiskError if it cannot."""
        self.call(f"commit {epoch} {timeout_ms}", timeout=timeout_ms / 1000 + 30)

    def promote(self) -> tuple[int, int]:
        """Drop every uncommitted epoch and serve the replica read-write:
        (the committed epoch, the records dropped)."""
        committed, dropped = self.call("promote").split()
        return int(committed), int(dropped)

    def summary(self) -> dict[str, Any]:
        """For the role's status file: the disk's replication, in a few fields."""
        try:
            st = self.status()
        except DiskError as e:
            return {"error": str(e)}
        keys = ("role", "synced", "peer", "lost", "writes", "write_bytes", "committed",
                "consistent", "journal_used", "journal_size", "dropped_records",
                "storage", "storage_error", "failovers", "switchbacks", "dirty_local",
                "known", "dirty_peer", "resync_blocks", "generation", "session_key",
                "refused_connections")  # fmt: skip
        return {k: st[k] for k in keys}


def replicated(disk: DiskServer) -> ReplicatedDisk:
    """A guest's disk server (its device, as the guest holds it) as its replication's
    handle: every one the backends start is a :class:`ReplicatedDisk`."""
    if not isinstance(disk, ReplicatedDisk):
        raise TypeError(f"the guest's disk server is not replicated: {disk!r}")
    return disk
