"""Host A killed at random moments while the guest's disk is written: B's disk, once
promoted, is byte for byte A's disk as of the checkpoint B committed.

Real processes (the C disk server on each side), real sockets, real SIGKILL.
MIRROR_DISK_KILLS=N runs N kills (default 30); the workloads rotate among
sequential 64 KiB writes, random 4 KiB writes (with TRIM, WRITE_ZEROES, FLUSH,
FUA) and a journal of FUA appends.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from mirror.replication.disk import DiskError
from tests.disk.harness import KEY, REC, Harness, differing_blocks

KILLS = int(os.environ.get("MIRROR_DISK_KILLS", "30"))
KINDS = ("seq", "rand4k", "journal")


@pytest.mark.parametrize("run", range(KILLS))
def test_kill_primary_disk_equals_committed_checkpoint(tmp_path: Path, run: int) -> None:
    kind = KINDS[run % len(KINDS)]
    rng = random.Random(run)
    # the journal's disk is small, so that its ring wraps on any machine (records k and
    # k + size/REC share an offset) and the check below meets the wrap every time
    h = Harness(tmp_path, seed=run, **({"size": 64 * REC} if kind == "journal" else {}))
    try:
        h.sync()
        assert h.b_img.read_bytes() == h.snaps[0], "the initial sync did not copy the disk"
        h.run_and_kill(kind, kill_after=rng.uniform(0.15, 0.7))
        if h.committed == 0:  # killed before any commit: B has no checkpoint to go on from
            with pytest.raises(DiskError, match="no committed checkpoint"):
                h.b.promote()
            return
        committed, dropped = h.b.promote()
        replica = h.b_img.read_bytes()
        assert committed in h.snaps, f"B committed {committed}, no copy of A at that checkpoint"
        want = h.snaps[committed]
        assert differing_blocks(replica, want) == 0, (
            f"{kind}: B's disk differs from A's at committed checkpoint {committed} in "
            f"{differing_blocks(replica, want)} blocks"
        )
        if kind == "journal":
            # every record whose "ok" was released (answered in an epoch <= committed) is on
            # B, unless a later released record of the ring took its offset (the journal
            # wraps its ring on a fast machine: records k and k + size/REC share an offset)
            newest: dict[int, int] = {}
            for k, epoch in h.journal_oks:
                if epoch <= committed:
                    newest[(k * REC) % h.size] = k
            for at, k in newest.items():
                on_b = struct.unpack("<Q", replica[at : at + 8])[0]
                assert on_b == k, f"journal {k} lost (offset {at} holds record {on_b})"
        # the promoted replica serves writes (the promoted guest goes on)
        assert h.b.status()["role"] == "primary"
        print(
            f"kill {run} ({kind}): committed {committed} of {h.epoch - 1} closed, "
            f"{dropped} uncommitted records dropped, A ahead by "
            f"{differing_blocks(h.a_img.read_bytes(), replica)} blocks"
        )
    finally:
        h.close()


def test_promoted_replica_protects_again_and_survives_a_second_kill(tmp_path: Path) -> None:
    """A dies; B, promoted, streams to a new replica on the same port (A back as the
    secondary) with a live copy; B dies in turn; the new replica, promoted, is B's disk at
    the checkpoint it committed."""
    from mirror.replication.disk import DiskSpec, ReplicatedDisk

    h = Harness(tmp_path, seed=11)
    try:
        h.sync()
        h.run_and_kill("rand4k", kill_after=0.3)
        first, _ = h.b.promote()
        # B is the primary now; a new replica takes the port B listened on
        a2 = ReplicatedDisk(DiskSpec(tmp_path / "a2.img", h.size, tmp_path / "a2", "killpair",
                                     listen=f"127.0.0.1:{h.port}", journal=tmp_path / "a2.journal",
                                     journal_bytes=32 << 20, session_key=KEY))  # fmt: skip
        try:
            second = h.next_pair(a2, tmp_path / "a2.img")
            second.sync()
            second.run_and_kill("seq", kill_after=0.3)
            committed, _ = a2.promote()
            assert committed >= 1 and committed in second.snaps
            assert differing_blocks(second.b_img.read_bytes(), second.snaps[committed]) == 0
            print(f"re-protected after promotion at {first}; second kill: committed {committed}")
        finally:
            a2.close()
    finally:
        h.close()
