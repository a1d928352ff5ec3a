"""mirror's NBD server beside nbdkit's, on the same image, in one run: would nbdkit carry
the protocol well enough for mirror to keep only a replication filter (docs/ARCHITECTURE.md,
"The disk server's NBD protocol: kept")?

    python -m bench.disk_nbdkit [--mib M] [--dir DIR] [--rounds N] [--json PATH]

``qemu-img bench`` over NBD on a unix socket (the client of bench.disk, the cases of
bench.disk, a quarter of their operations each time) against four servers of one image:
  1. mirror's disk server, not replicated (the served path of bench.disk: its NBD protocol,
     its 4 workers, the local image under the hang deadline, ``--hang-ms 2000``);
  2. the same with ``--hang-ms 0`` (the workers call the image themselves, as nbdkit's file
     plugin does): the protocol against nbdkit's, nothing else differing;
  3. nbdkit's file plugin (``nbdkit file``, its defaults: 16 threads);
  4. the same with a pass-through filter stacked (``--filter=nofilter``): the hop a
     replication filter of mirror's would add before doing anything.
Each case runs on the four back to back, which first rotating, for N rounds (the machine's
load moves): printed are the medians (operations/s) and the median and range of the
per-round ratios nbdkit / mirror direct (the protocols), nbdkit / mirror (as deployed) and
filtered / plain nbdkit; then each server's CPU per operation over the whole run, and the
lines of mirror's NBD protocol (native/disknbd.c), what nbdkit would take over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.disk import CASES, cpu_s, qemu_img_bench
from mirror.guests.disk import DiskServer, DiskSpec

NATIVE = Path(__file__).resolve().parent.parent / "native"


def nbdkit(sock: Path, image: Path, *filters: str) -> subprocess.Popen[bytes]:
    """nbdkit serving ``image`` on ``sock`` (it ends with this process)."""
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock)]
    cmd += [f"--filter={f}" for f in filters]
    proc = subprocess.Popen([*cmd, "file", f"file={image}"], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench.disk_nbdkit: nbdkit did not start: {' '.join(cmd)}")
        time.sleep(0.01)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.disk_nbdkit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--mib", type=int, default=128, help="disk size (default 128)")
    ap.add_argument("--dir", default="/var/tmp", help="where the image goes (default /var/tmp)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", help="write the figures there too")
    args = ap.parse_args(argv)
    for tool, pkg in (("qemu-img", "qemu-utils"), ("nbdkit", "nbdkit")):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.disk_nbdkit: {tool} is missing (apt-get install {pkg})")
    root = Path(tempfile.mkdtemp(prefix="mirror-bench-nbdkit-", dir=args.dir))
    image = root / "disk.img"
    with open(image, "wb") as f:
        f.truncate(args.mib << 20)
    names = ("mirror", "direct", "nbdkit", "+filter")
    ops: dict[str, dict[str, list[float]]] = {n: {c: [] for c, _, _ in CASES} for n in names}
    done = dict.fromkeys(names, 0)  # operations each server answered
    cpu: dict[str, float] = {}
    procs: list[subprocess.Popen[bytes]] = []
    disks: list[DiskServer] = []
    try:
        for hang_ms, run in ((2000, "m"), (0, "d")):
            disks.append(DiskServer(DiskSpec(image, args.mib << 20, root / run, "bench",
                                             hang_ms=hang_ms)))  # fmt: skip
        procs = [nbdkit(root / "k.sock", image), nbdkit(root / "kf.sock", image, "nofilter")]
        pids = dict(zip(names, [d.pid for d in disks] + [p.pid for p in procs], strict=True))
        socks = [d.spec.nbd_path for d in disks] + [root / "k.sock", root / "kf.sock"]
        urls = dict(zip(names, socks, strict=True))
        c0 = {n: cpu_s(p) for n, p in pids.items()}
        for r in range(args.rounds):
            for case, a, count in CASES:
                count = max(100, count // 4)
                order = names[r % 4 :] + names[: r % 4]
                for n in order:
                    ops[n][case].append(qemu_img_bench(f"nbd+unix:///?socket={urls[n]}", a, count))
                    done[n] += count
        cpu = {n: (cpu_s(p) - c0[n]) * 1e6 / done[n] for n, p in pids.items()}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        for d in disks:
            d.close()
        shutil.rmtree(root, ignore_errors=True)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def ratios(a: str, b: str, case: str) -> list[float]:
        return [x / y for x, y in zip(ops[a][case], ops[b][case], strict=True)]

    pairs = (("nbdkit", "direct"), ("nbdkit", "mirror"), ("+filter", "nbdkit"))
    print(f"{'case':<14}" + "".join(f"{n:>9}" for n in names)
          + "".join(f"{a.lstrip('+') + '/' + b:>20}" for a, b in pairs)
          + f"   (operations/s, medians of {args.rounds} rounds; qemu-img bench, raw, "
          f"{args.mib} MiB; ratios: median (range))")  # fmt: skip
    out: dict[str, Any] = {"mib": args.mib, "rounds": args.rounds, "cases": {}}
    for case, _, _ in CASES:
        rs = [ratios(a, b, case) for a, b in pairs]
        print(f"{case:<14}" + "".join(f"{med(ops[n][case]):>9.0f}" for n in names)
              + "".join(f"{f'{med(x):.2f} ({min(x):.2f}-{max(x):.2f})':>20}" for x in rs))
        out["cases"][case] = {**{n: round(med(ops[n][case])) for n in names},
                              **{f"{a.lstrip('+')}/{b}": round(med(x), 3)
                                 for (a, b), x in zip(pairs, rs, strict=True)}}  # fmt: skip
    print("server CPU per operation over the run (mirror, direct: mirror's server with "
          "--hang-ms 2000 and 0; +filter: nbdkit with nofilter): "
          + ", ".join(f"{n} {cpu[n]:.1f} us" for n in names))  # fmt: skip
    nbd_lines = len((NATIVE / "disknbd.c").read_text().splitlines())
    total = sum(len(p.read_text().splitlines()) for p in NATIVE.glob("disk*.[ch]"))
    print(f"mirror's NBD protocol: native/disknbd.c, {nbd_lines} lines of the disk server's "
          f"{total} (nbdkit would take these over; a filter's callbacks would replace them)")
    out.update(cpu_us_per_op={n: round(cpu[n], 2) for n in names}, nbd_lines=nbd_lines,
               server_lines=total, nbdkit=subprocess.run(["nbdkit", "--version"],
               capture_output=True, text=True).stdout.strip(), cpus=os.cpu_count())  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
