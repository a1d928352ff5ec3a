"""The throttle: a guest that dirties memory faster than the pair replicates is slowed,
just enough that each epoch's checkpoint fits the pause budget (``checkpoint.max_pause_ms``)
and what the pair commits in an epoch; released as soon as its rate falls.

Without it every epoch carries more than the last: the window of checkpoints in flight
fills, the epoch stretches, the guest writes on meanwhile, the next dirty set is larger,
and the pause and the memory held grow with it (the snowball).

Two parts, neither doing I/O:

- :class:`Capacity`: the pair's measured capacity (link + standby), bytes a second, from
  the acks: each ack's bytes over the time the link spent on them (from the later of its
  send and the previous ack, to the ack), smoothed.  Small checkpoints are not counted:
  their time is the round trip, not the throughput.
- :class:`Throttle`: the controller.  After each checkpoint (after the guest resumed and
  the checkpoint was sent: never in the pause) it is told the pause, the bytes, whether
  the window of checkpoints in flight was full, and the capacity; it returns the guest's
  speed (1: unthrottled; the level is ``1 - speed``).  Over budget: the speed is cut in
  proportion to the overshoot (multiplicative, at most halved per epoch); well under it:
  raised (additively, or doubled when far under, so a guest that stopped writing is free
  again within a few epochs); a pre-copy round that does not converge halves it.  At
  its lowest speed and still over budget for
  ``CANNOT_HOLD_EPOCHS`` epochs, the guest cannot be held: reported, never hidden.
  From full speed, a pause over budget that its bytes do not explain (fewer than
  ``ENGAGE_MIN_BYTES``, the window not full, the bytes within capacity) engages only when
  ``ENGAGE_EPOCHS`` checkpoints in a row overrun: on a loaded host one pause is sometimes
  late for reasons that slowing the guest cannot help (a guest that wrote nothing was
  throttled again by one such pause).

The guest backends apply the speed (mirror/guests: the synthetic guest's writer, a QEMU's
vCPU threads under a CPU quota).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SPEED = 0.05  # the slowest a guest is made to run (level 0.95)
CANNOT_HOLD_EPOCHS = 20  # at MIN_SPEED and over budget this many epochs: reported
RAISE_BELOW = 0.75  # the speed rises only while the load is under this share of the budget
CAPACITY_MIN_BYTES = 1 << 20  # acks of smaller checkpoints measure the round trip only
CAPACITY_ALPHA = 0.25  # weight of a new capacity sample
# a pause overrun with fewer bytes than this (and the window not full) is noise until it
# repeats: from full speed it engages only after ENGAGE_EPOCHS such checkpoints in a row
ENGAGE_MIN_BYTES = 1 << 20
ENGAGE_EPOCHS = 3


class Capacity:
    """The pair's measured capacity, bytes a second (0: not measured yet).

    One ack's time alone misleads: acks that waited in the socket while the engine was
    in a pause are read back to back, the second timed at almost nothing.  So bytes and
    busy time are summed over acks until ``SAMPLE_S`` of busy time, and that sum is one
    sample."""

    SAMPLE_S = 0.25

    def __init__(self) -> None:
        self.bytes_per_s = 0.0
        self._last_ack = 0.0  # monotonic time of the previous ack
        self._bytes = 0  # summed towards the next sample
        self._busy = 0.0

    def acked(self, nbytes: int, first_sent_at: float, now: float) -> None:
        """An ack of ``nbytes`` of checkpoints, the first of them sent at ``first_sent_at``."""
        start = max(first_sent_at, self._last_ack)
        self._last_ack = now
        if nbytes < CAPACITY_MIN_BYTES or now <= start:
            return
        self._bytes += nbytes
        self._busy += now - start
        if self._busy < self.SAMPLE_S:
            return
        sample = self._bytes / self._busy
        self._bytes, self._busy = 0, 0.0
        if self.bytes_per_s == 0:
            self.bytes_per_s = sample
        else:
            self.bytes_per_s += CAPACITY_ALPHA * (sample - self.bytes_per_s)


@dataclass(frozen=True)
class Decision:
    speed: float  # 1.0: unthrottled
    changed: bool  # the speed differs from the last one applied
    load: float  # the checkpoint's load: its largest share of a budget (1.0: at budget)
    why: str  # one sentence (logged at debug, asserted by tests)

    @property
    def level(self) -> float:
        return round(1.0 - self.speed, 3)


class Throttle:
    """The controller: checkpoint figures in, the guest's speed out."""

    def __init__(self, max_pause_ms: float, epoch_ms: float) -> None:
        if max_pause_ms <= 0:
            raise ValueError("max_pause_ms must be > 0 (0 means no throttle: make none)")
        self.max_pause_ms = max_pause_ms
        self.epoch_s = epoch_ms / 1000
        self.speed = 1.0
        self.throttled_s = 0.0  # time spent at a speed below 1
        self.engaged = 0  # times it went from unthrottled to throttled
        self.over = 0  # consecutive checkpoints over budget at MIN_SPEED
        self.overruns = 0  # consecutive small pause overruns at full speed (see ENGAGE_EPOCHS)
        self.cannot_hold = False
        self._at: float | None = None  # when the last decision was taken (monotonic)

    @property
    def level(self) -> float:
        return round(1.0 - self.speed, 3)

    def load(self, pause_ms: float, nbytes: int, window_full: bool, capacity: float) -> float:
        """The checkpoint's largest share of a budget: its pause over the pause budget,
        its bytes over what the pair commits in an epoch, and at least 1.25 when the
        window of checkpoints in flight was full (the epoch stretched: over capacity)."""
        load = pause_ms / self.max_pause_ms
        if capacity > 0:
            load = max(load, nbytes / (capacity * self.epoch_s))
        if window_full:
            load = max(load, 1.25)
        return load

    def observe(
        self, pause_ms: float, nbytes: int, *, window_full: bool, capacity: float, now: float
    ) -> Decision:
        """One checkpoint's figures (after the resume); returns the speed to apply."""
        if self._at is not None and self.speed < 1.0:
            self.throttled_s += now - self._at
        self._at = now
        load = self.load(pause_ms, nbytes, window_full, capacity)
        old = self.speed
        noise = (
            old == 1.0
            and load > 1.0
            and not window_full
            and nbytes < ENGAGE_MIN_BYTES
            and (capacity <= 0 or nbytes <= capacity * self.epoch_s)
        )
        self.overruns = self.overruns + 1 if noise else 0
        if noise and self.overruns < ENGAGE_EPOCHS:
            why = (
                f"load {load:.2f} from the pause alone ({nbytes} bytes): speed stays "
                f"{old:.2f} unless it repeats ({self.overruns} of {ENGAGE_EPOCHS})"
            )
        elif load > 1.0:
            # proportional: the dirty set scales with the speed; aim a little under budget
            self.speed = max(MIN_SPEED, old * max(0.5, 0.9 / load))
            why = f"load {load:.2f} over budget: speed {old:.2f} -> {self.speed:.2f}"
        elif load < RAISE_BELOW and old < 1.0:
            self.speed = min(1.0, max(old + 0.05, old * min(2.0, 0.8 / max(load, 1e-3))))
            why = f"load {load:.2f} under budget: speed {old:.2f} -> {self.speed:.2f}"
        else:
            why = f"load {load:.2f}: speed stays {old:.2f}"
        self.speed = round(self.speed, 3)
        if self.speed >= 0.995:
            self.speed = 1.0
        if old == 1.0 and self.speed < 1.0:
            self.engaged += 1
        if load > 1.0 and old <= MIN_SPEED:
            self.over += 1
        else:
            self.over = 0
        if self.over >= CANNOT_HOLD_EPOCHS:
            self.cannot_hold = True
        elif load <= 1.0:
            self.cannot_hold = False
        return Decision(self.speed, self.speed != old, load, why)

    def converge(self, now: float) -> Decision:
        """A pre-copy round that did not converge (the guest wrote at least half as much
        as the round sent): half the speed, as QEMU's auto-converge does."""
        if self._at is not None and self.speed < 1.0:
            self.throttled_s += now - self._at
        self._at = now
        old = self.speed
        self.speed = round(max(MIN_SPEED, old / 2), 3)
        if old == 1.0 and self.speed < 1.0:
            self.engaged += 1
        why = f"pre-copy not converging: speed {old:.2f} -> {self.speed:.2f}"
        return Decision(self.speed, self.speed != old, 0.0, why)

    def release(self, now: float) -> None:
        """Back to full speed (the engine stops: an unprotected guest runs free)."""
        if self._at is not None and self.speed < 1.0:
            self.throttled_s += now - self._at
        self._at = None
        self.speed, self.over, self.cannot_hold, self.overruns = 1.0, 0, False, 0
