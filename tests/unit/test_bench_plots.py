"""bench.report --plot: PNGs from a report's JSON, general over scan methods."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from bench import plots


def report(methods: list[str]) -> dict[str, object]:
    rows = [
        {"scan": m, "ram_mib": ram, "dirty_pct": pct, "pause_ms_p50": ram * pct / (i + 1),
         "floor_ms": ram * pct / 2, "replication_gbps": 0.1 * (i + 1)}
        for i, m in enumerate(methods) for ram in (64, 256) for pct in (1, 10)
    ]  # fmt: skip
    engine = [
        {"case": c, "ram_mib": 64, "dirty_pct": p, "threads": 2, "gbps": g + p}
        for c, g in (("exact", 9.0), ("memcmp_ceiling", 10.0)) for p in (0, 1, 10)
    ]  # fmt: skip
    return {"checkpoint_rows": rows, "link_capacity_gbps": 1.5, "rows": engine}


def test_plot_all_writes_pngs_with_a_line_per_scan_method(tmp_path: Path, monkeypatch) -> None:
    failover = {"default": {"runs": [{"failover_ms": 600 + i, "kill_to_output_ms": 500 + i}
                                     for i in range(5)]}}  # fmt: skip
    labels: list[str] = []
    save = plots._save

    def spy(fig, path):  # type: ignore[no-untyped-def]
        for ax in fig.axes:
            labels.extend(line.get_label() for line in ax.get_lines())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    made = plots.plot_all(report(["exact", "hashed", "log"]), failover, tmp_path / "out")
    assert [p.name for p in made] == [
        "pause-vs-ram.png", "replication.png", "scan-rates.png", "failover.png"]  # fmt: skip
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in ("exact", "hashed", "log"):  # a method added later gets its own lines
        assert f"{method}, 1% dirty" in labels and f"{method}, 256 MiB" in labels
    assert not plt.get_fignums()  # every figure closed


def test_report_plot_from_json_and_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(json.dumps(report(["exact"])))
    run = subprocess.run(
        [sys.executable, "-m", "bench.report", "--plot", str(tmp_path / "png"), "--from", str(src)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "pause-vs-ram.png", "replication.png", "scan-rates.png"]  # fmt: skip
    src.write_text("[1, 2]")
    run = subprocess.run(
        [sys.executable, "-m", "bench.report", "--plot", str(tmp_path / "png"), "--from", str(src)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and "is not a report's JSON" in run.stderr
    assert "Traceback" not in run.stderr
