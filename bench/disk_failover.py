"""Storage failover on the primary: the guest's I/O stall when the local image fails and
the disk switches to the secondary's replica, and when it switches back.

    python -m bench.disk_failover [--runs N] [--mib M] [--dir DIR] [--hang MS] [--json PATH]

Each run: A's image is a FUSE file with a real I/O error path (nbdkit's error filter
behind nbdfuse, mirror/lab/faultdisk.py), B a replica on this host (loopback TCP), a
checkpoint every 50 ms (barrier on A, commit on B 10 ms later).  A client at queue
depth 1 alternates 4 KiB writes and reads (random offsets) on A's NBD socket, timing
every request.  Then A's image fails (EIO on every read, write, flush) until A runs on
B's replica; 1 s later it answers again, and A copies the blocks back and runs locally.
With ``--hang MS`` the image hangs instead (nbdkit's pause filter holds every request:
no answer, no error) and A's disk server has ``--hang-ms MS``: the stall at the switch is
then that bound, plus what the switch itself costs.

Printed, in the same run: the requests' latency before the failure (the baseline: p50,
p99, max), the longest request at the switch to B (the guest's stall) and at the switch
back, the p50 while on B, and the guest's I/O errors (must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.disk import Checkpoints, free_port
from mirror.hoststate import percentile
from mirror.lab.faultdisk import FaultToolsMissing, FaultyImage
from mirror.lab.nbdclient import NbdClient, NbdError
from mirror.replication.disk import DiskSpec, ReplicatedDisk

BLOCK = 4096


class Client(threading.Thread):
    """QD1 4 KiB writes and reads; (start, latency ms, error) of each request."""

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(daemon=True)
        self.c = NbdClient(path)
        self.size = size
        self.halt = threading.Event()
        self.ops: list[tuple[float, float, bool]] = []

    def run(self) -> None:
        rng = random.Random(1)
        data = rng.randbytes(BLOCK)
        i = 0
        while not self.halt.is_set():
            off = rng.randrange(self.size // BLOCK) * BLOCK
            t = time.monotonic()
            err = False
            try:
                if i % 2:
                    self.c.read(off, BLOCK)
                else:
                    self.c.write(off, data)
            except NbdError:
                err = True
            self.ops.append((t, (time.monotonic() - t) * 1000, err))
            i += 1
        self.c.close()


def wait_storage(a: ReplicatedDisk, want: str, timeout: float = 20) -> float:
    deadline = time.monotonic() + timeout
    while a.status()["storage"] != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"A's storage never became {want}: {a.status()}")
        time.sleep(0.002)
    return time.monotonic()


def one_run(root: Path, size: int, hang_ms: int = 0) -> dict[str, float]:
    faulty = FaultyImage(root, size)
    try:
        port = free_port()
        b = ReplicatedDisk(DiskSpec(root / "b.img", size, root / "b", "bench",
                                    listen=f"127.0.0.1:{port}", journal=root / "b.journal",
                                    journal_bytes=256 << 20))  # fmt: skip
        a = ReplicatedDisk(DiskSpec(faulty.path, size, root / "a", "bench", probe_ms=100,
                                    hang_ms=hang_ms or 2000))  # fmt: skip
        try:
            a.replicate("127.0.0.1", port, 1)
            a.wait_synced()
            cps = Checkpoints(a, b)
            cps.start()
            client = Client(a.spec.nbd_path, size)
            client.start()
            time.sleep(1.5)
            t_fail = time.monotonic()
            faulty.hang() if hang_ms else faulty.fail()
            t_remote = wait_storage(a, "remote")
            time.sleep(1.0)
            t_heal = time.monotonic()
            faulty.unhang() if hang_ms else faulty.heal()
            t_local = wait_storage(a, "local")
            time.sleep(0.5)
            client.halt.set()
            client.join(10)
            cps.halt.set()
            cps.join(5)
            st = a.status()
        finally:
            a.close()
            b.close()
    finally:
        faulty.close()
    ops = client.ops
    before = [ms for t, ms, _ in ops if t + ms / 1000 < t_fail]
    at_switch = [ms for t, ms, _ in ops if t <= t_remote and t + ms / 1000 >= t_fail]
    remote = [ms for t, ms, _ in ops if t > t_remote and t + ms / 1000 < t_heal]
    at_back = [ms for t, ms, _ in ops if t <= t_local and t + ms / 1000 >= t_heal]
    return {
        "requests": len(ops),
        "errors": sum(e for _, _, e in ops),
        "base_p50_ms": percentile(before, 50),
        "base_p99_ms": percentile(before, 99),
        "base_max_ms": max(before),
        "switch_stall_ms": max(at_switch or [0.0]),
        "remote_p50_ms": percentile(remote, 50),
        "switch_back_stall_ms": max(at_back or [0.0]),
        "blocks_copied_back": st["resynced_local"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_failover", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--runs", type=int, default=3, help="failures injected (default 3)")
    ap.add_argument("--mib", type=int, default=64, help="disk size (default 64)")
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--hang", type=int, default=0, metavar="MS",
                    help="the image hangs instead of failing: A's --hang-ms")  # fmt: skip
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    runs: list[dict[str, float]] = []
    for _ in range(args.runs):
        root = Path(tempfile.mkdtemp(prefix="mirror-bench-failover-", dir=args.dir))
        try:
            runs.append(one_run(root, args.mib << 20, args.hang))
        except FaultToolsMissing as e:
            raise SystemExit(f"bench.disk_failover: {e}") from e
        finally:
            shutil.rmtree(root, ignore_errors=True)
    cols = ["base_p50_ms", "base_p99_ms", "base_max_ms", "switch_stall_ms", "remote_p50_ms",
            "switch_back_stall_ms", "errors", "blocks_copied_back"]  # fmt: skip
    print("run " + "".join(f"{c:>22}" for c in cols) + "   (QD1 4 KiB write/read; ms)")
    for i, r in enumerate(runs):
        print(f"{i:<4}" + "".join(f"{r[c]:>22.2f}" for c in cols))
    worst = max(r["switch_stall_ms"] for r in runs)
    base = percentile([r["base_p50_ms"] for r in runs], 50)
    target = f"the bound {args.hang} ms + 100 ms" if args.hang else "100 ms"
    print(f"stall at the switch: worst {worst:.2f} ms over {len(runs)} runs (target <= {target}); "
          f"{worst / base:.0f}x the baseline request p50 {base:.3f} ms; "
          f"guest I/O errors: {sum(r['errors'] for r in runs):.0f}")  # fmt: skip
    out: dict[str, Any] = {"mib": args.mib, "hang_ms": args.hang, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
