"""The throttle (checkpoint.max_pause_ms) on a real pair: a synthetic guest writing far
above what the pair replicates is slowed, and freed again once its writer stops; the
send buffers never pass their cap.  Real `mirror primary` and `mirror secondary`
processes, the guest its own process."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from mirror.config import CheckpointConfig, Config, GuestConfig
from tests.integration.conftest import Pair, log_events

# 32 MiB written at 150,000 pages a second: about 10 MB dirty per 30 ms epoch, which
# takes more than 4 ms to gather and more than an epoch to replicate on these machines;
# after its 3,000th output (3 s at full speed) the guest writes nothing more.
WRITER = replace(
    Config(),
    guest=replace(GuestConfig(), ram_mib=32, dirty_pages_per_s=150_000, outputs_per_s=1000,
                  dirty_outputs=3000),
    checkpoint=replace(CheckpointConfig(), epoch_ms=30, max_pause_ms=4),
)  # fmt: skip



@pytest.mark.pair_config(WRITER)
def test_throttle_engages_above_capacity_and_releases_when_the_writer_stops(
    pair: Pair,
) -> None:
    pair.start_secondary()
    a = pair.start_primary()
    samples: list[dict[str, Any]] = []

    def throttle() -> dict[str, Any] | None:
        st = a.status()
        if not st or st.get("phase") != "protected":
            return None
        samples.append(st["throttle"])
        return dict(st["throttle"])

    engaged = pair.wait("the throttle engaged",
                        lambda: (t := throttle()) and t["level"] > 0 and t, 60)  # fmt: skip
    assert engaged["active"] and engaged["max_pause_ms"] == 4

    # the writer stops at its 3000th output (later, as it runs slowed): then released (a
    # release before, the load wavering, does not count)
    def released_after_the_writer() -> dict[str, Any] | None:
        st = a.status()
        t = throttle()
        done = bool(st and st["summary"]["outputs_released"] > 3100)
        return t if t and done and t["level"] == 0 else None

    released = pair.wait("the throttle released", released_after_the_writer, 90)
    assert released["throttled_s"] > 0.5 and not released["cannot_hold"]
    assert released["capacity_mb_per_s"] > 0  # measured from the acks meanwhile
    assert len(log_events(a.log_path.read_text(), "throttle-engaged")) >= 1
    assert len(log_events(a.log_path.read_text(), "throttle-released")) >= 1
    st = a.status()
    assert st is not None
    summary = st["summary"]
    # the outputs went on all along (slowed, never stopped), and past the writer's end
    assert summary["outputs_released"] > 3000
    time.sleep(1.5)  # stays released: the guest writes nothing now
    t = throttle()
    assert t is not None and t["level"] == 0
    assert t["throttled_s"] == pytest.approx(released["throttled_s"], abs=0.05)
    for s in samples:  # the cap on the send buffers held all along
        assert s["send_buffer_bytes"] <= s["send_buffer_cap_bytes"]
    # max_in_flight 2, + 1; and the early parts' ring (checkpoint.early_send): 3 x RAM / 4
    assert samples[0]["send_buffer_cap_bytes"] == 3 * (32 << 20) + 3 * (8 << 20)
    # `mirror status` says so in words
    run = subprocess.run([sys.executable, "-m", "mirror", "status", "--config", str(a.config_path)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    row = next(line for line in run.stdout.splitlines() if line.strip().startswith("throttle:"))
    assert "off now; throttled" in row and "pause budget 4 ms" in row, run.stdout
    # the metrics say so too (the primary's own /metrics)
    served = st["metrics"]
    assert served, "the primary serves no metrics"
    text = urllib.request.urlopen(f"http://{served}/metrics", timeout=10).read().decode()
    series = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mirror_") and 'node="hostA"' in line
    }
    assert series["mirror_throttle_level"] == 0
    assert series["mirror_throttled_seconds"] > 0.5
    assert series["mirror_replication_capacity_bytes_per_second"] > 0
    assert 0 < series["mirror_send_buffer_bytes"] <= 3 * (32 << 20)


NO_THROTTLE = replace(
    WRITER,
    guest=replace(WRITER.guest, dirty_pages_per_s=2_000_000, dirty_outputs=0),
    checkpoint=replace(WRITER.checkpoint, max_pause_ms=0),
)


@pytest.mark.pair_config(NO_THROTTLE)
def test_send_buffers_hold_their_cap_unthrottled(pair: Pair) -> None:
    """No throttle and a guest rewriting nearly all of its RAM every epoch: the epoch
    stretches, each checkpoint holds nearly the whole guest, and the send buffers still
    never hold more than (max_in_flight + 1) x RAM, plus the early parts' ring
    ((max_in_flight + 1) x RAM / 4)."""
    pair.start_secondary()
    a = pair.start_primary()
    seen: list[dict[str, Any]] = []

    def sample() -> bool:
        st = a.status()
        if st and st.get("phase") == "protected":
            seen.append(st["throttle"])
        return bool(st and st.get("acked", 0) >= 20)

    pair.wait("checkpoints", sample, 90)
    assert seen and not seen[-1]["active"] and seen[-1]["level"] == 0
    cap = 3 * (32 << 20) + 3 * (8 << 20)  # and the early parts' ring: 3 x RAM / 4
    assert seen[-1]["send_buffer_cap_bytes"] == cap
    assert max(s["send_buffer_bytes"] for s in seen) <= cap
    assert max(s["send_buffer_bytes"] for s in seen) > (32 << 20)  # it did grow: a real test
