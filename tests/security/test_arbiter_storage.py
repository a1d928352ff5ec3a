"""The arbiter on storage that fails or lies: a small tmpfs that fills up or goes
read-only (real ENOSPC and EROFS), slots and claims holding garbage, symlinks
planted in the shared directory, and a shared directory that is not there.

The first tests drive the arbiter directly on the real filesystem; the pair tests
run real hosts (each `mirror` role its own process group) whose arbiter is on the
failing storage, and check that no agent dies, the standby image stays, and the
generation a failed claim was for can still be won.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mirror import config as config_mod
from mirror.config import KeysConfig, MetricsConfig
from mirror.ha.arbiter import ArbiterError, DirectoryArbiter
from mirror.lab.demo import Host
from tests.integration.conftest import SMALL, Pair, shm_files


class Tmpfs:
    """A tmpfs of ``size`` mounted at ``path`` (unmounted by the fixture, always)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {run.stderr.strip()}")
        self.mounted = True

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Fill it to the last byte; returns the filler (remove it to free the space)."""
        filler = self.path / "filler"
        with open(filler, "wb", buffering=0) as f:
            for size in (65536, 512):  # then the last partial chunk
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)
        with pytest.raises(OSError) as e:  # really full
            (self.path / "probe").write_bytes(b"x" * 4096)
        assert e.value.errno == errno.ENOSPC
        (self.path / "probe").unlink(missing_ok=True)
        return filler

    def umount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, str], Tmpfs]]:
    made: list[Tmpfs] = []

    def mount(path: Path, size: str = "512k") -> Tmpfs:
        t = Tmpfs(path, size)
        made.append(t)
        return t

    try:
        yield mount
    finally:
        for t in reversed(made):
            t.umount()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# -- the arbiter itself, on real failing storage ---------------------------------------------


def test_full_storage_fails_slot_and_claim_writes_and_blocks_nothing(tmp_path, tmpfs) -> None:
    fs = tmpfs(tmp_path / "shared")
    a = DirectoryArbiter(fs.path, "p", "A")
    b = DirectoryArbiter(fs.path, "p", "B")
    a.beat("primary", 1, 7)
    assert b.peer_slot("A") is not None
    filler = fs.fill()

    with pytest.raises(ArbiterError, match=r"heartbeat write to .*slot-A.json failed: No space"):
        a.beat("primary", 1, 8)
    slot = b.peer_slot("A")  # the last whole slot is still there
    assert slot is not None and slot.epoch == 7
    with pytest.raises(ArbiterError, match=r"claim of generation 1 at .* failed: No space"):
        b.claim(1, "B", "promote")
    with pytest.raises(ArbiterError, match=r"recording generation 2 at .* failed: No space"):
        b.set_generation(2)
    claims = fs.path / "p" / "claims"
    assert list(claims.iterdir()) == [], "a failed claim left a file behind"
    assert leftovers(fs.path / "p") == []

    filler.unlink()  # space again: the generation is not blocked, and has one winner
    assert b.claim(1, "B", "promote").won
    lost = a.claim(1, "A", "unprotected")
    assert not lost.won and (lost.holder, lost.action) == ("B", "promote")
    assert [p.name for p in claims.iterdir()] == ["generation-1"]


def test_read_only_storage_is_an_error_not_a_crash(tmp_path, tmpfs) -> None:
    fs = tmpfs(tmp_path / "shared")
    a = DirectoryArbiter(fs.path, "p", "A")
    b = DirectoryArbiter(fs.path, "p", "B")
    a.beat("primary", 1, 1)
    fs.remount("ro")
    with pytest.raises(ArbiterError, match="Read-only file system"):
        a.beat("primary", 1, 2)
    with pytest.raises(ArbiterError, match="Read-only file system"):
        b.claim(1, "B", "promote")
    assert b.peer_age("A") is not None  # reading still works
    fs.remount("rw")
    assert b.claim(1, "B", "promote").won


GARBAGE: list[bytes] = [
    b'{"node": "A", "seq": 1e400, "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": -1, "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": "5", "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": true, "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": NaN, "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": 2, "role": ["x"], "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": 2, "role": "primary", "generation": 1e400, "epoch": 1}',
    b'{"node": "A", "seq": 2, "role": "primary", "generation": 1, "epoch": 99999999999999999999}',
    b'{"node": "Z", "seq": 3, "role": "primary", "generation": 1, "epoch": 1}',
    b'{"node": "A", "seq": 4',
    b"\xff\xfe\x00garbage",
    b'{"node": "A\xff", "seq": 4, "role": "primary", "generation": 1, "epoch": 1}',
    b"[1, 2, 3]",
    b"[" * 100_000,
    b" " * 100_000,
    b"",
    b"null",
]


def test_garbage_slots_claims_and_generations_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    b = DirectoryArbiter(tmp_path / "shared", "p", "B")
    pdir = tmp_path / "shared" / "p"
    for junk in GARBAGE:
        (pdir / "slot-A.json").write_bytes(junk)
        assert b.peer_slot("A") is None, junk[:80]
        assert b.peer_age("A") is None, junk[:80]
        (pdir / "generation").write_bytes(junk)
        assert b.generation() == 0
    (pdir / "slot-A.json").unlink()
    os.mkfifo(pdir / "slot-A.json")  # a FIFO: reading it must not block
    assert b.peer_age("A") is None
    os.unlink(pdir / "slot-A.json")
    (pdir / "slot-A.json").mkdir()
    assert b.peer_age("A") is None
    (pdir / "slot-A.json").rmdir()
    DirectoryArbiter(tmp_path / "shared", "p", "A").beat("primary", 4, 9)
    slot = b.peer_slot("A")  # a good slot after garbage is read
    assert slot is not None and (slot.seq, slot.generation, slot.epoch) == (1, 4, 9)
    for junk in (b"99999999999999999999999", b"-3", b"0", b"1e400", b"\xff"):
        (pdir / "generation").write_bytes(junk)
        assert b.generation() == 0
    b.set_generation(7)
    assert b.generation() == 7

    # a claim file mirror did not write (its claims appear whole): nobody's, and safe
    for g, junk in enumerate(GARBAGE, start=1):
        (pdir / "claims" / f"generation-{g}").write_bytes(junk)
        res = b.claim(g, "B", "promote")
        assert not res.won and "invalid claim file" in res.holder, junk[:80]


def test_symlinks_in_the_shared_directory_are_never_followed(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    a = DirectoryArbiter(shared, "p", "A")
    b = DirectoryArbiter(shared, "p", "B")
    pdir = shared / "p"
    other = tmp_path / "other-slot.json"
    other.write_text(
        json.dumps({"node": "B", "seq": 5, "role": "primary", "generation": 1, "epoch": 1})
    )
    planted = {
        pdir / "slot-A.json": outside,  # what A rewrites
        pdir / ".slot-A.json.A.tmp": outside,  # A's temporary file
        pdir / "generation": outside,
        pdir / ".generation.A.tmp": outside,
        pdir / "slot-B.json": other,  # what A reads: a valid slot, but through a link
        pdir / "claims" / "generation-2": outside,
    }
    for link, target in planted.items():
        link.symlink_to(target)

    a.beat("primary", 1, 1)
    a.set_generation(3)
    assert a.peer_slot("B") is None  # not read through the link
    assert not (pdir / "slot-A.json").is_symlink() and b.peer_slot("A") is not None
    assert not (pdir / "generation").is_symlink() and b.generation() == 3
    res = a.claim(2, "A", "promote")  # the linked claim is garbage: nobody wins it
    assert not res.won and "invalid claim file" in res.holder
    assert outside.read_text() == "keep me"

    # the pair's directory or its claims directory replaced by a link: an error, not followed
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "claims").mkdir(parents=True)
    (shared / "q").symlink_to(elsewhere)
    with pytest.raises(ArbiterError, match=r"shared/q: a symlink \(not followed\)"):
        DirectoryArbiter(shared, "q", "A")
    (pdir / "claims").rename(pdir / "claims.old")
    (pdir / "claims").symlink_to(elsewhere / "claims")
    with pytest.raises(ArbiterError, match=r"claims: a symlink \(not followed\)"):
        a.claim(5, "A", "promote")
    assert list((elsewhere / "claims").iterdir()) == []


def test_a_missing_arbiter_directory_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nfs-not-mounted"
    with pytest.raises(ArbiterError, match=rf"cannot use {missing} as the arbiter directory: it"):
        DirectoryArbiter(missing, "p", "A")
    assert not missing.exists()


def test_a_missing_arbiter_directory_stops_an_agent_at_start(
    tmp_path: Path, pair_name: str, no_leftovers: None
) -> None:
    missing = tmp_path / "nfs-not-mounted"
    cfg = replace(
        SMALL,
        pair=replace(SMALL.pair, name=pair_name),
        node=replace(SMALL.node, name="hostB", state_dir=str(tmp_path / "hostB")),
        arbiter=replace(SMALL.arbiter, dir=str(missing)),
        keys=KeysConfig(insecure=True),  # keys are not this test's point
        metrics=MetricsConfig(listen=""),
    )
    path = tmp_path / "b.toml"
    path.write_text(config_mod.to_toml(cfg))
    for role in ("secondary", "primary"):
        run = subprocess.run(
            [sys.executable, "-m", "mirror", role, "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        assert f"cannot use {missing} as the arbiter directory: it does not exist" in run.stderr
        assert not missing.exists(), "the missing arbiter directory was created"
    assert not shm_files(pair_name)


# -- real hosts whose arbiter fails --------------------------------------------------------


def _log(host: Host) -> str:
    return host.log_path.read_text(errors="replace")


def _image(host: Host) -> Path:
    st = host.status() or {}
    return Path(str(st["image"]))


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_claim_on_failing_storage_keeps_the_standby_then_promotes(
    pair: Pair, tmpfs, fault: str
) -> None:
    # the claims directory is its own small tmpfs: slots are written fine, claims fail
    claims = Path(pair.cfg_b.arbiter.dir) / pair.cfg_b.pair.name / "claims"
    fs = tmpfs(claims, "64k")
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    image = _image(b)
    filler = fs.fill() if fault == "full" else None
    if fault == "read-only":
        fs.remount("ro")
    a.signal(signal.SIGKILL)  # the primary host dies: B must claim, and cannot
    a.proc.wait()
    pair.wait("B to try the claim", lambda: "claim-failed" in _log(b), alive=[b])
    time.sleep(1.5)  # it keeps trying, and lives
    assert b.proc.poll() is None, f"the secondary died:\n{b.log_tail()}"
    assert (b.status() or {}).get("role") == "secondary"
    assert image.exists(), "the standby image was deleted"
    why = "No space left on device" if fault == "full" else "Read-only file system"
    assert why in _log(b)
    assert _log(b).count('"claim-failed"') == 1, "the same failure is logged once"

    if filler is not None:
        filler.unlink()
    else:
        fs.remount("rw")
    st = pair.wait(
        "B to win the claim and promote",
        lambda: (s := b.status()) and s.get("role") == "primary" and s,
        alive=[b],
    )
    assert st["generation"] == 2
    assert json.loads((claims / "generation-1").read_text())["node"] == "hostB"
    assert leftovers(claims) == []
    # B's sink talks to this test's observer: the connection B says it made is one this
    # observer accepted, and the position B went on from is the one it answered
    promoted = next(
        json.loads(line[line.index("{") :])
        for line in _log(b).splitlines()
        if '{"event": "promoted"' in line
    )
    answered = dict(pair.observer.accepted)
    assert ("127.0.0.1", promoted["observer_via_port"]) in answered, (promoted, answered)
    assert answered["127.0.0.1", promoted["observer_via_port"]] == promoted["observer_position"]
    count = pair.observer.count()
    pair.wait("the promoted guest's outputs", lambda: pair.observer.count() > count + 20, alive=[b])
    seen = pair.observer.seen
    assert seen.seqs == list(range(1, len(seen.seqs) + 1)), "outputs lost or repeated"


def test_pair_rides_out_read_only_storage_and_garbage_slots(pair: Pair, tmpfs) -> None:
    fs = tmpfs(Path(pair.cfg_a.arbiter.dir), "1m")
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    pdir = fs.path / pair.cfg_a.pair.name

    fs.remount("ro")  # both hosts' slot writes fail: both run on
    acked = (a.status() or {})["acked"]
    pair.wait("checkpoints on read-only storage", lambda: (a.status() or {})["acked"] > acked + 20)
    assert "storage-heartbeat-failing" in _log(a) and "storage-heartbeat-failing" in _log(b)
    fs.remount("rw")

    deadline = time.monotonic() + 2  # garbage written over both slots, again and again
    i = 0
    while time.monotonic() < deadline:
        for node in ("hostA", "hostB"):
            tmp = pdir / f".junk-{node}"
            tmp.write_bytes(GARBAGE[i % len(GARBAGE)].replace(b'"A', f'"{node}'.encode()))
            os.replace(tmp, pdir / f"slot-{node}.json")
        i += 1
        time.sleep(0.005)
    acked = (a.status() or {})["acked"]
    pair.wait("checkpoints after the garbage", lambda: (a.status() or {})["acked"] > acked + 10)
    assert a.proc.poll() is None and b.proc.poll() is None

    a.signal(signal.SIGKILL)  # and the arbiter still decides a failover
    a.proc.wait()
    pair.wait("B to promote", lambda: (s := b.status()) and s.get("role") == "primary", alive=[b])
