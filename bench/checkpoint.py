"""Checkpoint pause and replication throughput, beside the floor measured in the same run.

A real secondary (`mirror secondary`, its own process group) and, in this
process, the primary's engine driving a real synthetic guest process whose
dirty rate makes about the requested share of its pages dirty each epoch.
The floor of a pause is what any checkpoint of that RAM must do while the
guest is stopped: scan all of it (a plain page-by-page memcmp) plus copy the
dirty bytes (a plain memcpy); it is measured here on buffers of the same
size with the same number of dirty pages, after the run, on the same machine.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

from bench.workloads import Workload, time_round_robin
from mirror.config import CheckpointConfig, Config, GuestConfig, KeysConfig
from mirror.guests.synthetic import SHM_DIR, SyntheticGuest, SyntheticParams
from mirror.lab.demo import Host, pair_configs, wait_for
from mirror.replication import keys, wire
from mirror.replication import pagediff as pd
from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.link import Endpoint, Link
from mirror.replication.outputs import OutputBuffer

PS = pd.PAGE_SIZE


@dataclass
class CheckpointResult:
    ram_mib: int
    dirty_pct: float  # requested
    epoch_ms: int
    checkpoints: int
    dirty_pages_p50: float
    pause_ms_p50: float
    pause_ms_p99: float
    floor_ms: float
    split_ms_p50: dict[str, float]
    replication_gbps: float  # dirty bytes / (send -> ack) time, median over checkpoints
    precopy_gbps: float
    scan: str = "exact"  # the dirty-page scan method (checkpoint.scan)

    @property
    def pause_over_floor(self) -> float:
        return self.pause_ms_p50 / self.floor_ms


def dirty_rate_for(npages: int, pct: float, epoch_ms: int) -> int:
    """Writes per second that leave about pct% of pages dirty per epoch (uniform writes
    collide: k writes over n pages touch n(1 - e^(-k/n)) of them)."""
    share = min(pct / 100, 0.99)
    writes = -npages * math.log(1 - share) if share > 0 else 0
    return int(writes * 1000 / epoch_ms)


def floor_ms(ram_mib: int, dirty_pages: int, repeat: int = 7) -> float:
    wl = Workload(ram_mib)
    wl.shadow[:] = wl.ram
    src, dst = pd.alloc_pages(max(1, dirty_pages)), pd.alloc_pages(max(1, dirty_pages))
    nbytes = dirty_pages * PS
    src_p = ctypes.addressof(ctypes.c_char.from_buffer(src))
    dst_p = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    pct = 100 * dirty_pages / wl.npages
    t = time_round_robin(
        {
            "scan": (lambda: pd.memcmp_ceiling(wl.ram, wl.shadow), lambda: wl.dirty(pct)),
            "copy": (lambda: ctypes.memmove(dst_p, src_p, nbytes), None),
        },
        repeat,
    )
    return (t["scan"] + t["copy"]) * 1000


def insecure(cfg: Config) -> Config:
    """``cfg`` without CurveZMQ (the same-run baseline of the encryption's cost)."""
    return replace(cfg, keys=KeysConfig(insecure=True))


@contextmanager
def running_engine(base: Config, ram_name: str) -> Iterator[CheckpointEngine]:
    """A real `mirror secondary` process and, here, the primary's engine with a running
    synthetic guest, paired and pre-copied; all stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        root = Path(tmp)
        cfg_a, cfg_b = pair_configs(root, base, "127.0.0.1:9")
        secondary = Host("hostB", "secondary", cfg_b, root)
        guest = link = None
        try:
            wait_for("the secondary", secondary.status, 60, [secondary])
            outputs = OutputBuffer(lambda outs: None)
            params = SyntheticParams.from_config(cfg_a.guest)
            guest = SyntheticGuest.boot(params, SHM_DIR / ram_name, outputs.add)
            link = Link.client(
                Endpoint("127.0.0.1", cfg_a.link.data_port, cfg_a.link.heartbeat_port),
                "hostA",
                keys=keys.load(cfg_a),
            )
            engine = CheckpointEngine(
                guest,
                link,
                cfg_a.checkpoint,
                outputs,
                pair=cfg_a.pair.name,
                generation=1,
                node="hostA",
            )
            engine.handshake()
            guest.resume()
            engine.precopy()
            yield engine
        finally:
            if guest:
                guest.stop()
            if link:
                link.close()
            secondary.stop()


def case_config(
    ram_mib: int, pct: float, epoch_ms: int = 50, threads: int = 1, scan: str = "exact"
) -> Config:
    """A pair whose synthetic guest dirties about ``pct``% of its pages per epoch."""
    return replace(
        Config(),
        guest=replace(
            GuestConfig(),
            ram_mib=ram_mib,
            outputs_per_s=200,
            dirty_pages_per_s=dirty_rate_for((ram_mib << 20) // PS, pct, epoch_ms),
        ),
        checkpoint=replace(
            CheckpointConfig(), epoch_ms=epoch_ms, threads=threads, max_in_flight=2, scan=scan
        ),
    )


def run_case(
    ram_mib: int,
    pct: float,
    *,
    epoch_ms: int = 50,
    checkpoints: int = 40,
    threads: int = 1,
    curve: bool = True,
    scan: str = "exact",
) -> CheckpointResult:
    base = case_config(ram_mib, pct, epoch_ms, threads, scan)
    base = base if curve else insecure(base)
    with running_engine(base, f"mirror-bench-{ram_mib}.ram") as engine:
        engine.run(threading.Event().is_set, epochs=checkpoints)
        recs = list(engine.stats.records)[2:]  # the first ones carry the pre-copy's tail
        precopy_s = engine.stats.precopy_s
    dirty = median(r.pages for r in recs)
    rates = [r.bytes_sent / (r.ack_ms / 1000) / 1e9 for r in recs if r.ack_ms]
    split = {
        k: round(median(getattr(r, f"{k}_ms") for r in recs), 3)
        for k in ("stop", "scan", "gather", "state", "resume")
    }
    pauses = sorted(r.pause_ms for r in recs)
    return CheckpointResult(
        ram_mib,
        pct,
        epoch_ms,
        len(recs),
        dirty,
        median(pauses),
        pauses[min(len(pauses) - 1, round(0.99 * (len(pauses) - 1)))],
        floor_ms(ram_mib, int(dirty)),
        split,
        median(rates) if rates else 0.0,
        (ram_mib << 20) / precopy_s / 1e9,
        scan,
    )


def link_capacity(
    ram_mib: int = 256, batch_mib: int = 64, rounds: int = 8, *, curve: bool = True
) -> float:
    """GB/s of page data that the interconnect and a real standby commit, with no
    guest competing for the CPU: prebuilt checkpoints sent one after another to
    a `mirror secondary` process, each timed from send to ack (median after two
    rounds of warm-up).  ``curve``: encrypted and authenticated (the default of a pair)."""
    base = replace(Config(), guest=replace(GuestConfig(), ram_mib=ram_mib))
    base = base if curve else insecure(base)
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        root = Path(tmp)
        cfg_a, cfg_b = pair_configs(root, base, "127.0.0.1:9")
        secondary = Host("hostB", "secondary", cfg_b, root)
        link = None
        try:
            wait_for("the secondary", secondary.status, 60, [secondary])
            link = Link.client(
                Endpoint("127.0.0.1", cfg_b.link.data_port, cfg_b.link.heartbeat_port),
                "bench",
                keys=keys.load(cfg_a),
            )
            session = 1
            link.session[0] = session
            link.send(
                wire.Hello(cfg_b.pair.name, cfg_b.pair.generation, "bench", ram_mib << 20, session)
            )
            if not isinstance(link.recv(30), wire.Welcome):
                raise RuntimeError("the secondary refused the benchmark's HELLO")
            npages = (ram_mib << 20) // PS
            ram = pd.alloc_pages(npages)
            ram[:] = os.urandom(len(ram))
            idx = list(range(0, npages, max(1, npages // ((batch_mib << 20) // PS))))
            batch = pd.gather(ram, idx, out=pd.alloc_pages(len(idx)))
            sums = pd.checksums(ram, idx)
            rates = []
            for epoch in range(1, rounds + 3):
                start = time.perf_counter()
                msg = wire.Pages.of(epoch, batch, sums, state=b"bench")
                link.send(replace(msg, session=session, seq=epoch))
                if link.recv(60) != wire.Ack(session, epoch, 0):
                    raise RuntimeError(f"the secondary did not acknowledge checkpoint {epoch}")
                rates.append(len(batch.data) / (time.perf_counter() - start) / 1e9)
            return median(rates[2:])
        finally:
            if link:
                link.close()
            secondary.stop()


def print_results(
    results: list[CheckpointResult],
    capacity: float | None = None,
    plain: list[CheckpointResult] | None = None,
    plain_capacity: float | None = None,
) -> None:
    """``results``/``capacity`` with CurveZMQ; ``plain``/``plain_capacity`` the same run's
    cases without it (the encryption's cost)."""
    print("\ncheckpoint pause (synthetic guest, real secondary process, loopback)")
    print(
        f"{'scan':>7} {'RAM MiB':>8} {'dirty %':>8} {'pages':>7} {'pause p50':>10} {'p99':>8} "
        f"{'floor':>8} {'x floor':>8} {'repl GB/s':>10} {'precopy GB/s':>13}"
    )
    for r in results:
        print(
            f"{r.scan:>7} {r.ram_mib:8d} {r.dirty_pct:8g} {r.dirty_pages_p50:7.0f} "
            f"{r.pause_ms_p50:10.2f} "
            f"{r.pause_ms_p99:8.2f} {r.floor_ms:8.2f} {r.pause_over_floor:8.2f} "
            f"{r.replication_gbps:10.2f} {r.precopy_gbps:13.2f}"
        )
        print(f"{'':25} split p50 ms: " + ", ".join(f"{k} {v}" for k, v in r.split_ms_p50.items()))
    if capacity is not None:
        print(
            f"link + standby capacity (64 MiB checkpoints, no guest running): {capacity:.2f} GB/s"
            " with CURVE"
        )
    if plain_capacity is not None and capacity is not None:
        print(
            f"  without CURVE (same run): {plain_capacity:.2f} GB/s; with/without "
            f"{capacity / plain_capacity:.2f}x"
        )
    for r, p in zip(results, plain or [], strict=False):
        print(
            f"  {r.ram_mib} MiB {r.dirty_pct:g}%: pause p50 {r.pause_ms_p50:.2f} ms with CURVE, "
            f"{p.pause_ms_p50:.2f} ms without; replication {r.replication_gbps:.2f} GB/s "
            f"with, {p.replication_gbps:.2f} without"
        )
    print("targets: pause <= 1.5x floor; >= 1 GB/s of dirty pages replicated; CURVE >= 0.6x")
    if plain_capacity is not None and capacity is not None:
        ratio = capacity / plain_capacity
        print(f"  {'ok  ' if ratio >= 0.6 else 'MISS'} capacity with/without CURVE: {ratio:.2f}x")
    if capacity is not None:
        print(f"  {'ok  ' if capacity >= 1 else 'MISS'} replication capacity: {capacity:.2f} GB/s")
    for r in results:
        where = f"{r.scan} {r.ram_mib} MiB {r.dirty_pct:g}%"
        print(
            f"  {'ok  ' if r.pause_over_floor <= 1.5 else 'MISS'} pause/floor {where}: "
            f"{r.pause_over_floor:.2f}"
        )
        print(
            f"  {'ok  ' if r.replication_gbps >= 1 else 'MISS'} replication {where}: "
            f"{r.replication_gbps:.2f} GB/s"
        )
