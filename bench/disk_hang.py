"""What the hung-image deadline costs on the guest's I/O path: the disk server with its
local calls made by I/O threads under a deadline (``--hang-ms 2000``, the default)
beside the same server calling the image itself (``--hang-ms 0``), in one run.

    python -m bench.disk_hang [--mib M] [--dir DIR] [--rounds N] [--replicated] [--json PATH]

``qemu-img bench`` over NBD on the served (unreplicated) path, the cases of bench.disk
(a quarter of their operations each time); two servers run side by side and each case
runs on both back to back, which first alternating, for N rounds (the machine's load
moves): printed are the medians and the median and range of the per-round ratio
deadline / direct.  ``--replicated``: each server streams to a replica of its own on this
host, with a checkpoint every 50 ms (barrier, commit 10 ms later), as in bench.disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from bench.disk import CASES, KEY, Checkpoints, free_port, qemu_img_bench
from mirror.replication.disk import DiskSpec, ReplicatedDisk


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_hang", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--mib", type=int, default=128, help="disk size (default 128)")
    ap.add_argument("--dir", default="/var/tmp", help="where the image goes (default /var/tmp)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    ap.add_argument("--replicated", action="store_true",
                    help="each server streams to a replica, 20 checkpoints/s")  # fmt: skip
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        raise SystemExit("bench.disk_hang: qemu-img is missing (apt-get install qemu-utils)")
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-hang-", dir=args.dir))
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    ops: dict[int, dict[str, list[float]]] = {0: {}, 2000: {}}
    servers: dict[int, ReplicatedDisk] = {}
    replicas: list[ReplicatedDisk] = []
    cps: list[Checkpoints] = []
    try:
        for hang_ms in (0, 2000):
            spec = DiskSpec(root / f"{hang_ms}.img", args.mib << 20, root / str(hang_ms), "bench",
                            hang_ms=hang_ms, session_key=KEY)  # fmt: skip
            servers[hang_ms] = ReplicatedDisk(spec)
            if args.replicated:
                port = free_port()
                replicas.append(ReplicatedDisk(DiskSpec(
                        root / f"r{hang_ms}.img", args.mib << 20, root / f"r{hang_ms}", "bench",
                        listen=f"127.0.0.1:{port}", journal=root / f"r{hang_ms}.journal",
                        journal_bytes=512 << 20, session_key=KEY)))  # fmt: skip
                servers[hang_ms].replicate("127.0.0.1", port, 1)
                servers[hang_ms].wait_synced()
                cps.append(Checkpoints(servers[hang_ms], replicas[-1]))
                cps[-1].start()
        for i in range(args.rounds):
            for name, a, c in CASES:  # both settings back to back, in turns first
                got = {}
                for hang_ms in (0, 2000) if i % 2 == 0 else (2000, 0):
                    url = f"nbd+unix:///?socket={servers[hang_ms].spec.nbd_path}"
                    got[hang_ms] = qemu_img_bench(url, a, c // 4)
                    ops[hang_ms].setdefault(name, []).append(got[hang_ms])
                ratios[name].append(got[2000] / got[0])
    finally:
        for cp in cps:
            cp.halt.set()
            cp.join(5)
        for srv in [*servers.values(), *replicas]:
            srv.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'case':<16}{'direct':>12}{'deadline':>12}{'ratio':>8}{'ratio range':>16}   "
          f"(operations/s, medians of {args.rounds} alternating rounds; qemu-img bench over "
          f"NBD, {'replicated' if args.replicated else 'served'}, {args.mib} MiB)")  # fmt: skip
    for name, _, _ in CASES:
        d, h = statistics.median(ops[0][name]), statistics.median(ops[2000][name])
        r = ratios[name]
        print(f"{name:<16}{d:>12.0f}{h:>12.0f}{statistics.median(r):>8.2f}"
              f"{f'{min(r):.2f}-{max(r):.2f}':>16}")  # fmt: skip
    if args.json:
        out = {"mib": args.mib, "rounds": args.rounds, "replicated": args.replicated,
               "direct": ops[0], "deadline": ops[2000], "ratios": ratios}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
