"""The disk server before and after a change, in one run: bench.disk's paths for two builds
side by side, in alternating rounds (the machine's load moves).

    python -m bench.disk_ab --base EXE [--mib M] [--dir DIR] [--rounds N] [--json PATH]

EXE is a disk server built from the other source as a program of its own (a ``main`` that
calls ``mirror_diskserver_main``, e.g. ``gcc -O2 -pthread -Inative main.c native/disk*.c
-lcrypto``); "this" is the one this tree's ``python -m mirror.guests.diskproc`` runs.  For
each build: the image served (not replicated), and replicated to a replica of the same
build on this host under AES-256-GCM with a checkpoint every 50 ms (barrier, commit 10 ms
later), as in bench.disk; every server with its defaults (``--hang-ms 2000``).  Each round
runs every case on the local image and on the four servers, in an order that turns.
Printed: the medians (operations/s) and the issue's two ratios for each build, replicated /
served at 4 KiB QD1 and replicated / local at 1 MiB QD1 (each the median of the per-round
ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.disk import CASES, KEY, Checkpoints, free_port, qemu_img_bench
from mirror.replication.disk import DiskSpec, ReplicatedDisk


@contextlib.contextmanager
def server_program(exe: str | None) -> Iterator[None]:
    """Disk servers started meanwhile run ``exe`` (None: this tree's) with the same arguments."""
    if exe is None:
        yield
        return
    real = subprocess.Popen

    def popen(cmd: list[str], *a: Any, **kw: Any) -> subprocess.Popen[bytes]:
        if cmd[:3] == [sys.executable, "-m", "mirror.guests.diskproc"]:
            cmd = [exe, *cmd[3:]]
        return real(cmd, *a, **kw)

    setattr(subprocess, "Popen", popen)  # (mirror.guests.disk starts its server with it)  # noqa: B010
    try:
        yield
    finally:
        setattr(subprocess, "Popen", real)  # noqa: B010


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--base", required=True, help="the other build's disk server program")
    ap.add_argument("--mib", type=int, default=128, help="disk size (default 128)")
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (default /var/tmp)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    if shutil.which("qemu-img") is None:
        raise SystemExit("bench.disk_ab: qemu-img is missing (apt-get install qemu-utils)")
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-ab-", dir=args.dir))
    size = args.mib << 20
    servers: list[ReplicatedDisk] = []
    cps: list[Checkpoints] = []
    urls: dict[str, str] = {}
    ops: dict[str, dict[str, list[float]]] = {}
    try:
        local = root / "local.img"
        with open(local, "wb") as f:
            f.truncate(size)
        urls["local"] = str(local)
        for build, exe in (("base", args.base), ("this", None)):
            with server_program(exe):
                srv = ReplicatedDisk(DiskSpec(root / f"{build}-s.img", size, root / f"{build}-s",
                                              "bench"))  # fmt: skip
                servers.append(srv)
                urls[f"{build} served"] = f"nbd+unix:///?socket={srv.spec.nbd_path}"
                port = free_port()
                b = ReplicatedDisk(DiskSpec(root / f"{build}-b.img", size, root / f"{build}-b",
                                            "bench", listen=f"127.0.0.1:{port}",
                                            journal=root / f"{build}-b.journal",
                                            journal_bytes=512 << 20, session_key=KEY))  # fmt: skip
                servers.append(b)
                a = ReplicatedDisk(DiskSpec(root / f"{build}-a.img", size, root / f"{build}-a",
                                            "bench", session_key=KEY))  # fmt: skip
                servers.append(a)
                a.replicate("127.0.0.1", port, 1)
                a.wait_synced()
                cps.append(Checkpoints(a, b))
                cps[-1].start()
                urls[f"{build} replicated"] = f"nbd+unix:///?socket={a.spec.nbd_path}"
        paths = list(urls)
        ops = {p: {} for p in paths}
        for i in range(args.rounds):
            for name, a2, c in CASES:
                k = i % len(paths)
                for p in paths[k:] + paths[:k]:  # the order turns each round
                    ops[p].setdefault(name, []).append(qemu_img_bench(urls[p], a2, c // 4))
    finally:
        for cp in cps:
            cp.halt.set()
            cp.join(5)
        for srv in servers:
            srv.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'case':<16}" + "".join(f"{p:>17}" for p in ops)
          + f"   (operations/s, medians of {args.rounds} rounds; {args.mib} MiB)")  # fmt: skip
    for name, _, _ in CASES:
        print(f"{name:<16}" + "".join(f"{statistics.median(ops[p][name]):>17.0f}" for p in ops))
    ratios: dict[str, dict[str, float]] = {}
    for build in ("base", "this"):
        rep, srvd = ops[f"{build} replicated"], ops[f"{build} served"]
        r4 = [x / y for x, y in zip(rep["write 4K QD1"], srvd["write 4K QD1"], strict=True)]
        r1 = [x / y for x, y in zip(rep["write 1M QD1"], ops["local"]["write 1M QD1"],
                                    strict=True)]  # fmt: skip
        r16 = [x / y for x, y in zip(rep["write 4K QD16"], srvd["write 4K QD16"], strict=True)]
        ratios[build] = {"4K QD1 replicated/served": statistics.median(r4),
                         "4K QD16 replicated/served": statistics.median(r16),
                         "1M QD1 replicated/local": statistics.median(r1)}  # fmt: skip
        rng = f"ranges 4K {min(r4):.2f}-{max(r4):.2f}, 1M {min(r1):.2f}-{max(r1):.2f}"
        print(f"{build}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios[build].items())
              + f"  ({rng})")  # fmt: skip
    for p in ("served", "replicated"):
        print(f"this / base, {p}: " + ", ".join(
            f"{name} {statistics.median([x / y for x, y in zip(ops[f'this {p}'][name], ops[f'base {p}'][name], strict=True)]):.2f}"  # noqa: E501
            for name, _, _ in CASES))  # fmt: skip
    if args.json:
        out = {"mib": args.mib, "rounds": args.rounds, "ops_per_s": ops, "ratios": ratios}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
