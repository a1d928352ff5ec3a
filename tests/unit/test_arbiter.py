"""The directory arbiter: heartbeat slots and claims that exactly one caller wins."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest

from mirror.ha.arbiter import ArbiterError, DirectoryArbiter


def test_slot_age_follows_the_peer_writes(tmp_path: Path) -> None:
    a = DirectoryArbiter(tmp_path, "p", "A")
    b = DirectoryArbiter(tmp_path, "p", "B")
    assert b.peer_age("A") is None
    a.beat("primary", 3, 17)
    assert b.peer_age("A") is not None and b.peer_age("A") < 0.1
    slot = b.peer_slot("A")
    assert slot is not None and (slot.role, slot.generation, slot.epoch) == ("primary", 3, 17)
    raw = json.loads((tmp_path / "p" / "slot-A.json").read_text())
    assert raw["seq"] == 1 and abs(raw["time"] - time.time()) < 5
    time.sleep(0.2)
    assert b.peer_age("A") >= 0.2  # no new write: the slot ages
    a.beat("primary", 3, 18)
    assert b.peer_age("A") < 0.1


def _claimer(root: str, generation: int, node: str, q: multiprocessing.Queue) -> None:
    q.put((node, DirectoryArbiter(Path(root), "p", node).claim(generation, node, "x").won))


def test_exactly_one_claimer_wins_each_generation(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for generation in range(1, 41):
        q: multiprocessing.Queue = ctx.Queue()
        procs = [
            ctx.Process(target=_claimer, args=(str(tmp_path), generation, n, q))
            for n in ("A", "B", "C", "D")
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
        wins = [node for node, won in (q.get(timeout=5) for _ in procs) if won]
        assert len(wins) == 1, f"generation {generation}: winners {wins}"
    a = DirectoryArbiter(tmp_path, "p", "A")
    assert a.claim(41, "A", "promote").won
    again = a.claim(41, "A", "promote")
    assert again.won and again.holder == "A"  # asking again tells the same answer
    lost = a.claim(41, "B", "unprotected")
    assert not lost.won and lost.holder == "A" and lost.action == "promote"


def test_unusable_storage_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArbiterError, match=r"cannot use .* as the arbiter directory"):
        DirectoryArbiter(blocker, "p", "A")
    a = DirectoryArbiter(tmp_path, "p", "A")
    shutil.rmtree(tmp_path / "p")  # the storage goes away under the node
    (tmp_path / "p").write_text("not a directory")
    with pytest.raises(ArbiterError, match=r"heartbeat write .* failed"):
        a.beat("primary", 1, 1)
    with pytest.raises(ArbiterError, match=r"claim of generation 1 .* failed"):
        a.claim(1, "A", "promote")


def test_a_peer_is_seen_only_when_its_slot_changes_here_in_the_generation(
    tmp_path: Path,
) -> None:
    """Storage silence is evidence only about a slot this reader saw written (live) on
    this arbiter in this generation: not a slot never written here (a local folder of
    its own on each host), not a file left from an earlier run, not another generation."""
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shared.mkdir()
    elsewhere.mkdir()
    a = DirectoryArbiter(shared, "p", "A")
    b_alone = DirectoryArbiter(elsewhere, "p", "B")  # B's own local folder
    for _ in range(3):
        a.beat("primary", 4, 1)
        assert b_alone.peer_age("A") is None and not b_alone.peer_seen("A", 4)
    b = DirectoryArbiter(shared, "p", "B")
    assert b.peer_age("A") is not None
    assert not b.peer_seen("A", 4)  # a slot read once may be a leftover: not yet seen
    a.beat("primary", 3, 2)  # a change, but in another generation
    b.peer_age("A")
    assert not b.peer_seen("A", 4) and b.peer_seen("A", 3)
    a.beat("primary", 4, 3)
    assert not b.peer_seen("A", 4)  # judged as of the last read
    b.peer_age("A")
    assert b.peer_seen("A", 4)
    time.sleep(0.05)
    assert b.peer_age("A") >= 0.05 and b.peer_seen("A", 4)  # stays seen: silence is evidence
    c = DirectoryArbiter(shared, "p", "C")
    c.peer_age("A")
    assert c.peer_seen("A", 4) is False  # a new reader has seen no change yet
