"""Parts of the dirty-page log: the table upkeep for the hashed fallback, finding a
RAM mapping, the kernel probe, and the refusals (the log itself: tests/integration/
test_dirtylog.py and tests/qemu/test_dirtylog_qemu.py)."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from mirror.guests.base import Guest, LogSource
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd

PS = pd.PAGE_SIZE


def _ram(npages: int, seed: int = 1) -> mmap.mmap:
    ram = pd.alloc_pages(npages)
    rng = random.Random(seed)
    for p in range(npages):
        if p % 3:  # every third page stays zero
            ram[p * PS : (p + 1) * PS] = rng.randbytes(PS)
    return ram


def test_table_set_from_what_was_sent_equals_the_hashed_scan() -> None:
    ram = _ram(64)
    want = bytearray(pd.hash_table_size(len(ram)))
    pd.scan_hashed(ram, want)
    got = bytearray(len(want))
    pd.hash_gathered(got, pd.gather(ram, range(0, 40)))
    pd.hash_pages(ram, range(40, 64), got)
    assert got == want
    assert list(pd.hash_verify(ram, got, 0, 64)) == []


def test_hash_verify_lists_changed_pages_and_leaves_the_table() -> None:
    ram = _ram(32)
    table = bytearray(pd.hash_table_size(len(ram)))
    pd.scan_hashed(ram, table)
    before = bytes(table)
    for p in (3, 17, 30):
        ram[p * PS + 5] ^= 0xFF
    assert list(pd.hash_verify(ram, table, 0, 32)) == [3, 17, 30]
    assert list(pd.hash_verify(ram, table, 4, 20)) == [17]
    assert bytes(table) == before
    with pytest.raises(pd.PageDiffError, match="outside"):
        pd.hash_verify(ram, table, 30, 3)


def test_hash_gathered_refuses_delta_pages() -> None:
    ram = _ram(4)
    shadow = pd.alloc_pages(4)
    shadow[:] = ram
    ram[1 * PS + 9] ^= 1
    ram[2 * PS + 99] ^= 1
    batch = pd.encode_pages(ram, shadow, [1, 2])  # small changes: deltas
    assert pd.PageKind.DELTA in batch.kinds
    table = bytearray(pd.hash_table_size(len(ram)))
    with pytest.raises(pd.PageDiffError, match="invalid argument"):
        pd.hash_gathered(table, batch)


def test_find_mapping_finds_this_process_mapping(tmp_path: Path) -> None:
    path = Path("/dev/shm") / f"mirror-unit-map-{os.getpid()}.ram"
    try:
        with open(path, "wb") as f:
            f.truncate(16 * PS)
        with open(path, "r+b") as f:
            m = mmap.mmap(f.fileno(), 16 * PS)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert dirtylog.find_mapping(os.getpid(), path, 16 * PS) == addr
        with pytest.raises(dirtylog.DirtyLogError, match="does not map all of"):
            dirtylog.find_mapping(os.getpid(), path, 32 * PS)
        with pytest.raises(dirtylog.DirtyLogError, match="cannot find the RAM mapping"):
            dirtylog.find_mapping(os.getpid(), tmp_path / "absent.ram", PS)
        m.close()
    finally:
        path.unlink(missing_ok=True)


def test_probe_says_why_on_a_simulated_old_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dirtylog.SIMULATE_ENV, "old-kernel")
    why = dirtylog.probe()
    assert why is not None and "PAGEMAP_SCAN refused" in why and "6.7" in why


class _NoLogGuest(Guest):
    kind = "test"

    def __init__(self, source: LogSource | None, blockers: list[str]) -> None:
        self._source, self._blockers = source, blockers
        self._ram = pd.alloc_pages(1)

    @property
    def ram(self) -> mmap.mmap:
        return self._ram

    @property
    def ram_path(self) -> Path:
        return Path("/nonexistent")

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def save_state(self) -> bytes:
        return b""

    def stop(self) -> None: ...
    @property
    def alive(self) -> bool:
        return True

    def log_source(self) -> LogSource | None:
        return self._source

    def log_blockers(self) -> list[str]:
        return self._blockers


def test_log_refused_for_a_guest_without_the_library_or_with_a_balloon() -> None:
    with pytest.raises(dirtylog.DirtyLogError, match="not started with the userfaultfd preload"):
        dirtylog.DirtyLog(_NoLogGuest(None, []))
    with pytest.raises(dirtylog.DirtyLogError, match="cannot see: a memory balloon"):
        dirtylog.DirtyLog(_NoLogGuest(LogSource(os.getpid(), "@x"), ["a memory balloon"]))
