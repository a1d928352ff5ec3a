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

Path 3 runs twice in the same run: the stream under AES-256-GCM (what a pair runs)
and with plain records (``--test-plain-stream``, both ends; the handshake is the
same), and the encryption's cost is printed as their ratio, with the initial
copy's rate (MiB/s) of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mirror.hoststate import percentile
from mirror.replication.disk import DiskSpec, ReplicatedDisk, session_key

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


KEY = session_key(None, None, "bench", 1, 1)  # any 32 bytes: both ends hold the same


def cpu_s(*pids: int) -> float:
    """User + system CPU seconds of these processes so far (robust to a loaded machine,
    unlike the wall-clock rates)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Checkpoints(threading.Thread):
    """Barrier on A every 50 ms, commit on B 10 ms later (as a standby does)."""

    def __init__(self, a: ReplicatedDisk, b: ReplicatedDisk) -> None:
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


def replicated(root: Path, url: str, size: int, plain: bool) -> dict[str, Any]:
    """Path 3 (to a new replica): the copy's rate, each case's rate, the barrier's cost."""
    name = "plain" if plain else "aes"
    port = free_port()
    b = ReplicatedDisk(DiskSpec(root / f"b-{name}.img", size, root / f"b-{name}", "bench",
                                listen=f"127.0.0.1:{port}", journal=root / f"b-{name}.journal",
                                journal_bytes=512 << 20, session_key=KEY,
                                plain_stream=plain))  # fmt: skip
    a = None
    try:  # the primary on the same image (and NBD socket), with this record cipher
        a = ReplicatedDisk(DiskSpec(root / "a.img", size, root / "a", "bench", session_key=KEY,
                                    plain_stream=plain))  # fmt: skip
        t, c0 = time.perf_counter(), cpu_s(a.pid, b.pid)
        a.replicate("127.0.0.1", port, 1)
        a.wait_synced()
        copy_mib_s = (size >> 20) / (time.perf_counter() - t)
        copy_cpu_ms = (cpu_s(a.pid, b.pid) - c0) * 1000 / (size >> 20)
        cps = Checkpoints(a, b)
        cps.start()
        c1, w1 = cpu_s(a.pid, b.pid), a.status()["write_bytes"]
        ops = {n: qemu_img_bench(url, a2, c) for n, a2, c in CASES}
        written_mib = (a.status()["write_bytes"] - w1) / (1 << 20)
        cases_cpu_ms = (cpu_s(a.pid, b.pid) - c1) * 1000 / max(written_mib, 1)
        cps.halt.set()
        cps.join(5)
        return {
            "ops": ops,
            "copy_mib_s": round(copy_mib_s, 1),
            "copy_cpu_ms_per_mib": round(copy_cpu_ms, 2),
            "cases_cpu_ms_per_mib": round(cases_cpu_ms, 2),
            "checkpoints": len(cps.barrier_ms),
            "barrier_ms_p50": round(percentile(cps.barrier_ms, 50), 3),
            "barrier_ms_p99": round(percentile(cps.barrier_ms, 99), 3),
        }
    finally:
        if a is not None:
            a.close()
        b.close()


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
    runs: dict[str, dict[str, Any]] = {}
    try:
        local = root / "local.img"
        with open(local, "wb") as f:
            f.truncate(size)
        results["local"] = {n: qemu_img_bench(str(local), a, c) for n, a, c in CASES}
        a = ReplicatedDisk(DiskSpec(root / "a.img", size, root / "a", "bench"))
        url = f"nbd+unix:///?socket={a.spec.nbd_path}"
        try:
            results["served"] = {n: qemu_img_bench(url, a2, c) for n, a2, c in CASES}
        finally:
            a.close()
        for plain in (False, True):  # each starts its own primary on a.img, and replica
            runs["plain" if plain else "aes"] = replicated(root, url, size, plain)
        results["replicated"] = runs["aes"]["ops"]
        results["replicated_plain"] = runs["plain"]["ops"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'case':<16}{'local':>12}{'served':>12}{'replicated':>12}{'plain rec.':>12}"
          f"{'repl/served':>13}{'aes/plain':>11}   (operations/s; qemu-img bench, raw, "
          f"{args.mib} MiB)")  # fmt: skip
    for name, _, _ in CASES:
        loc, srv, rep, unenc = (results[p][name] for p in ("local", "served", "replicated",
                                                          "replicated_plain"))  # fmt: skip
        print(f"{name:<16}{loc:>12.0f}{srv:>12.0f}{rep:>12.0f}{unenc:>12.0f}{rep / srv:>13.2f}"
              f"{rep / unenc:>11.2f}")  # fmt: skip
    aes, pln = runs["aes"], runs["plain"]
    print(f"initial copy: {aes['copy_mib_s']} MiB/s under AES-256-GCM, {pln['copy_mib_s']} MiB/s "
          f"plain ({aes['copy_mib_s'] / pln['copy_mib_s']:.2f}x); CPU of both disk servers per "
          f"MiB copied: {aes['copy_cpu_ms_per_mib']} ms, {pln['copy_cpu_ms_per_mib']} ms plain "
          f"(wall-clock rates vary with the load; the CPU is the cipher's cost)")  # fmt: skip
    print(f"the cases (mostly 4 KiB writes; reads too): CPU of both disk servers per MiB the "
          f"guest wrote: {aes['cases_cpu_ms_per_mib']} ms under AES-256-GCM, "
          f"{pln['cases_cpu_ms_per_mib']} ms plain")  # fmt: skip
    for k, r in (("AES-256-GCM", aes), ("plain records", pln)):
        print(f"barrier in the pause ({k}): p50 {r['barrier_ms_p50']} ms, p99 "
              f"{r['barrier_ms_p99']} ms over {r['checkpoints']} checkpoints at 20/s")  # fmt: skip
    out: dict[str, Any] = {"mib": args.mib, "ops_per_s": results,
                           "copy_mib_s": {"aes": aes["copy_mib_s"], "plain": pln["copy_mib_s"]},
                           "copy_cpu_ms_per_mib": {"aes": aes["copy_cpu_ms_per_mib"],
                                                   "plain": pln["copy_cpu_ms_per_mib"]},
                           "cases_cpu_ms_per_mib": {"aes": aes["cases_cpu_ms_per_mib"],
                                                    "plain": pln["cases_cpu_ms_per_mib"]},
                           **{k: aes[k] for k in ("checkpoints", "barrier_ms_p50",
                                                  "barrier_ms_p99")},
                           "plain_barrier_ms_p50": pln["barrier_ms_p50"]}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
