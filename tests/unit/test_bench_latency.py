"""bench/floor.py (the floor of every bench) and `python -m bench.latency` on a small guest."""

from __future__ import annotations

import re
import time

import pytest

from bench import floor, latency


def test_the_floor_is_the_bare_checkpoint_plus_a_memcpy_of_the_dirty_pages() -> None:
    calls = []

    def bare() -> None:  # a guest whose bare checkpoint takes 2 ms
        calls.append(1)
        time.sleep(0.002)

    f = floor.measure(bare, pages=2560, repeat=5, run_s=0)
    assert len(calls) == 5
    assert 2 <= f.bare_ms < 20
    assert 0 < f.copy_ms < 50  # 10 MiB
    assert f.ms == round(f.bare_ms + f.copy_ms, 3)
    assert floor.measure(bare, pages=2560 * 8, repeat=3, run_s=0).copy_ms > f.copy_ms
    assert f.describe().startswith(f"floor {f.ms:.2f} ms = bare checkpoint")


def test_latency_prints_the_pause_its_split_and_the_floor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The real engine and secondary on a 32 MiB synthetic guest (a few seconds)."""
    assert latency.main(["--ram-mib", "32", "--dirty-pct", "1", "--checkpoints", "8"]) == 0
    out = capsys.readouterr().out
    assert "32 MiB synthetic guest, 1% dirty per 50 ms epoch" in out
    p50, p99 = map(float, re.search(r"pause p50 ([\d.]+) ms, p99 ([\d.]+) ms", out).groups())
    assert 0 < p50 <= p99
    split = re.search(r"split p50 ms: (.*)", out).group(1)
    assert [kv.split()[0] for kv in split.split(", ")] == ["stop", "scan", "gather", "state",
                                                          "resume"]  # fmt: skip
    fl = float(re.search(r"floor ([\d.]+) ms = bare checkpoint", out).group(1))
    ratio = float(re.search(r"pause p50 / floor: ([\d.]+)", out).group(1))
    assert fl > 0 and ratio == pytest.approx(p50 / fl, rel=0.02, abs=0.01)


def test_latency_refuses_what_it_cannot_measure(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        latency.main(["--ram-mib", "8"])
    assert "--ram-mib >= 16" in capsys.readouterr().err
