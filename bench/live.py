"""`mirror pair --live`: what the guest's clients see while a running domain (as
virt-install defines it: private RAM, no preload, a qcow2 disk) is paired as it runs.

    sudo python -m bench.live [--rounds N] [--ram-mib M] [--json PATH]

Root (two simulated hosts, each its own libvirtd and `mirror agent`: the demo's lab).
Each round boots the domain on A, connects a TCP client that pings the guest every 5 ms
and logs every silence over 15 ms, waits a window W (3 s), runs `mirror pair web01 --peer
hostB --live`, and waits W after it is protected.  Printed per round and as medians:

- the time from `mirror pair --live` to protected, beside the issue's target (30 s +
  RAM / 1 GB/s);
- the client's longest silence in the window before pairing (the baseline: TCG and the
  machine's own jitter), while pairing (from the command to protected: the guest is
  paused from the attach until the standby answers, then pre-copy runs with it running),
  and in the window after (protected: each reply held until its checkpoint commits);
- the primary's checkpoint pause p50 once protected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from mirror.guests import image
from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import IC_IP, GuestLan

WINDOW_S = 3.0


def _longest(events: list[dict[str, Any]], a: float, b: float) -> float:
    """The longest silence (ms) that ended in [a, b]."""
    return max((1000 * e["silence_s"] for e in events
                if e["event"] in ("silence", "resumed-after-silence") and a <= e["t"] <= b),
               default=0.0)  # fmt: skip


def _migrate(guest: libvirtdemo.LibvirtDemoGuest, src: str, dst: str) -> dict[str, Any]:
    """`virsh migrate --live --copy-storage-all` of the domain from host ``src`` to ``dst``
    (the client-driven API: the bench holds both connections), the migration stream and
    the disk's NBD on the interconnect; its time and libvirt's own downtime figure."""
    import libvirt

    dconn = guest.hosts[dst].connect()
    images = guest.hosts[dst].root / "lib" / "images"
    images.mkdir(parents=True, exist_ok=True)
    target = images / f"{libvirtdemo.DOMAIN}.qcow2"
    if not target.exists():  # (libvirt copies the disk into an image that must be there)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target),
                        f"{libvirtdemo.DISK_MIB}M"], check=True)  # fmt: skip
    dom = guest.hosts[src].connect().lookupByName(libvirtdemo.DOMAIN)
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{IC_IP[dst]}:49200",
              libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: IC_IP[dst]}  # fmt: skip
    t0 = time.time()
    flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_DISK
    moved = dom.migrate3(dconn, params, flags)
    t1 = time.time()
    stats: dict[str, Any] = {}
    with contextlib.suppress(libvirt.libvirtError):
        stats = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return {"from": t0, "to": t1, "s": round(t1 - t0, 2), "downtime_ms": stats.get("downtime")}


def one_round(
    img: Path, ram_mib: int, keep: bool = False, migrate: bool = True
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mirror-blive-"))
    lan = GuestLan()
    hosts: list[Host] = []
    log = root / "client.jsonl"
    box: dict[str, Any] = {}
    guest: libvirtdemo.LibvirtDemoGuest

    def before_pair() -> None:
        serial = guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120, hosts)
        box["client"] = qemudemo.start_client(lan, log, connect_for=60, echo_every=0.005,
                                              gaps_over=0.015)  # fmt: skip
        wait_for("the client", lambda: any(e["event"] == "connected"
                                           for e in qemudemo.client_events(log)), 60, hosts)
        time.sleep(WINDOW_S)
        if migrate:  # the baseline: libvirt's own live migration there and back
            box["migrations"] = [_migrate(guest, "A", "B"), _migrate(guest, "B", "A")]
            time.sleep(WINDOW_S)
        box["pair_at"] = time.time()

    guest = libvirtdemo.LibvirtDemoGuest(bridges=("br0",), live=True, before_pair=before_pair)
    try:
        base = libvirtdemo.default_base(ram_mib=ram_mib)
        a, _b = guest.start(lan, root, base, img, "web01", hosts, lambda *_a, **_k: None)
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        protected_at = time.time()
        time.sleep(WINDOW_S)
        st = a.status() or {}
        ev = qemudemo.client_events(log)
        pair_at = box["pair_at"]
        said = guest.pair_output[-1]  # "web01 is protected by hostB (2.5 s)"
        took = float(said.rsplit("(", 1)[1].split()[0]) if "(" in said else protected_at - pair_at
        migs = box.get("migrations", [])
        mig = {
            f"migrate_{i}_{k}": v
            for i, m in enumerate(migs, 1)
            for k, v in (("s", m["s"]), ("downtime_ms", m["downtime_ms"]),
                         ("silence_ms", round(_longest(ev, m["from"], m["to"] + 0.5), 1)))
        }  # fmt: skip
        return {
            **mig,
            "to_protected_s": round(took, 2),
            "silence_before_ms": round(_longest(ev, pair_at - WINDOW_S, pair_at), 1),
            "silence_pairing_ms": round(_longest(ev, pair_at, protected_at), 1),
            "silence_after_ms": round(_longest(ev, protected_at, protected_at + WINDOW_S), 1),
            "pause_p50_ms": st.get("summary", {}).get("pause_ms_p50"),
            "connection_broken": any(e["event"] == "summary" and e.get("error") for e in ev),
        }
    finally:
        qemudemo.stop_all(box.get("client"), hosts, guest, lan)
        if keep:
            print(f"files kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ram-mib", type=int, default=128)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--keep", action="store_true", help="keep each round's files (logs)")
    ap.add_argument("--no-migrate", action="store_true",
                    help="without the baseline (libvirt's live migration there and back)")
    args = ap.parse_args(argv)
    with contextlib.suppress(ImportError):  # libvirt's errors are reported, not printed
        import libvirt

        libvirt.registerErrorHandler(lambda ctx, err: None, None)
    img = image.ensure(image.DEFAULT_DIR, say=lambda s: None)
    rows = []
    for i in range(args.rounds):
        r = one_round(Path(img), args.ram_mib, args.keep, not args.no_migrate)
        rows.append(r)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    target = 30 + args.ram_mib / 1000
    keys = [k for k in rows[0] if k != "connection_broken"]
    med = {k: median(float(r[k]) for r in rows if r.get(k) is not None)
           for k in keys if any(r.get(k) is not None for r in rows)}  # fmt: skip
    print(f"\n{args.ram_mib} MiB, {args.rounds} rounds, medians:")
    print(f"  mirror pair --live to protected: {med['to_protected_s']:.2f} s "
          f"(target < {target:.1f} s: 30 s + RAM / 1 GB/s)")
    before = med["silence_before_ms"]
    print(f"  client's longest silence: before pairing "
          f"{f'{before:.1f} ms' if before else 'none over 15 ms'} (the baseline), while pairing "
          f"{med['silence_pairing_ms']:.1f} ms, protected {med['silence_after_ms']:.1f} ms "
          f"(each reply held until its checkpoint commits); checkpoint pause p50 "
          f"{med['pause_p50_ms']:.1f} ms")
    if "migrate_1_s" in med:
        print(f"  beside it, libvirt's own `virsh migrate --live --copy-storage-all` of the "
              f"same domain (to B, then back to A): {med['migrate_1_s']:.2f} s and "
              f"{med['migrate_2_s']:.2f} s, libvirt's downtime "
              f"{med.get('migrate_1_downtime_ms', float('nan')):.0f} ms and "
              f"{med.get('migrate_2_downtime_ms', float('nan')):.0f} ms, the client's longest "
              f"silence {med['migrate_1_silence_ms']:.1f} ms and "
              f"{med['migrate_2_silence_ms']:.1f} ms")
        base = max(med["migrate_1_silence_ms"], med["migrate_2_silence_ms"])
        print(f"  pairing live / migrating: longest silence "
              f"{med['silence_pairing_ms'] / max(base, 1):.2f}x (target <= 1 + one checkpoint "
              f"pause: {(base + med['pause_p50_ms']) / max(base, 1):.2f}x)")
    if any(r["connection_broken"] for r in rows):
        print("  a client's connection broke")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rows, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
