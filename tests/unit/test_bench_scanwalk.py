"""`python -m bench.scanwalk`: the dirty-page log's walk, timed four ways."""

from __future__ import annotations

import re

import pytest

from bench import scanwalk
from mirror.replication import dirtylog

if dirtylog.probe() is not None:
    pytest.skip(f"no dirty-page log here: {dirtylog.probe()}", allow_module_level=True)


def test_the_two_halves_find_the_written_pages_of_both() -> None:
    r = scanwalk.Region(8)
    try:
        last = r.npages - 1
        r.write([0, r.npages // 2 - 1, r.npages // 2, last])
        assert r.two_halves() == 4
        assert r.scan(0, r.npages, protect=True) == 0  # both halves protected them again
        r.write([last])
        assert r.scan(0, r.npages, protect=False) == 1
        assert r.scan(0, r.npages, protect=True) == 1  # a check protects nothing
        assert int(r.out[0]) == last
    finally:
        r.close()


def test_scanwalk_prints_each_way_beside_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    assert scanwalk.main(["--ram-mib", "256", "--pages", "50", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dirty-page log scan: 256 MiB shared memfd, 50 pages written")
    for way in ("scan (returns", "check (no", "clean walk", "two halves", "baseline: scan of 128"):
        assert re.search(rf"^  {re.escape(way)}.*\s[\d.]+", out, re.M), (way, out)
    assert re.search(r"256 MiB / 128 MiB: [\d.]+x", out)


def test_scanwalk_refuses_a_region_under_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        scanwalk.main(["--ram-mib", "64"])
    assert "--ram-mib >= 128" in capsys.readouterr().err
