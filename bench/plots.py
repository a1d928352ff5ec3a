"""PNG plots of the benchmarks' JSON: `python -m bench.report --plot DIR` calls
:func:`plot_all` with what the report measured (or read with ``--from``) and, with
``--failover PATH``, what `python -m bench.failover --json PATH` wrote.

Every plot is general over scan methods: a row's ``scan`` names its method (the
engine suite's rows their ``case``), and each method found gets its own line or bar,
so a method added later (a dirty log, say) shows up without a change here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

MARKERS = "osD^v<>px*"


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pause_vs_ram(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Checkpoint pause p50 against RAM size (one line per scan method and dirty share),
    and against the dirty share (one line per scan method and RAM size), each beside
    the same-run floor."""
    if not rows:
        return None
    fig, (by_ram, by_dirty) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple[str, float], list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        lines[(r.get("scan", "exact"), r["dirty_pct"])].append(
            (r["ram_mib"], r["pause_ms_p50"], r["floor_ms"])
        )
    methods = sorted({m for m, _ in lines})
    for i, ((method, pct), pts) in enumerate(sorted(lines.items())):
        pts.sort()
        by_ram.plot([p[0] for p in pts], [p[1] for p in pts],
                    marker=MARKERS[methods.index(method) % len(MARKERS)],
                    label=f"{method}, {pct:g}% dirty", color=f"C{i}")  # fmt: skip
        by_ram.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", color=f"C{i}", lw=1)
    by_ram.set_xscale("log", base=2)
    by_ram.set_xlabel("guest RAM (MiB)")
    by_ram.set_ylabel("pause p50 (ms); dotted: same-run floor")
    by_ram.set_title("checkpoint pause vs RAM size")
    by_ram.legend(fontsize=8)
    by_ram.grid(alpha=0.3)
    curves: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        curves[(r.get("scan", "exact"), r["ram_mib"])].append((r["dirty_pct"], r["pause_ms_p50"]))
    for i, ((method, ram), dpts) in enumerate(sorted(curves.items())):
        dpts.sort()
        by_dirty.plot([p[0] for p in dpts], [p[1] for p in dpts],
                      marker=MARKERS[methods.index(method) % len(MARKERS)],
                      label=f"{method}, {ram} MiB", color=f"C{i}")  # fmt: skip
    by_dirty.set_xlabel("pages dirty per epoch (%)")
    by_dirty.set_ylabel("pause p50 (ms)")
    by_dirty.set_title("checkpoint pause vs dirty share")
    by_dirty.legend(fontsize=8)
    by_dirty.grid(alpha=0.3)
    return _save(fig, path)


def replication(rows: list[dict[str, Any]], capacity: float | None, path: Path) -> Path | None:
    """Replication throughput per case (guest running on the same cores), bars per scan
    method, beside the link + standby capacity measured with no guest."""
    if not rows:
        return None
    cases = sorted({(r["ram_mib"], r["dirty_pct"]) for r in rows})
    methods = sorted({r.get("scan", "exact") for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases) * len(methods)), 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        got = {(r["ram_mib"], r["dirty_pct"]): r["replication_gbps"]
               for r in rows if r.get("scan", "exact") == method}  # fmt: skip
        xs = [i + j * width for i in range(len(cases))]
        ax.bar(xs, [got.get(c, 0.0) for c in cases], width, label=method, color=f"C{j}")
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{m} MiB\n{p:g}% dirty" for m, p in cases], fontsize=8)
    if capacity:
        ax.axhline(capacity, color="k", ls="--", lw=1,
                   label=f"link + standby capacity, no guest ({capacity:.2f})")  # fmt: skip
    ax.set_ylabel("GB/s of dirty pages (send to ack)")
    ax.set_title("replication throughput")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def scan_rates(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """The engine suite: scan rate against the dirty share, one line per case (scan
    method or ceiling) at the largest RAM size and the most threads measured."""
    if not rows:
        return None
    ram = max(r["ram_mib"] for r in rows)
    threads = max(r["threads"] for r in rows)
    pick = [r for r in rows if r["ram_mib"] == ram and r["threads"] == threads
            and r["case"] != "delta_encode"]  # fmt: skip
    if not pick:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, case in enumerate(sorted({r["case"] for r in pick})):
        pts = sorted((r["dirty_pct"], r["gbps"]) for r in pick if r["case"] == case)
        ceiling = case.endswith("_ceiling")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)],
                ls=":" if ceiling else "-", label=case, color=f"C{i}")  # fmt: skip
    ax.set_xlabel("pages dirty (%)")
    ax.set_ylabel("GB/s of guest RAM scanned")
    ax.set_ylim(bottom=0)  # rates are compared from zero, never from the lowest one
    ax.set_title(f"page-diff scans, {ram} MiB, {threads} thread(s); dotted: ceilings")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def failover(results: dict[str, Any], path: Path) -> Path | None:
    """bench.failover's runs: the time from the last heartbeat to the resumed guest's
    first output and from the kill to the observer's next output, each run a dot,
    per setting."""
    settings = [(label, r["runs"]) for label, r in results.items() if r.get("runs")]
    if not settings:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.2 + 1.1 * len(settings)))
    ticks = []
    for i, (label, runs) in enumerate(settings):
        for k, (key, name) in enumerate(
            [("failover_ms", "last heartbeat -> first output"),
             ("kill_to_output_ms", "kill -> observer's next output")]
        ):  # fmt: skip
            y = i + (k - 0.5) * 0.3
            xs = sorted(float(r[key]) for r in runs)
            ax.scatter(xs, [y] * len(xs), s=18, alpha=0.7, color=f"C{k}",
                       label=name if i == 0 else None)  # fmt: skip
            ax.plot([xs[len(xs) // 2]] * 2, [y - 0.12, y + 0.12], color="k", lw=2)
        ticks.append(label.replace(" (", "\n("))
    ax.set_yticks(range(len(settings)))
    ax.set_yticklabels(ticks, fontsize=8)
    ax.set_ylim(-0.6, len(settings) - 0.4)
    ax.set_xlabel("ms (each dot a kill; bar: median)")
    ax.set_title(f"failover time, {sum(len(r) for _, r in settings)} host kills")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_all(report: dict[str, Any], failover_results: dict[str, Any] | None,
             outdir: Path) -> list[Path]:  # fmt: skip
    """Every plot the data allows, as PNGs in ``outdir``; returns their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    ck = list(report.get("checkpoint_rows", []))
    made = [
        pause_vs_ram(ck, outdir / "pause-vs-ram.png"),
        replication(ck, report.get("link_capacity_gbps"), outdir / "replication.png"),
        scan_rates(list(report.get("rows", [])), outdir / "scan-rates.png"),
        failover(failover_results, outdir / "failover.png") if failover_results else None,
    ]
    return [p for p in made if p is not None]
