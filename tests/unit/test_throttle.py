"""The throttle's controller (mirror/replication/throttle.py) on a model guest whose
dirty bytes per epoch scale with its speed, and the send buffers' cap."""

from __future__ import annotations

import pytest

from mirror.replication import pagediff as pd
from mirror.replication.inflight import SendBuffers
from mirror.replication.throttle import (
    CANNOT_HOLD_EPOCHS,
    ENGAGE_EPOCHS,
    MIN_SPEED,
    Capacity,
    Throttle,
)

EPOCH_MS = 50
BUDGET_MS = 15.0
FIXED_MS = 1.0  # stop, device state, resume: not the guest's speed's
MS_PER_MB = 0.5  # the pause's part that grows with the dirty bytes
CAPACITY = 400e6  # bytes a second: 20 MB an epoch


def model(mb_per_epoch: float, speed: float) -> tuple[float, int]:
    """A checkpoint of a guest writing ``mb_per_epoch`` at full speed: (pause ms, bytes)."""
    mb = mb_per_epoch * speed
    return FIXED_MS + MS_PER_MB * mb, int(mb * 1e6)


def drive(t: Throttle, mb_per_epoch: float, epochs: int, now: float) -> float:
    for _ in range(epochs):
        now += EPOCH_MS / 1000
        pause, nbytes = model(mb_per_epoch, t.speed)
        t.observe(pause, nbytes, window_full=False, capacity=CAPACITY, now=now)
    return now


def test_engages_above_capacity_and_settles_under_budget() -> None:
    t = Throttle(BUDGET_MS, EPOCH_MS)
    now = drive(t, 60.0, 40, 0.0)  # 3x what the pair commits in an epoch
    assert 0.25 <= t.speed <= 0.35, t.speed  # about 1/3: just enough, not more
    pause, nbytes = model(60.0, t.speed)
    assert pause <= BUDGET_MS and nbytes <= CAPACITY * EPOCH_MS / 1000
    assert t.engaged == 1 and t.throttled_s > 1.5 and not t.cannot_hold
    drive(t, 60.0, 40, now)
    assert t.engaged == 1  # held, not flapping on and off


def test_pause_budget_binds_when_tighter_than_capacity() -> None:
    t = Throttle(5.0, EPOCH_MS)  # 5 ms: at most 8 MB an epoch in this model
    drive(t, 20.0, 60, 0.0)  # 20 MB an epoch: within capacity, over the pause budget
    pause, _ = model(20.0, t.speed)
    assert pause <= 5.0 and t.speed >= 0.3, (pause, t.speed)


def test_released_within_a_few_epochs_once_the_writer_stops() -> None:
    t = Throttle(BUDGET_MS, EPOCH_MS)
    now = drive(t, 200.0, 40, 0.0)
    assert t.speed < 0.15
    epochs = 0
    while t.speed < 1.0 and epochs < 10:
        epochs += 1
        now += EPOCH_MS / 1000
        d = t.observe(FIXED_MS, 4096, window_full=False, capacity=CAPACITY, now=now)
    assert t.speed == 1.0 and t.level == 0.0 and epochs <= 6, epochs
    assert d.changed and "under budget" in d.why
    throttled = t.throttled_s
    drive(t, 0.0, 10, now)
    assert t.throttled_s == throttled  # no time counted at full speed


def test_a_full_window_counts_as_over_capacity() -> None:
    t = Throttle(BUDGET_MS, EPOCH_MS)
    d = t.observe(2.0, 1_000_000, window_full=True, capacity=0.0, now=1.0)
    assert d.load == 1.25 and d.speed < 1.0 and "over budget" in d.why


def test_one_late_pause_with_few_bytes_does_not_engage() -> None:
    """A loaded host: one pause of a guest that wrote almost nothing comes late.  Slowing
    the guest cannot help that; only overruns that repeat engage from full speed."""
    t = Throttle(BUDGET_MS, EPOCH_MS)
    now = 0.0
    for pause in (40.0, FIXED_MS, 40.0, FIXED_MS) * 5:  # noisy, never twice in a row
        now += EPOCH_MS / 1000
        d = t.observe(pause, 64 * 4096, window_full=False, capacity=CAPACITY, now=now)
        assert d.speed == 1.0, d.why
    assert t.engaged == 0 and t.throttled_s == 0
    for i in range(ENGAGE_EPOCHS):  # the same overrun, epoch after epoch: engages
        now += EPOCH_MS / 1000
        d = t.observe(40.0, 64 * 4096, window_full=False, capacity=CAPACITY, now=now)
        assert (d.speed < 1.0) == (i == ENGAGE_EPOCHS - 1), d.why
    # an overrun that its bytes explain engages at once
    t = Throttle(BUDGET_MS, EPOCH_MS)
    d = t.observe(40.0, 30_000_000, window_full=False, capacity=CAPACITY, now=1.0)
    assert d.speed < 1.0 and "over budget" in d.why


def test_a_guest_that_cannot_be_held_is_reported() -> None:
    t = Throttle(1.0, EPOCH_MS)  # below the fixed part of any pause
    now = 0.0
    for _ in range(CANNOT_HOLD_EPOCHS + 10):
        now += 0.05
        t.observe(3.0, 4096, window_full=False, capacity=CAPACITY, now=now)
    assert t.speed == MIN_SPEED and t.cannot_hold
    t.release(now)
    assert t.speed == 1.0 and not t.cannot_hold


def test_no_throttle_without_a_budget() -> None:
    with pytest.raises(ValueError, match="max_pause_ms"):
        Throttle(0, EPOCH_MS)


def test_capacity_from_acks() -> None:
    c = Capacity()
    c.acked(100, 0.0, 0.001)  # small: a round trip, not a throughput
    assert c.bytes_per_s == 0
    c.acked(50_000_000, 1.0, 1.1)  # 500 MB/s, but 0.1 s: not yet a sample
    assert c.bytes_per_s == 0
    # sent while the previous one was still on the link: timed from that ack
    c.acked(50_000_000, 1.05, 1.2)
    c.acked(50_000_000, 1.15, 1.3)
    assert c.bytes_per_s == pytest.approx(5e8)
    # an ack read right after another (it waited while the engine paused the guest):
    # timed at nothing alone, it does not make the link look 50x faster
    c.acked(40_000_000, 1.31, 1.39)
    c.acked(10_000_000, 1.32, 1.392)
    c.acked(50_000_000, 1.4, 1.5)
    c.acked(50_000_000, 1.45, 1.6)
    assert 4e8 < c.bytes_per_s < 6e8


def test_send_buffers_never_pass_their_cap() -> None:
    npages = 256
    bufs = SendBuffers(2, prepare_max=npages // 16, max_pages=npages)
    assert bufs.cap_bytes == 3 * npages * pd.PAGE_SIZE
    for seq in range(1, 30):  # a guest that dirties all of its RAM every epoch
        buf = bufs.get(seq, npages)
        assert len(buf) == npages * pd.PAGE_SIZE  # no "room to grow" past the guest
        bufs.prepare(seq + 1, npages)
        assert bufs.held_bytes <= bufs.cap_bytes
    assert bufs.held_bytes == bufs.cap_bytes
