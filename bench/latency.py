"""What is my checkpoint pause at this RAM size and dirty rate?

    python -m bench.latency --ram-mib 1024 --dirty-pct 1 [--scan auto] [--checkpoints 40]
    python -m bench.latency --ram-mib 1024 --dirty-pct 1 --early-send both [--rounds 4]

The real engine (bench/checkpoint.py's run_case): a `mirror secondary` process and,
here, the primary's engine checkpointing a synthetic guest whose writes leave about
``--dirty-pct`` of its pages dirty per epoch.  Prints the pause p50/p99 and its split
(stop, scan, gather, state, resume) beside the floor measured on the same guest just
after (bench/floor.py).  6-12 s here at 256 MiB-1 GiB.

``--early-send both``: the pause without and with ``checkpoint.early_send`` (the pages
written early in the epoch sent while the guest runs), alternating in rounds on one
engine, guest and secondary (the dirty-page log), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bench.checkpoint import CheckpointResult, EarlyResult, compare_early, run_case
from mirror.config import CheckpointConfig
from mirror.replication import pagediff as pd


def report(r: CheckpointResult) -> list[str]:
    split = ", ".join(f"{k} {v:g}" for k, v in r.split_ms_p50.items())
    lines = [
        f"checkpoint pause: {r.ram_mib} MiB synthetic guest, {r.dirty_pct:g}% dirty per "
        f"{r.epoch_ms} ms epoch, scan {r.scan}, {r.checkpoints} checkpoints, real secondary"
        + (", early send on" if r.early_send else ""),
        f"  pause p50 {r.pause_ms_p50:.2f} ms, p99 {r.pause_ms_p99:.2f} ms "
        + (
            f"(pages in the pause p50 {r.dirty_pages_p50:.0f}, sent early p50 "
            f"{r.early_pages_p50:.0f})"
            if r.early_send
            else f"(dirty pages p50 {r.dirty_pages_p50:.0f})"
        ),
        f"  split p50 ms: {split}",
    ]
    if r.floor is not None:
        lines.append(f"  {r.floor.describe()} (same guest, same run)")
    lines.append(f"  pause p50 / floor: {r.pause_over_floor:.2f}")
    asked = r.dirty_pct / 100 * (r.ram_mib << 20) / pd.PAGE_SIZE
    if r.dirty_pages_p50 + r.early_pages_p50 > 2 * asked + 64:
        lines.append(
            f"  note: {r.dirty_pages_p50:.0f} dirty pages a checkpoint, not the {asked:.0f} "
            f"asked: the guest wrote faster than the pair replicated (the dirty set grew "
            f"while checkpoints waited for their acks): these are the figures of a backlog"
        )
    return lines


def report_early(r: EarlyResult) -> list[str]:
    throttle = f", throttle {r.max_pause_ms} ms" if r.max_pause_ms else ""
    return [
        f"early send: {r.ram_mib} MiB synthetic guest, {r.dirty_pct:g}% dirty per "
        f"{r.epoch_ms} ms epoch, scan log{throttle}, early send at {r.at_pct}%, "
        f"{r.rounds} rounds off/on, real secondary",
        f"  without: pause p50 {r.off_pause_p50:.2f} ms, p99 {r.off_pause_p99:.2f} ms, "
        f"pages in the pause p50 {r.off_pages_p50:.0f}, ack p50 {r.off_ack_ms_p50:.1f} ms "
        f"({r.off_checkpoints} checkpoints)",
        f"  with:    pause p50 {r.on_pause_p50:.2f} ms, p99 {r.on_pause_p99:.2f} ms, "
        f"pages in the pause p50 {r.on_pages_p50:.0f}, sent early p50 "
        f"{r.on_early_pages_p50:.0f} (in {r.on_early_ms_p50:.2f} ms, guest running), "
        f"ack p50 {r.on_ack_ms_p50:.1f} ms ({r.on_checkpoints} checkpoints)",
        "  split p50 ms (stop scan gather state resume): without "
        + " ".join(f"{v:g}" for v in r.off_split_ms_p50.values())
        + ", with "
        + " ".join(f"{v:g}" for v in r.on_split_ms_p50.values()),
        f"  with / without: pause p50 {r.ratio_p50:.2f}, p99 {r.ratio_p99:.2f}"
        + (
            f"; throttle level p50 {r.off_throttle_p50:g} / {r.on_throttle_p50:g}"
            if r.max_pause_ms
            else ""
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    d = CheckpointConfig()
    ap = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--ram-mib", type=int, default=1024, help="guest RAM (default 1024)")
    ap.add_argument("--dirty-pct", type=float, default=1.0,
                    help="share of pages dirtied per epoch (default 1)")  # fmt: skip
    ap.add_argument("--scan", default=d.scan, choices=("auto", "log", "hashed", "exact"),
                    help=f"checkpoint.scan (default {d.scan})")  # fmt: skip
    ap.add_argument("--epoch-ms", type=int, default=d.epoch_ms)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--checkpoints", type=int, default=40)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--early-send", choices=("on", "off", "both"),
                    default="on" if d.early_send else "off",
                    help="checkpoint.early_send (default: the pair's); both: without and "
                    "with, alternating in the same run")  # fmt: skip
    at = d.early_send_at_pct
    ap.add_argument("--early-at-pct", type=int, default=at,
                    help=f"checkpoint.early_send_at_pct (default {at})")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=4, help="--early-send both: off/on rounds")
    ap.add_argument("--max-pause-ms", type=int, default=0, help="the throttle (default 0: none)")
    args = ap.parse_args(argv)
    if args.ram_mib < 16 or not 0 <= args.dirty_pct < 100 or args.checkpoints < 5:
        ap.error("--ram-mib >= 16, 0 <= --dirty-pct < 100, --checkpoints >= 5")
    if args.early_send == "both":
        e = compare_early(
            args.ram_mib, args.dirty_pct, epoch_ms=args.epoch_ms, rounds=args.rounds,
            checkpoints=args.checkpoints, threads=args.threads, at_pct=args.early_at_pct,
            max_pause_ms=args.max_pause_ms,
        )  # fmt: skip
        print("\n".join(report_early(e)))
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(e), indent=2) + "\n")
        return 0
    r = run_case(
        args.ram_mib, args.dirty_pct, epoch_ms=args.epoch_ms, checkpoints=args.checkpoints,
        threads=args.threads, scan=args.scan, early_send=args.early_send == "on",
    )  # fmt: skip
    print("\n".join(report(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(r), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
