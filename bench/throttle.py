"""The throttle (checkpoint.max_pause_ms) against a guest writing about twice what the pair
replicates: the pause and the bytes in flight with the throttle on, then off, in the same
run, on the same pair and guest.

    python -m bench.throttle [--ram-mib 1024] [--seconds 30] [--max-pause-ms 15] [--plot PNG]

A real secondary (`mirror secondary`, its own process group) and, in this process, the
primary's engine driving a real synthetic guest process.  First the pair's capacity is
measured (bench.checkpoint.link_capacity: prebuilt checkpoints sent one after another to
the secondary, no guest running); the guest is then set to dirty about twice that many
bytes an epoch.  The engine runs ``--seconds`` with the throttle, then ``--seconds``
without (in that order: the snowball without one takes long to drain); each checkpoint's
pause, bytes, bytes in flight and throttle level are kept, and the two phases' figures
printed side by side (ratios within the run, never absolute claims).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

from bench.checkpoint import dirty_rate_for, link_capacity, running_engine
from mirror.config import ArbiterConfig, CheckpointConfig, Config, GuestConfig
from mirror.hoststate import percentile
from mirror.replication import pagediff as pd
from mirror.replication.checkpoint import CheckpointEngine

PS = pd.PAGE_SIZE


def config(ram_mib: int, mb_per_epoch: float, epoch_ms: int, max_pause_ms: int) -> Config:
    npages = (ram_mib << 20) // PS
    pct = 100 * mb_per_epoch * 1e6 / PS / npages
    return replace(
        Config(),
        arbiter=replace(ArbiterConfig(), silent_after_ms=600_000, fence_after_ms=1_200_000),
        guest=replace(
            GuestConfig(),
            ram_mib=ram_mib,
            outputs_per_s=1000,
            dirty_pages_per_s=dirty_rate_for(npages, pct, epoch_ms),
        ),
        checkpoint=replace(
            CheckpointConfig(), epoch_ms=epoch_ms, max_in_flight=2, max_pause_ms=max_pause_ms
        ),
    )


def phase(engine: CheckpointEngine, name: str, seconds: float, t0: float) -> list[dict[str, Any]]:
    first = engine.stats.taken
    end = time.monotonic() + seconds
    engine.run(lambda: time.monotonic() >= end)
    taken = engine.stats.taken - first
    recs = list(engine.stats.records)[-taken:] if taken else []
    return [
        {
            "phase": name,
            "t": r.sent_at - t0,
            "pause_ms": r.pause_ms,
            "bytes": r.bytes_sent,
            "in_flight_bytes": r.in_flight_bytes,
            "level": r.throttle_level,
        }
        for r in recs
    ]


def summary(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    rows = rows[min(5, len(rows) // 4) :]  # the first: the phase before, the pre-copy's tail
    if not rows:
        return {"checkpoints": 0}
    pauses = [r["pause_ms"] for r in rows]
    return {
        "checkpoints": len(rows),
        "pause_ms_p50": round(percentile(pauses, 50), 2),
        "pause_ms_p99": round(percentile(pauses, 99), 2),
        "mb_per_checkpoint_p50": round(median(r["bytes"] for r in rows) / 1e6, 2),
        "in_flight_mb_max": round(max(r["in_flight_bytes"] for r in rows) / 1e6, 1),
        "in_flight_mb_p50": round(median(r["in_flight_bytes"] for r in rows) / 1e6, 1),
        "replicated_mb_per_s": round(sum(r["bytes"] for r in rows) / seconds / 1e6, 1),
        "level_p50": round(median(r["level"] for r in rows), 2),
    }


def run(
    ram_mib: int,
    seconds: float,
    epoch_ms: int,
    max_pause_ms: int,
    dirty_pct: float | None = None,
    phases: tuple[str, ...] = ("on", "off"),
) -> dict[str, Any]:
    """``dirty_pct``: the writer dirties that share of RAM an epoch (None: twice the
    measured capacity).  ``phases``: "on" (the throttle), "off" (none), in that order."""
    capacity = link_capacity(ram_mib=min(ram_mib, 256), batch_mib=32) * 1e9  # bytes/s
    mb_per_epoch = 2 * capacity * epoch_ms / 1000 / 1e6
    if dirty_pct is not None:
        mb_per_epoch = (ram_mib << 20) * dirty_pct / 100 / 1e6
    base = config(ram_mib, mb_per_epoch, epoch_ms, max_pause_ms)
    with running_engine(base, f"mirror-bench-throttle-{ram_mib}.ram") as engine:
        throttle = engine.throttle
        assert throttle is not None, engine.throttle_note
        t0 = time.monotonic()
        # on first: the snowball of a phase with no throttle takes long to drain (its
        # checkpoints hold most of RAM), and would start the other phase in its wake
        on = phase(engine, "on", seconds, t0) if "on" in phases else []
        engine.throttle = None
        until = time.monotonic() + 30
        while engine.in_flight and time.monotonic() < until:  # the throttled phase's tail
            engine.pump(time.monotonic() + 0.05)
            engine._check_stalled()
        off = phase(engine, "off", seconds, t0) if "off" in phases else []
        cap = engine._buffers.cap_bytes
        measured = engine.capacity.bytes_per_s
        scan = engine.method
    return {
        "ram_mib": ram_mib, "epoch_ms": epoch_ms, "max_pause_ms": max_pause_ms, "scan": scan,
        "capacity_mb_per_s": round(capacity / 1e6, 1),
        "writer_mb_per_epoch": round(mb_per_epoch, 1), "dirty_pct": dirty_pct,
        "send_buffer_cap_mb": round(cap / 1e6, 1),
        "off": summary(off, seconds), "on": summary(on, seconds), "rows": on + off,
        "throttled_s": round(throttle.throttled_s, 2),
        "capacity_from_acks_mb_per_s": round(measured / 1e6, 1),
    }  # fmt: skip


def report(r: dict[str, Any]) -> None:
    print(f"\nthrottle: {r['ram_mib']} MiB synthetic guest, {r['scan']} scan, "
          f"{r['epoch_ms']} ms epochs, max_pause_ms {r['max_pause_ms']}")  # fmt: skip
    what = f"{r['dirty_pct']}% of RAM" if r["dirty_pct"] is not None else "2x"
    print(f"pair capacity (same run, no guest): {r['capacity_mb_per_s']} MB/s; the writer: "
          f"{r['writer_mb_per_epoch']} MB an epoch at full speed ({what})")  # fmt: skip
    keys = list(r["on"]) if len(r["on"]) > 1 else list(r["off"])
    print(f"{'':24}{'off':>12}{'on':>12}")
    for k in keys:
        print(f"{k:24}{r['off'].get(k, '-'):>12}{r['on'].get(k, '-'):>12}")
    print(f"capacity measured from the acks with the guest running (at the end): "
          f"{r['capacity_from_acks_mb_per_s']} MB/s")  # fmt: skip
    print(f"throttled {r['throttled_s']} s of the 'on' phase; send buffers capped at "
          f"{r['send_buffer_cap_mb']} MB")  # fmt: skip
    on, off = r["on"], r["off"]
    if not on.get("checkpoints"):
        print("  MISS no checkpoint with the throttle")
        return
    ok = on["pause_ms_p50"] <= r["max_pause_ms"]
    print(f"  {'ok  ' if ok else 'MISS'} pause p50 with the throttle <= {r['max_pause_ms']} ms: "
          f"{on['pause_ms_p50']} ms")  # fmt: skip
    if not off.get("checkpoints"):
        return
    print(f"pause p50 on/off: {on['pause_ms_p50'] / off['pause_ms_p50']:.2f}x; "
          f"p99 on/off: {on['pause_ms_p99'] / off['pause_ms_p99']:.2f}x; in flight max "
          f"on/off: {on['in_flight_mb_max'] / off['in_flight_mb_max']:.2f}x")  # fmt: skip


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    fig, (ax, inflight) = plt.subplots(2, 1, figsize=(10, 5.6), sharex=True)
    t = [x["t"] for x in rows]
    ax.plot(t, [x["pause_ms"] for x in rows], lw=0.7, color="C0", label="pause (ms)")
    ax.axhline(r["max_pause_ms"], ls=":", color="C0", lw=1, label="max_pause_ms")
    ax.set_ylabel("pause (ms)")
    ax.set_yscale("log")
    lv = ax.twinx()
    lv.plot(t, [x["level"] for x in rows], color="C3", lw=1.2, label="throttle level")
    lv.set_ylim(0, 1)
    lv.set_ylabel("throttle level", color="C3")
    split = next((x["t"] for x in rows if x["phase"] == "off"), None)
    for a in (ax, inflight):
        if split is not None:
            a.axvline(split, color="k", lw=0.8)
        a.grid(alpha=0.3)
    what = f"{r['dirty_pct']}% of RAM an epoch" if r["dirty_pct"] is not None else (
        f"2x the pair's capacity ({r['capacity_mb_per_s']} MB/s)")  # fmt: skip
    ax.set_title(f"{r['ram_mib']} MiB guest writing {what}: throttle "
                 + ("on, then off" if split is not None else "on"))  # fmt: skip
    ax.legend(loc="lower left", fontsize=8)
    inflight.plot(t, [x["in_flight_bytes"] / 1e6 for x in rows], lw=0.7, color="C2")
    inflight.set_ylabel("in flight (MB)")
    inflight.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--epoch-ms", type=int, default=50)
    ap.add_argument("--max-pause-ms", type=int, default=15)
    ap.add_argument("--dirty-pct", type=float, help="share of RAM written an epoch "
                    "(default: twice the pair's measured capacity)")  # fmt: skip
    ap.add_argument("--phases", default="on,off", help="on,off (default), on, or off")
    ap.add_argument("--plot", type=Path, help="a PNG of pause and throttle level over time")
    ap.add_argument("--json", type=Path, help="the figures and every checkpoint's row")
    args = ap.parse_args(argv)
    phases = tuple(p for p in args.phases.split(",") if p in ("on", "off"))
    r = run(args.ram_mib, args.seconds, args.epoch_ms, args.max_pause_ms, args.dirty_pct, phases)
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    if args.plot:
        print(f"plot: {plot(r, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
