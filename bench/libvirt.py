"""libvirt guests: the checkpoint pause of a libvirt domain beside the same guest on
mirror's own QEMU backend, in one run; and QMP through libvirt vs a socket of mirror's.

    python -m bench.libvirt [--rounds N] [--ram-mib M] [--json PATH]

Root (a private libvirtd, mirror/lab/libvirtlab.py).  Two 128 MiB demo guests run at
once under TCG, idle but for their service: one booted by mirror's QemuGuest (the
baseline), one a libvirt domain (RAM on a shared file, NIC ``type='server'``, a QMP
socket added with ``<qemu:commandline>``) that a LibvirtGuest attaches to.  Rounds
alternate between
- mirror's own QEMU: ``stop``; hashed scan (2 threads) + gather while QEMU saves the
  device state; ``cont``;
- the libvirt domain, QMP on mirror's socket (``[libvirt] qmp = "socket"``): the same;
- the libvirt domain, QMP through libvirt (``qmp = "libvirt"``): the same;
- with the dirty-page log instead of the hashed scan (the domain's XML carries the
  preload library in ``<qemu:env>``): own QEMU, and the libvirt domain (QMP socket).
Each is split into stop, scan, device state, cont; medians and p90 of the pause, with
the ratios libvirt / own QEMU (target <= 1.3).  Then QMP round trips alone
(``query-status``) on each path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median, quantiles
from typing import Any

from mirror.config import LibvirtConfig, QemuConfig
from mirror.guests import image
from mirror.guests.base import Guest
from mirror.guests.libvirt import LibvirtGuest
from mirror.guests.libvirtqmp import LibvirtMonitor, Monitor, SocketMonitor
from mirror.guests.qemu import QemuGuest
from mirror.lab.demo import free_ports, wait_for
from mirror.lab.libvirtdemo import qmp_args
from mirror.lab.libvirtlab import LibvirtHost, domain_xml
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd


def _ms(t: float) -> float:
    return round(t * 1000, 3)


def one_pause(
    g: Guest, table: bytearray, out: Any, threads: int, log: dirtylog.DirtyLog | None = None
) -> dict[str, float]:
    ram = g.ram
    t0 = time.perf_counter()
    g.pause()
    t1 = time.perf_counter()
    dirty = log.scan() if log is not None else pd.scan_hashed(ram, table, threads=threads)
    pd.gather(ram, dirty, out=out)
    t2 = time.perf_counter()
    g.save_state()
    t3 = time.perf_counter()
    g.resume()
    t4 = time.perf_counter()
    return {"stop": t1 - t0, "scan": t2 - t1, "state": t3 - t2, "cont": t4 - t3,
            "pause": t4 - t0, "dirty": float(len(dirty))}  # fmt: skip


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    s = {k: _ms(median(r[k] for r in rows)) for k in rows[0] if k != "dirty"}
    s["pause_p90"] = _ms(quantiles([r["pause"] for r in rows], n=10)[-1])
    s["dirty_p50"] = median(r["dirty"] for r in rows)
    return s


def run(img: Path, ram_mib: int, rounds: int, threads: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-lv-"))
    ram_path = Path(f"/dev/shm/mirror-bench-lvq-{os.getpid()}.ram")
    cfg = QemuConfig(kernel=str(image.kernel(img)), initrd=str(img / "initramfs.cpio.gz"))
    own: QemuGuest | None = None
    lvg: LibvirtGuest | None = None
    host: LibvirtHost | None = None
    monitors: dict[str, Monitor] = {}
    logs: dict[str, dirtylog.DirtyLog] = {}
    try:
        own = QemuGuest.boot(cfg, ram_mib, ram_path, root / "qemu", lambda out: None)
        own.resume()
        host = LibvirtHost(root, "bench")
        sock = root / "qmp.sock"
        serial = root / "lv-serial.log"
        xml = domain_xml("bench", img, ram_mib=ram_mib, serial=serial, nic_port=free_ports(1)[0])
        extra = qmp_args(sock, log=True)  # the dirty-page log's preload library too
        host.connect().createXML(xml.replace("</domain>", extra + "</domain>"), 0)
        lvg = LibvirtGuest.attach(
            LibvirtConfig(domain="bench", connect=host.uri, qmp="socket"), ram_mib, lambda o: None
        )
        lvg.resume()
        assert isinstance(lvg.monitor, SocketMonitor)
        monitors = {"socket": lvg.monitor, "libvirt": LibvirtMonitor(lvg.call)}
        for what, path in (("own QEMU", own.serial_path), ("libvirt", serial)):
            ticking = lambda p=path: "guestd: tick" in p.read_text(errors="replace")  # noqa: E731
            wait_for(f"the {what} guest's service", ticking, 120, [])
        tables = {k: bytearray(pd.hash_table_size(ram_mib << 20)) for k in ("own", "lv")}
        pd.scan_hashed(own.ram, tables["own"], threads=threads)
        pd.scan_hashed(lvg.ram, tables["lv"], threads=threads)
        out = pd.alloc_pages((ram_mib << 20) // pd.PAGE_SIZE)
        rows: dict[str, list[dict[str, float]]] = {
            "own": [], "socket": [], "libvirt": [], "own_log": [], "socket_log": [],
            "libvirt_log": [],
        }  # fmt: skip
        if dirtylog.probe() is None:  # this kernel can keep the log
            logs = {"own": dirtylog.DirtyLog(own), "lv": dirtylog.DirtyLog(lvg)}
        qmp: dict[str, list[float]] = {"own": [], "socket": [], "libvirt": []}
        for _ in range(rounds):
            time.sleep(0.05)  # each guest runs an epoch
            rows["own"].append(one_pause(own, tables["own"], out, threads))
            for mode in ("socket", "libvirt"):
                lvg.monitor = monitors[mode]
                time.sleep(0.05)
                rows[mode].append(one_pause(lvg, tables["lv"], out, threads))
            if logs:
                lvg.monitor = monitors["socket"]
                time.sleep(0.05)
                rows["own_log"].append(one_pause(own, tables["own"], out, threads, logs["own"]))
                time.sleep(0.05)
                rows["socket_log"].append(one_pause(lvg, tables["lv"], out, threads, logs["lv"]))
                lvg.monitor = monitors["libvirt"]
                time.sleep(0.05)
                rows["libvirt_log"].append(one_pause(lvg, tables["lv"], out, threads, logs["lv"]))
            calls: list[tuple[str, Callable[[], Any]]] = [
                ("own", lambda: own.command("query-status")),
                ("socket", lambda: monitors["socket"].execute("query-status")),
                ("libvirt", lambda: monitors["libvirt"].execute("query-status")),
            ]
            for mode, call in calls:
                t0 = time.perf_counter()
                call()
                qmp[mode].append(time.perf_counter() - t0)
        lvg.monitor = monitors["socket"]
        res = {k: summary(v) for k, v in rows.items() if v}

        def log_ratio(key: str) -> float | None:
            return round(res[key]["pause"] / res["own_log"]["pause"], 3) if logs else None

        return {
            "ratio_log_socket_over_own_log": log_ratio("socket_log"),
            "ratio_log_libvirt_over_own_log": log_ratio("libvirt_log"),
            "ram_mib": ram_mib, "rounds": rounds, "threads": threads, "pause_ms": res,
            "ratio_socket_over_own": round(res["socket"]["pause"] / res["own"]["pause"], 3),
            "ratio_libvirt_over_own": round(res["libvirt"]["pause"] / res["own"]["pause"], 3),
            "qmp_roundtrip_ms_p50": {k: _ms(median(v)) for k, v in qmp.items()},
        }  # fmt: skip
    finally:
        for dl in logs.values():
            dl.close()
        if lvg is not None:
            if monitors.get("libvirt") is not None and lvg.monitor is not monitors["libvirt"]:
                monitors["libvirt"].close()
            lvg.stop()
        if host is not None:
            host.close()
        if own is not None:
            own.stop()
        ram_path.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.libvirt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=40, help="rounds of each (default 40)")
    ap.add_argument("--ram-mib", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="scan threads (default 2)")
    ap.add_argument("--image-dir", default=str(image.DEFAULT_DIR))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    img = image.ensure(Path(args.image_dir))
    r = run(img, args.ram_mib, args.rounds, args.threads)
    print(f"checkpoint pause, {args.ram_mib} MiB guest (TCG), light load, hashed scan "
          f"({args.threads} threads), medians of {args.rounds} rounds, same run:")  # fmt: skip
    print(f"  {'':32} {'stop':>7} {'scan':>7} {'dev st':>7} {'cont':>7} {'pause':>8} {'p90':>8}")
    for name, key in (("mirror's own QEMU (baseline)", "own"),
                      ("libvirt domain, QMP socket", "socket"),
                      ("libvirt domain, QMP via libvirt", "libvirt"),
                      ("own QEMU, dirty log (baseline)", "own_log"),
                      ("libvirt, QMP socket, dirty log", "socket_log"),
                      ("libvirt, via libvirt, dirty log", "libvirt_log")):  # fmt: skip
        if key not in r["pause_ms"]:
            continue
        p = r["pause_ms"][key]
        print(f"  {name:32} {p['stop']:7.2f} {p['scan']:7.2f} {p['state']:7.2f} "
              f"{p['cont']:7.2f} {p['pause']:8.2f} {p['pause_p90']:8.2f}")  # fmt: skip
    for key in ("socket", "libvirt"):
        ratio = r[f"ratio_{key}_over_own"]
        print(f"  pause ratio libvirt ({key}) / own QEMU: {ratio} "
              f"({'ok' if ratio <= 1.3 else 'MISS'}: target <= 1.3)")  # fmt: skip
    for key in ("socket", "libvirt"):
        ratio = r[f"ratio_log_{key}_over_own_log"]
        if ratio is not None:
            print(f"  with the dirty-page log: libvirt ({key}) / own QEMU: {ratio} "
                  f"({'ok' if ratio <= 1.3 else 'MISS'}: target <= 1.3)")  # fmt: skip
    q = r["qmp_roundtrip_ms_p50"]
    print(f"QMP round trip (query-status) p50: own QEMU socket {q['own']:.3f} ms, libvirt "
          f"domain's socket {q['socket']:.3f} ms, through libvirt "
          f"{q['libvirt']:.3f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
