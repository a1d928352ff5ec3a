"""QEMU guests: the checkpoint pause beside QEMU's own full snapshot, and the guest's
counter rate protected vs unprotected.

    python -m bench.qemu [--rounds N] [--ram-mib M] [--rates] [--json PATH]

1. Pause (no root needed): one 128 MiB guest under QEMU (TCG), idle but for its
   service (light load).  Rounds alternate, in the same run, between
   - mirror's checkpoint: ``stop``; hashed scan of the RAM file (2 threads) and
     gather of the dirty pages, while QEMU saves the device state; ``cont``;
   - the full snapshot (the baseline): ``stop``; a copy of all of RAM; the
     device state (``xen-save-devices-state``); ``cont``.
   - mirror's checkpoint with the dirty-page log: ``stop``; the log's scan of
     QEMU's pagemap and gather of the pages it lists; device state; ``cont``
     (the log spans the two epochs since its last scan, so it lists more pages);
   Each is split into stop, scan/copy, device state (time waited for it after
   the scan), cont; medians are printed with the ratio mirror / full.  The log's
   floor: two QMP round trips and a memcpy of the bytes of the pages it listed.  The
   floor of any such pause is measured in the same run too: two QMP round
   trips and one plain read pass over the guest's RAM.
2. ``--rates`` (root: namespaces and TAP devices): the guest's counter stream as
   its TCP client reads it (lines per second), protected at 20, 50 and 100 ms
   epochs, and unprotected in the same run (the secondary killed: the primary
   runs on alone, releasing at once); the ratio protected / unprotected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from mirror.config import QemuConfig
from mirror.guests import image
from mirror.guests.qemu import QemuGuest
from mirror.lab import qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd


def _ms(t: float) -> float:
    return round(t * 1000, 3)


def pause_rounds(img: Path, ram_mib: int, rounds: int, threads: int) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="mirror-bench-qemu-"))
    ram_path = Path(f"/dev/shm/mirror-bench-qemu-{os.getpid()}.ram")
    cfg = QemuConfig(kernel=str(img / "vmlinuz"), initrd=str(img / "initramfs.cpio.gz"))
    g = QemuGuest.boot(cfg, ram_mib, ram_path, run_dir, lambda out: None)
    try:
        g.resume()
        wait_for("the guest's service", lambda: "guestd: tick" in g.serial_path.read_text(),
                 120, [])  # fmt: skip
        ram = g.ram
        table = bytearray(pd.hash_table_size(len(ram)))
        pd.scan_hashed(ram, table, threads=threads)
        out = pd.alloc_pages(len(ram) // pd.PAGE_SIZE)
        full = pd.alloc_pages(len(ram) // pd.PAGE_SIZE)
        mirror: list[dict[str, float]] = []
        snapshot: list[dict[str, float]] = []
        floor: list[dict[str, float]] = []
        logged: list[dict[str, float]] = []
        log_floor: list[float] = []
        dirty_counts = []
        log_counts = []
        dlog = dirtylog.DirtyLog(g) if dirtylog.probe() is None else None
        copy_src = pd.alloc_pages(len(ram) // pd.PAGE_SIZE)
        for _ in range(rounds):
            if dlog is not None:
                time.sleep(0.05)
                t0 = time.perf_counter()
                g.pause()
                t1 = time.perf_counter()
                ldirty = dlog.scan()
                pd.gather(ram, ldirty, out=out)
                t2 = time.perf_counter()
                g.save_state()
                t3 = time.perf_counter()
                g.resume()
                t4 = time.perf_counter()
                log_counts.append(len(ldirty))
                logged.append({"stop": t1 - t0, "scan": t2 - t1, "state": t3 - t2,
                               "cont": t4 - t3, "pause": t4 - t0})  # fmt: skip
                n = len(ldirty) * pd.PAGE_SIZE  # the floor: a memcpy of the same bytes
                t0 = time.perf_counter()
                memoryview(full)[:n] = memoryview(copy_src)[:n]
                log_floor.append(time.perf_counter() - t0)
            # the floor, in the same run: a plain read pass over the RAM (what any scan
            # from outside must do) and two QMP round trips (the stop and the cont)
            t0 = time.perf_counter()
            g.command("query-status")
            g.command("query-status")
            t1 = time.perf_counter()
            pd.read_ceiling(ram, threads=threads)
            t2 = time.perf_counter()
            floor.append({"qmp": t1 - t0, "read": t2 - t1, "pause": t2 - t0})
            time.sleep(0.05)  # the guest runs an epoch
            t0 = time.perf_counter()
            g.pause()  # stop; QEMU starts saving the device state
            t1 = time.perf_counter()
            dirty = pd.scan_hashed(ram, table, threads=threads)
            pd.gather(ram, dirty, out=out)
            t2 = time.perf_counter()
            g.save_state()
            t3 = time.perf_counter()
            g.resume()
            t4 = time.perf_counter()
            dirty_counts.append(len(dirty))
            mirror.append({"stop": t1 - t0, "scan": t2 - t1, "state": t3 - t2,
                           "cont": t4 - t3, "pause": t4 - t0})  # fmt: skip
            time.sleep(0.05)
            t0 = time.perf_counter()
            g.command("stop")
            t1 = time.perf_counter()
            full[:] = ram  # all of RAM
            t2 = time.perf_counter()
            g.command("xen-save-devices-state", filename=str(g.devstate_path), live=False)
            g.devstate_path.read_bytes()
            t3 = time.perf_counter()
            g.command("cont")
            t4 = time.perf_counter()
            snapshot.append({"stop": t1 - t0, "scan": t2 - t1, "state": t3 - t2,
                             "cont": t4 - t3, "pause": t4 - t0})  # fmt: skip
    finally:
        if dlog is not None:
            dlog.close()
        g.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    def med(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: _ms(median(r[k] for r in rows)) for k in rows[0]}

    m, f, fl = med(mirror), med(snapshot), med(floor)
    return {
        "ram_mib": ram_mib, "rounds": rounds, "threads": threads,
        "dirty_pages_p50": median(dirty_counts), "mirror_ms": m, "full_snapshot_ms": f,
        "pause_ratio_mirror_over_full": round(m["pause"] / f["pause"], 3),
        "floor_ms": fl, "pause_ratio_mirror_over_floor": round(m["pause"] / fl["pause"], 3),
        **_log_result(logged, log_counts, fl["qmp"], log_floor, med),
    }  # fmt: skip


def _log_result(logged: list[dict[str, float]], counts: list[int], qmp_ms: float,
                copies: list[float], med: Any) -> dict[str, Any]:  # fmt: skip
    if not logged:
        return {"log": None}
    lm = med(logged)
    floor = round(qmp_ms + _ms(median(copies)), 3)
    return {"log": {"dirty_pages_p50": median(counts), "ms": lm, "floor_ms": floor,
                    "pause_over_floor": round(lm["pause"] / floor, 3)}}  # fmt: skip


def _rate(log: Path, since: float, until: float) -> float:
    ev = [e for e in qemudemo.client_events(log)
          if e["event"] == "counter" and since <= e["t"] <= until]  # fmt: skip
    if len(ev) < 2:
        return 0.0
    return float(ev[-1]["n"] - ev[0]["n"]) / float(ev[-1]["t"] - ev[0]["t"])


def rate_run(img: Path, epoch_ms: int, window: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-rate-"))
    base = qemudemo.default_base(128, epoch_ms)
    cfg_a, cfg_b = qemudemo.configs(root, base, img, f"brate{os.getpid()}x{epoch_ms}")
    hosts: list[Host] = []
    client = None
    with GuestLan() as lan:
        try:
            a, b = qemudemo.start_pair(lan, root, cfg_a, cfg_b, hosts)
            log = root / "client.jsonl"
            client = qemudemo.start_client(lan, log)
            wait_for("the client", lambda: any(e["event"] == "connected"
                     for e in qemudemo.client_events(log)), 120, hosts)  # fmt: skip
            time.sleep(1)
            t0 = time.time()
            time.sleep(window)
            protected = _rate(log, t0, time.time())
            pauses = (a.status() or {}).get("summary", {})
            b.signal(signal.SIGKILL)
            b.proc.wait()
            wait_for("A unprotected", lambda: (a.status() or {}).get("phase") == "unprotected",
                     30, [a])  # fmt: skip
            time.sleep(1)
            t0 = time.time()
            time.sleep(window)
            unprotected = _rate(log, t0, time.time())
        finally:
            if client is not None:
                os.killpg(client.pid, signal.SIGKILL)
                client.wait()
            for h in hosts:
                h.stop()
            shutil.rmtree(root, ignore_errors=True)
    return {
        "epoch_ms": epoch_ms,
        "protected_lines_per_s": round(protected, 2),
        "unprotected_lines_per_s": round(unprotected, 2),
        "ratio": round(protected / unprotected, 3) if unprotected else None,
        "pause_ms_p50": pauses.get("pause_ms_p50"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.qemu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=40, help="rounds of each (default 40)")
    ap.add_argument("--ram-mib", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="scan threads (default 2)")
    ap.add_argument("--rates", action="store_true", help="also the counter rates (root)")
    ap.add_argument("--window", type=float, default=8.0, help="seconds per rate window")
    ap.add_argument("--image-dir", default=str(image.DEFAULT_DIR))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    img = image.ensure(Path(args.image_dir))
    res: dict[str, Any] = {"pause": pause_rounds(img, args.ram_mib, args.rounds, args.threads)}
    p = res["pause"]
    print(f"checkpoint pause, {args.ram_mib} MiB QEMU guest (TCG), light load, medians of "
          f"{args.rounds} (dirty pages p50 {p['dirty_pages_p50']}):")  # fmt: skip
    print(f"  {'':22} {'stop':>7} {'scan/copy':>10} {'dev state':>10} {'cont':>7} {'pause':>8}")
    for name, key in (("mirror (hashed, 2t)", "mirror_ms"), ("full snapshot", "full_snapshot_ms")):
        r = p[key]
        print(f"  {name:22} {r['stop']:7.2f} {r['scan']:10.2f} {r['state']:10.2f} "
              f"{r['cont']:7.2f} {r['pause']:8.2f}")  # fmt: skip
    if p.get("log"):
        r = p["log"]["ms"]
        print(f"  {'mirror (dirty log)':22} {r['stop']:7.2f} {r['scan']:10.2f} {r['state']:10.2f} "
              f"{r['cont']:7.2f} {r['pause']:8.2f}   (dirty pages p50 "
              f"{p['log']['dirty_pages_p50']})")  # fmt: skip
        ok = "ok" if p["log"]["pause_over_floor"] <= 1.5 else "MISS"
        print(f"  log floor (same run): two QMP round trips + a memcpy of its dirty bytes = "
              f"{p['log']['floor_ms']:.2f} ms; log pause / floor: "
              f"{p['log']['pause_over_floor']} ({ok}: target <= 1.5)")  # fmt: skip
        with_state = p["log"]["floor_ms"] + p["full_snapshot_ms"]["state"]
        print(f"  with QEMU's device-state save of the full snapshot added to that floor: "
              f"{with_state:.2f} ms; log pause / that: "
              f"{r['pause'] / with_state:.2f}")  # fmt: skip
    fl = p["floor_ms"]
    print(f"  floor (same run): two QMP round trips {fl['qmp']:.2f} + a read pass over RAM "
          f"{fl['read']:.2f} = {fl['pause']:.2f} ms")  # fmt: skip
    print(f"  pause ratio mirror / full snapshot: {p['pause_ratio_mirror_over_full']}; "
          f"mirror / floor: {p['pause_ratio_mirror_over_floor']}")  # fmt: skip
    if args.rates:
        res["rates"] = [rate_run(img, e, args.window) for e in (20, 50, 100)]
        print("guest counter rate (lines/s at the client), protected vs unprotected:")
        for r in res["rates"]:
            print(f"  epoch {r['epoch_ms']:3d} ms: protected {r['protected_lines_per_s']:6.2f}, "
                  f"unprotected {r['unprotected_lines_per_s']:6.2f}, ratio {r['ratio']} "
                  f"(pause p50 {r['pause_ms_p50']} ms)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
