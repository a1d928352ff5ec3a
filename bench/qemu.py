"""QEMU guests: the checkpoint pause beside QEMU's own full snapshot, and the guest's
counter rate protected vs unprotected.

    python -m bench.qemu [--rounds N] [--ram-mib M] [--before] [--rates] [--json PATH]

1. Pause (no root needed): one 128 MiB guest under QEMU (TCG), idle but for its
   service (light load).  Rounds alternate, in the same run, between
   - mirror's checkpoint: ``stop`` and the device-state save sent in one write;
     hashed scan of the RAM file (2 threads) and gather of the dirty pages, while
     QEMU saves the device state; ``cont``;
   - the full snapshot (the baseline): ``stop``; a copy of all of RAM; the
     device state (``xen-save-devices-state``); ``cont``.
   - mirror's checkpoint with the dirty-page log: ``stop``; the log's scan of
     QEMU's pagemap and gather of the pages it lists; device state; ``cont``
     (the log spans the two epochs since its last scan, so it lists more pages);
   Each is split into stop, scan/copy, device state (time waited for it after
   the scan), cont; medians are printed with the ratio mirror / full.
   - a bare round: ``stop``, a no-op QMP round trip, the device-state save alone,
     ``cont``, each waited for: what QEMU itself spends on each (less the no-op).
   The floor (bench/floor.py), on the same guest after the rounds: its bare ``stop`` +
   ``cont`` and a memcpy of as many pages as the method found dirty.
2. ``--before``: today's pause path (QMP on a plain socket, ``stop`` and the device-state
   save in one write, the state into a memfd) beside the one before issue 23 (qemu.qmp's
   asyncio client, the save sent after ``stop``'s answer, the state through a file): two
   guests alike, a log checkpoint on each in turn.
3. ``--rates`` (root: namespaces and TAP devices): the guest's counter stream as
   its TCP client reads it (lines per second), protected at 20, 50 and 100 ms
   epochs, and unprotected in the same run (the secondary killed: the primary
   runs on alone, releasing at once); the ratio protected / unprotected.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from statistics import median
from typing import Any, cast

from bench import floor
from bench.libvirt import one_pause
from mirror.config import QemuConfig
from mirror.guests import image
from mirror.guests.base import Guest
from mirror.guests.qemu import QemuGuest
from mirror.lab import qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd


def _ms(t: float) -> float:
    return round(t * 1000, 3)


def _qemu_own(g: QemuGuest) -> dict[str, float]:
    """A bare round on the running guest, each command waited for: ``stop``, a no-op
    (``query-status``: the QMP round trip itself, QEMU idle), the device-state save
    alone, ``cont``; what QEMU spends on each is its round trip less the no-op's."""
    t0 = time.perf_counter()
    g.command("stop")
    t1 = time.perf_counter()
    g.command("query-status")
    t2 = time.perf_counter()
    g.save_state()
    t3 = time.perf_counter()
    g.command("cont")
    t4 = time.perf_counter()
    return {"stop": t1 - t0, "noop": t2 - t1, "state": t3 - t2, "cont": t4 - t3}


def _wait_service(g: QemuGuest) -> None:
    wait_for("the guest's service", lambda: "guestd: tick" in g.serial_path.read_text(), 120, [])


