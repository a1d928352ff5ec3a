"""The checkpoint pause with and without a guest disk, in one run (root: namespaces).

    python -m bench.disk_pause [--window S] [--epoch-ms MS] [--image-dir DIR] [--json PATH]

Three pairs of a 128 MiB QEMU guest (TCG), one after the other, each protected at
``--epoch-ms`` for ``--window`` seconds after it settles:
  1. no disk (the baseline);
  2. a 16 MiB disk, idle (the guest does not write it): the barrier's cost alone;
  3. the same disk with the guest writing it (random 4 KiB blocks, each fsync'd:
     ``mirror.diskload=rand``): the barrier after drained I/O, and the pause of a guest
     doing disk I/O.
Printed: the primary's pause p50 and p99 over its recent checkpoints, the split p50
(stop, scan, gather, state, resume), the disk's writes in the window, and each case's
p50 beside the baseline's (difference and ratio).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.guests import image
from mirror.lab import qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan

CASES = [("no disk", 0, ""), ("disk, idle", 16, ""), ("disk, guest writing", 16, "rand")]


def one_case(
    img: Path, epoch_ms: int, window: float, disk_mib: int, load: str, n: int
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-diskpause-"))
    base = qemudemo.default_base(128, epoch_ms, disk_mib)
    cfg_a, cfg_b = qemudemo.configs(root, base, img, f"bdp{n}")
    if load:
        append = f"{cfg_a.qemu.append} mirror.diskload={load}"
        cfg_a, cfg_b = (replace(c, qemu=replace(c.qemu, append=append)) for c in (cfg_a, cfg_b))
    hosts: list[Host] = []
    with GuestLan() as lan:
        try:
            a, _ = qemudemo.start_pair(lan, root, cfg_a, cfg_b, hosts)
            wait_for("A protected", lambda: (s := a.status() or {}).get("phase") == "protected"
                     and s.get("acked", 0) >= 40, 180, hosts)  # fmt: skip
            w0 = ((a.status() or {}).get("disk") or {}).get("writes", 0)
            time.sleep(window)
            st = a.status() or {}
        finally:
            for h in hosts:
                h.stop()
            shutil.rmtree(root, ignore_errors=True)
    s = st.get("summary", {})
    return {
        "pause_ms_p50": s.get("pause_ms_p50"),
        "pause_ms_p99": s.get("pause_ms_p99"),
        "split_ms_p50": s.get("pause_split_ms_p50"),
        "checkpoints": s.get("checkpoints"),
        "disk_writes": (st.get("disk") or {}).get("writes", 0) - w0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_pause", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--window", type=float, default=10.0, help="seconds measured per case")
    ap.add_argument("--epoch-ms", type=int, default=50)
    ap.add_argument("--image-dir", default=str(image.DEFAULT_DIR))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    img = image.ensure(Path(args.image_dir))
    res = {name: one_case(img, args.epoch_ms, args.window, mib, load, i)
           for i, (name, mib, load) in enumerate(CASES)}  # fmt: skip
    base = float(res["no disk"]["pause_ms_p50"])
    print(f"{'case':<22}{'p50 ms':>9}{'p99 ms':>9}{'vs base':>10}{'ratio':>8}{'writes':>8}"
          f"   split p50 (stop/scan/gather/state/resume ms)")  # fmt: skip
    for name, r in res.items():
        p50 = float(r["pause_ms_p50"])
        split = "/".join(f"{v:.2f}" for v in (r["split_ms_p50"] or {}).values())
        print(f"{name:<22}{p50:>9.2f}{float(r['pause_ms_p99']):>9.2f}{p50 - base:>+10.2f}"
              f"{p50 / base:>8.2f}{r['disk_writes']:>8}   {split}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
