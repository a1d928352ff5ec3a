"""The guest's disk: host-level throughput on three paths in one run, and the barrier's
cost in the checkpoint's pause.

    python -m bench.disk [--mib M] [--dir DIR] [--json PATH]

``qemu-img bench`` (writes, then reads) on:
  1. the local image file (the baseline: no NBD hop);
  2. the same image served by mirror's disk server, not replicated;
  3. the disk server replicating to a second one on this host (loopback TCP),
     with a checkpoint every 50 ms (20/s): a barrier on the primary, and the
     replica's commit of that epoch (apply, fdatasync) 10 ms later, pipelined.
Sizes: 4 KiB writes at queue depth 1 and 16, 1 MiB writes at QD1, 4 KiB reads at QD1.
The barrier's cost: the time of each ``barrier N`` call (the whole control round
trip from the agent's Python, what the pause gains), p50 and p99, while path 3 runs.
Ratios printed: replicated / unreplicated, replicated / local.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mirror.guests.disk import DiskServer, DiskSpec
from mirror.hoststate import percentile

CASES = [  # name, qemu-img bench arguments, operations
    ("write 4K QD1", ["-w", "-s", "4096", "-d", "1"], 20000),
    ("write 4K QD16", ["-w", "-s", "4096", "-d", "16"], 40000),
    ("write 1M QD1", ["-w", "-s", "1M", "-d", "1"], 400),
    ("read 4K QD1", ["-s", "4096", "-d", "1"], 20000),
]


def qemu_img_bench(target: str, args: list[str], count: int, fmt: str = "raw") -> float:
    """Operations per second."""
    cmd = ["qemu-img", "bench", "-f", fmt, "-c", str(count), *args, target]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise RuntimeError(f"qemu-img bench printed no time: {out[-300:]}")
    return count / float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Checkpoints(threading.Thread):
    """Barrier on A every 50 ms, commit on B 10 ms later (as a standby does)."""

    def __init__(self, a: DiskServer, b: DiskServer) -> None:
        super().__init__(daemon=True)
        self.a, self.b = a, b
        self.halt = threading.Event()
        self.barrier_ms: list[float] = []
        self.epoch = 0

    def run(self) -> None:
        while not self.halt.wait(0.05):
            self.epoch += 1
            t = time.perf_counter()
            err = self.a.barrier(self.epoch)
            self.barrier_ms.append((time.perf_counter() - t) * 1000)
            if err:
                raise RuntimeError(err)
            time.sleep(0.01)
            self.b.commit(self.epoch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--mib", type=int, default=256, help="disk size (default 256)")
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        raise SystemExit("bench.disk: qemu-img is missing (apt-get install qemu-utils)")
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-disk-", dir=args.dir))
    size = args.mib << 20
    results: dict[str, dict[str, float]] = {}
    barrier: dict[str, float] = {}
    try:
        local = root / "local.img"
        with open(local, "wb") as f:
            f.truncate(size)
        results["local"] = {n: qemu_img_bench(str(local), a, c) for n, a, c in CASES}
        a = DiskServer(DiskSpec(root / "a.img", size, root / "a", "bench"))
        try:
            url = f"nbd+unix:///?socket={a.spec.nbd_path}"
            results["served"] = {n: qemu_img_bench(url, a2, c) for n, a2, c in CASES}
            port = free_port()
            b = DiskServer(DiskSpec(root / "b.img", size, root / "b", "bench",
                                    listen=f"127.0.0.1:{port}", journal=root / "b.journal",
                                    journal_bytes=512 << 20))  # fmt: skip
            try:
                a.replicate("127.0.0.1", port, 1)
                a.wait_synced()
                cps = Checkpoints(a, b)
                cps.start()
                results["replicated"] = {n: qemu_img_bench(url, a2, c) for n, a2, c in CASES}
                cps.halt.set()
                cps.join(5)
                barrier = {
                    "checkpoints": len(cps.barrier_ms),
                    "barrier_ms_p50": round(percentile(cps.barrier_ms, 50), 3),
                    "barrier_ms_p99": round(percentile(cps.barrier_ms, 99), 3),
                }
            finally:
                b.close()
        finally:
            a.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'case':<16}{'local':>12}{'served':>12}{'replicated':>12}{'repl/served':>13}"
          f"{'repl/local':>12}   (operations/s; qemu-img bench, raw, {args.mib} MiB)")  # fmt: skip
    for name, _, _ in CASES:
        loc, srv, rep = (results[p][name] for p in ("local", "served", "replicated"))
        print(f"{name:<16}{loc:>12.0f}{srv:>12.0f}{rep:>12.0f}{rep / srv:>13.2f}{rep / loc:>12.2f}")
    print(
        f"barrier in the pause: p50 {barrier['barrier_ms_p50']} ms, p99 "
        f"{barrier['barrier_ms_p99']} ms over {barrier['checkpoints']} checkpoints at 20/s"
    )
    out: dict[str, Any] = {"mib": args.mib, "ops_per_s": results, **barrier}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