class OldPath:
    """The pause path before issue 23, the same run's baseline: qemu.qmp's asyncio client
    on a thread of its own, ``stop`` waited for, then the device-state save into a file
    in the guest's run directory (read back after), then ``cont``."""

    def __init__(self, g: QemuGuest) -> None:
        from qemu.qmp import QMPClient

        assert g.qmp is not None
        g.qmp.close()  # QEMU serves one client on its socket
        g.qmp = None
        self.g, self.ram = g, g.ram
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = QMPClient("bench-old-path")
        self.client.events.names = {"SHUTDOWN"}
        self._run(self.client.connect(str(g.qmp_path))).result(30)
        self.saving: concurrent.futures.Future[Any] | None = None

    def _run(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def command(self, name: str, **args: Any) -> Any:
        return self._run(self.client.execute(name, args or None)).result(60)

    def pause(self) -> None:
        self.command("stop")
        self.g.relay.drain()
        self.saving = self._run(self.client.execute(
            "xen-save-devices-state", {"filename": str(self.g.devstate_path), "live": False}
        ))  # fmt: skip

    def save_state(self) -> bytes:
        assert self.saving is not None
        self.saving.result(60)
        return self.g.devstate_path.read_bytes()

    def resume(self) -> None:
        self.command("cont")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("quit")
        with contextlib.suppress(Exception):
            self._run(self.client.disconnect()).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(2)
        self.loop.close()


def path_ab(img: Path, ram_mib: int, rounds: int) -> dict[str, Any]:
    """Today's pause path and the one before issue 23 in the same run: two guests alike,
    a log checkpoint on each in turn (the order swapped every round)."""
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-qemu-ab-"))
    cfg = QemuConfig(kernel=str(image.kernel(img)), initrd=str(img / "initramfs.cpio.gz"))
    guests: list[QemuGuest] = []
    logs: list[dirtylog.DirtyLog] = []
    old = None
    try:
        for name in ("new", "old"):
            ram_path = Path(f"/dev/shm/mirror-bench-qemu-{os.getpid()}-{name}.ram")
            g = QemuGuest.boot(cfg, ram_mib, ram_path, root / name, lambda out: None)
            guests.append(g)
            g.resume()
        for g in guests:
            _wait_service(g)
            logs.append(dirtylog.DirtyLog(g))
        old = OldPath(guests[1])
        out = pd.alloc_pages(len(guests[0].ram) // pd.PAGE_SIZE)
        table = bytearray()  # (the log's rounds use no table)
        rows: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
        for i in range(rounds):
            order: list[tuple[str, QemuGuest | OldPath, dirtylog.DirtyLog]] = [
                ("new", guests[0], logs[0]),
                ("old", old, logs[1]),
            ]
            for name, path, dlog in order[:: 1 if i % 2 else -1]:
                time.sleep(0.05)
                rows[name].append(one_pause(cast(Guest, path), table, out, 1, dlog))
    finally:
        for dlog in logs:
            dlog.close()
        if old is not None:
            old.close()
        for g in guests:
            g.stop()
        shutil.rmtree(root, ignore_errors=True)
    res: dict[str, Any] = {
        k: {f: _ms(median(r[f] for r in v)) for f in v[0] if f != "dirty"} for k, v in rows.items()
    }
    res["dirty_pages_p50"] = median(r["dirty"] for v in rows.values() for r in v)
    return res


def pause_rounds(img: Path, ram_mib: int, rounds: int, threads: int) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix="mirror-bench-qemu-"))
    ram_path = Path(f"/dev/shm/mirror-bench-qemu-{os.getpid()}.ram")
    cfg = QemuConfig(kernel=str(image.kernel(img)), initrd=str(img / "initramfs.cpio.gz"))
    g = QemuGuest.boot(cfg, ram_mib, ram_path, run_dir, lambda out: None)
    try:
        g.resume()
        _wait_service(g)
        ram = g.ram
        table = bytearray(pd.hash_table_size(len(ram)))
        pd.scan_hashed(ram, table, threads=threads)
        out = pd.alloc_pages(len(ram) // pd.PAGE_SIZE)
        full = pd.alloc_pages(len(ram) // pd.PAGE_SIZE)
        mirror: list[dict[str, float]] = []
        snapshot: list[dict[str, float]] = []
        own: list[dict[str, float]] = []
        logged: list[dict[str, float]] = []
        dirty_counts = []
        log_counts = []
        dlog = dirtylog.DirtyLog(g) if dirtylog.probe() is None else None
        for _ in range(rounds):
            if dlog is not None:
                time.sleep(0.05)
                logged.append(one_pause(g, table, out, threads, dlog))
                log_counts.append(int(logged[-1].pop("dirty")))
            time.sleep(0.05)
            own.append(_qemu_own(g))
            time.sleep(0.05)  # the guest runs an epoch
            mirror.append(one_pause(g, table, out, threads))
            dirty_counts.append(int(mirror[-1].pop("dirty")))
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
        # the floor (bench/floor.py), on the same guest: its bare checkpoint (stop,
        # device state, cont) and a memcpy of as many pages as each method found dirty
        bare = floor.bare_checkpoint(g)
        floors = {"hashed": floor.measure(bare, round(median(dirty_counts)), rounds)}
        if log_counts:
            floors["log"] = floor.measure(bare, round(median(log_counts)), rounds)
    finally:
        if dlog is not None:
            dlog.close()
        g.stop()
        shutil.rmtree(run_dir, ignore_errors=True)

    def med(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: _ms(median(r[k] for r in rows)) for k in rows[0]}

    m, f, q = med(mirror), med(snapshot), med(own)
    return {
        "ram_mib": ram_mib, "rounds": rounds, "threads": threads,
        "dirty_pages_p50": median(dirty_counts), "mirror_ms": m, "full_snapshot_ms": f,
        "pause_ratio_mirror_over_full": round(m["pause"] / f["pause"], 3),
        "floor": asdict(floors["hashed"]) | {"ms": floors["hashed"].ms},
        "pause_ratio_mirror_over_floor": round(m["pause"] / floors["hashed"].ms, 3),
        "qemu_round_trips_ms": q,
        "log": None if not logged else {
            "dirty_pages_p50": median(log_counts), "ms": med(logged),
            "floor": asdict(floors["log"]) | {"ms": floors["log"].ms},
            "pause_over_floor": round(med(logged)["pause"] / floors["log"].ms, 3),
        },
    }  # fmt: skip


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


_HEADER = f"  {'':22} {'stop':>7} {'scan/copy':>10} {'dev state':>10} {'cont':>7} {'pause':>8}"


def _row(name: str, r: dict[str, float]) -> str:
    return (f"  {name:22} {r['stop']:7.2f} {r['scan']:10.2f} {r['state']:10.2f} "
            f"{r['cont']:7.2f} {r['pause']:8.2f}")  # fmt: skip


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
    ap.add_argument("--before", action="store_true",
                    help="also today's pause path beside the one before issue 23 (two guests, "
                         "same run)")  # fmt: skip
    ap.add_argument("--window", type=float, default=8.0, help="seconds per rate window")
    ap.add_argument("--image-dir", default=str(image.DEFAULT_DIR))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    img = image.ensure(Path(args.image_dir))
    res: dict[str, Any] = {"pause": pause_rounds(img, args.ram_mib, args.rounds, args.threads)}
    p = res["pause"]
    print(f"checkpoint pause, {args.ram_mib} MiB QEMU guest (TCG), light load, medians of "
          f"{args.rounds} (dirty pages p50 {p['dirty_pages_p50']}):")  # fmt: skip
    print(_HEADER)
    for name, key in (("mirror (hashed, 2t)", "mirror_ms"), ("full snapshot", "full_snapshot_ms")):
        print(_row(name, p[key]))
    if p.get("log"):
        print(_row("mirror (dirty log)", p["log"]["ms"])
              + f"   (dirty pages p50 {p['log']['dirty_pages_p50']})")  # fmt: skip
    q = p["qemu_round_trips_ms"]
    own = {k: round(max(0.0, q[k] - q["noop"]), 2) for k in ("stop", "state", "cont")}
    print(f"  QMP round trips (same run, bare): stop {q['stop']:.2f}, no-op {q['noop']:.2f}, "
          f"device-state save alone {q['state']:.2f}, cont {q['cont']:.2f}; QEMU's own in "
          f"them (less the no-op): stop {own['stop']}, save {own['state']}, "
          f"cont {own['cont']}")  # fmt: skip
    for name, row, fl in (("log", p["log"] and p["log"]["ms"], p["log"] and p["log"]["floor"]),
                          ("hashed", p["mirror_ms"], p["floor"])):  # fmt: skip
        if not row:
            continue
        ratio = row["pause"] / fl["ms"]
        print(f"  {name}: floor {fl['ms']:.2f} ms = bare checkpoint {fl['bare_ms']:.2f} "
              f"+ memcpy of {fl['pages']} pages {fl['copy_ms']:.2f}; pause / floor "
              f"{ratio:.2f}" + (f" ({'ok' if ratio <= 2.5 else 'MISS'}: target <= 2.5)"
                                if name == "log" else ""))  # fmt: skip
    if p.get("log"):  # where the log's pause goes: QEMU's own work, the wire, ours
        r = p["log"]["ms"]
        qemu_ms = own["stop"] + own["cont"] + r["state"]
        wire_ms = 2 * q["noop"]
        print(f"  log pause {r['pause']:.2f} ms: QEMU's own {qemu_ms:.2f} (stop {own['stop']}, "
              f"cont {own['cont']}, the save's rest after the scan {r['state']:.2f}), two QMP "
              f"round trips {wire_ms:.2f}, mirror's {r['pause'] - qemu_ms - wire_ms:.2f} (scan + "
              f"gather {r['scan']:.2f}, the rest: Python, the NIC relay's drain)")  # fmt: skip
    print(f"  pause ratio mirror / full snapshot: {p['pause_ratio_mirror_over_full']}")
    if args.before:
        ab = res["before"] = path_ab(img, args.ram_mib, args.rounds)
        print(f"the pause path, same run: two {args.ram_mib} MiB guests, a log checkpoint on "
              f"each in turn, medians of {args.rounds} (dirty pages p50 "
              f"{ab['dirty_pages_p50']}):")  # fmt: skip
        print(_HEADER)
        print(_row("today", ab["new"]) + "   (QMP socket; stop + save in one write; memfd)")
        print(_row("before issue 23", ab["old"]) + "   (qemu.qmp asyncio; save after stop; file)")
        print(f"  today / before: {ab['new']['pause'] / ab['old']['pause']:.2f}")
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
