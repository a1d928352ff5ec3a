"""Checkpoint pause and replication throughput, beside the floor measured in the same run.

A real secondary (`mirror secondary`, its own process group) and, in this
process, the primary's engine driving a real synthetic guest process whose
dirty rate makes about the requested share of its pages dirty each epoch.
Each pause is printed beside its floor (bench/floor.py: the guest's bare checkpoint,
stop, device state and resume with nothing between, plus a memcpy of the dirty bytes),
measured on the same guest after the run.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any

from bench import floor
from mirror.config import (
    ArbiterConfig,
    CheckpointConfig,
    Config,
    GuestConfig,
    KeysConfig,
    PairConfig,
)
from mirror.guests.synthetic import SHM_DIR, SyntheticGuest, SyntheticParams
from mirror.lab.demo import Host, pair_configs, wait_for
from mirror.replication import keys, pagecrypt, wire
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
    scan: str = "exact"  # the dirty-page scan method the engine ran (checkpoint.scan)
    floor: floor.Floor | None = None  # floor_ms's parts
    early_send: bool = False  # pages sent while the guest ran (checkpoint.early_send)
    early_pages_p50: float = 0.0  # then dirty_pages_p50 is the pause's pages

    @property
    def pause_over_floor(self) -> float:
        return self.pause_ms_p50 / self.floor_ms


def dirty_rate_for(npages: int, pct: float, epoch_ms: int) -> int:
    """Writes per second that leave about pct% of pages dirty per epoch (uniform writes
    collide: k writes over n pages touch n(1 - e^(-k/n)) of them)."""
    share = min(pct / 100, 0.99)
    writes = -npages * math.log(1 - share) if share > 0 else 0
    return int(writes * 1000 / epoch_ms)


def insecure(cfg: Config) -> Config:
    """``cfg`` without CurveZMQ (the same-run baseline of the encryption's cost)."""
    return replace(cfg, keys=KeysConfig(insecure=True))


@contextmanager
def running_pair(
    base: Config, ram_name: str
) -> Iterator[tuple[SyntheticGuest, Link, Config, list[OutputBuffer]]]:
    """A real `mirror secondary` process and, here, a synthetic guest (paused) and a
    link to the secondary; all stopped on exit.  The guest's outputs go to the
    buffer in the yielded list (an engine each: replace it)."""
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as tmp:
        root = Path(tmp)
        cfg_a, cfg_b = pair_configs(root, base, "127.0.0.1:9")
        secondary = Host("hostB", "secondary", cfg_b, root)
        guest = link = None
        try:
            wait_for("the secondary", secondary.status, 120, [secondary])
            holder = [OutputBuffer(lambda outs: None)]
            params = SyntheticParams.from_config(cfg_a.guest)
            guest = SyntheticGuest.boot(params, SHM_DIR / ram_name, lambda out: holder[0].add(out))
            link = Link.client(
                Endpoint("127.0.0.1", cfg_a.link.data_port, cfg_a.link.heartbeat_port),
                "hostA",
                keys=keys.load(cfg_a.keys),
            )
            yield guest, link, cfg_a, holder
        finally:
            if guest:
                guest.stop()
            if link:
                link.close()
            secondary.stop()


@dataclass
class MethodResult:
    """One scan method on one guest, in a run that measured the others beside it."""

    ram_mib: int
    case: str  # "1%", "10%", "2000 pages"
    scan: str
    checkpoints: int
    dirty_pages_p50: float
    pause_ms_p50: float
    pause_ms_p99: float
    split_ms_p50: dict[str, float]
    floor_ms: float  # bench/floor.py: the guest's bare checkpoint + a memcpy of the dirty bytes
    precopy_s: float

    @property
    def pause_over_floor(self) -> float:
        return self.pause_ms_p50 / self.floor_ms if self.floor_ms else math.inf


def compare_methods(
    ram_mib: int,
    *,
    pct: float | None = None,
    pages: int | None = None,
    methods: tuple[str, ...] = ("log", "hashed", "exact"),
    checkpoints: int = 30,
    epoch_ms: int = 50,
    threads: int = 2,
) -> list[MethodResult]:
    """The same guest (one dirty rate) checkpointed by each scan method in turn, in
    one run: a new pair (secondary, guest, engine) per method."""
    npages = (ram_mib << 20) // PS
    share = pct if pct is not None else 100 * (pages or 0) / npages
    case = f"{pct:g}%" if pct is not None else f"{pages} pages"
    base = case_config(ram_mib, share, epoch_ms, threads)
    out = []
    for scan in methods:  # a pair each: the same guest and dirty rate, booted afresh
        with running_pair(base, f"mirror-bench-{os.getpid()}-{ram_mib}.ram") as (
            g,
            link,
            cfg,
            outs,
        ):
            engine = CheckpointEngine(
                g, link, replace(cfg.checkpoint, scan=scan), outs[0],
                pair=cfg.pair.name, generation=1, node="hostA",
            )  # fmt: skip
            try:
                engine.handshake()
                # The guest runs from the end of the pre-copy: this measures the steady
                # state, and a pre-copy of GiBs under writes would leave the first
                # checkpoint of the scans a RAM-sized tail (a send buffer that does not
                # fit here beside RAM and the standby at 8 GiB).
                engine.precopy()
                g.resume()
                engine.run(threading.Event().is_set, epochs=checkpoints)
                s = summary(engine)
            finally:
                engine.close()
            out.append(
                MethodResult(
                    ram_mib, case, engine.method, s.checkpoints, s.dirty_pages_p50,
                    s.pause_ms_p50, s.pause_ms_p99, s.split_ms_p50, s.floor.ms,
                    engine.stats.precopy_s,
                )
            )  # fmt: skip
    return out


@dataclass
class Summary:
    """The pauses of an engine's run (after its first two checkpoints, which carry the
    pre-copy's tail) and their floor, measured on its guest just after."""

    checkpoints: int
    dirty_pages_p50: float
    pause_ms_p50: float
    pause_ms_p99: float
    split_ms_p50: dict[str, float]
    floor: floor.Floor
    replication_gbps: float  # dirty bytes / (send -> ack) time, median


def summary(engine: CheckpointEngine) -> Summary:
    """The run's figures; the guest must still run (its floor is measured now)."""
    recs = list(engine.stats.records)[2:]
    dirty = median(r.pages for r in recs)
    split = {
        k: round(median(getattr(r, f"{k}_ms") for r in recs), 3)
        for k in ("stop", "scan", "gather", "state", "resume")
    }
    pauses = sorted(r.pause_ms for r in recs)
    rates = [r.bytes_sent / (r.ack_ms / 1000) / 1e9 for r in recs if r.ack_ms]
    return Summary(
        len(recs), dirty, median(pauses),
        pauses[min(len(pauses) - 1, round(0.99 * (len(pauses) - 1)))], split,
        floor.measure(floor.bare_checkpoint(engine.guest), int(dirty)),
        median(rates) if rates else 0.0,
    )  # fmt: skip


def print_methods(rows: list[MethodResult]) -> None:
    print("\ncheckpoint pause by scan method (synthetic guest, real secondary, loopback)")
    print(
        f"{'RAM MiB':>8} {'case':>11} {'scan':>7} {'pages':>7} {'pause p50':>10} {'p99':>8} "
        f"{'floor':>7} {'x floor':>8} {'vs log':>7}  split p50 ms (stop scan gather state resume)"
    )
    for r in rows:
        ref = next(
            (x for x in rows if (x.ram_mib, x.case, x.scan) == (r.ram_mib, r.case, "log")), None
        )
        vs = f"{r.pause_ms_p50 / ref.pause_ms_p50:7.1f}" if ref else f"{'':7}"
        sp = " ".join(f"{v:g}" for v in r.split_ms_p50.values())
        print(
            f"{r.ram_mib:8d} {r.case:>11} {r.scan:>7} {r.dirty_pages_p50:7.0f} "
            f"{r.pause_ms_p50:10.2f} {r.pause_ms_p99:8.2f} {r.floor_ms:7.2f} "
            f"{r.pause_over_floor:8.2f} {vs}  {sp}"
        )
    targets = []

    def find(mib: int, case: str, scan: str) -> MethodResult | None:
        return next((x for x in rows if (x.ram_mib, x.case, x.scan) == (mib, case, scan)), None)

    log4, hashed4 = find(4096, "1%", "log"), find(4096, "1%", "hashed")
    if log4:
        targets.append(
            (log4.pause_ms_p50 <= 15, f"4 GiB 1% log pause p50 {log4.pause_ms_p50:.2f} ms <= 15")
        )
    if log4 and hashed4:
        ratio = hashed4.pause_ms_p50 / log4.pause_ms_p50
        targets.append((ratio >= 10, f"4 GiB 1% hashed / log = {ratio:.1f} >= 10"))
    same = [x for x in rows if x.scan == "log" and x.case.endswith("pages")]
    small = min(same, key=lambda x: x.ram_mib, default=None)
    big = max(same, key=lambda x: x.ram_mib, default=None)
    if small and big and big is not small:
        ratio = big.pause_ms_p50 / small.pause_ms_p50
        targets.append(
            (
                ratio <= 2,
                f"log, {big.case}: {big.ram_mib} / {small.ram_mib} MiB pause = {ratio:.2f} <= 2",
            )
        )
    if targets:
        print("targets:")
        for ok, what in targets:
            print(f"  {'ok  ' if ok else 'MISS'} {what}")


def plot_methods(rows: list[MethodResult], path: str) -> None:
    """Pause p50 against RAM size, one line per scan method and case (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"log": "o-", "hashed": "s--", "exact": "^:"}
    for case in dict.fromkeys(r.case for r in rows):
        for scan in ("log", "hashed", "exact"):
            pts = sorted(
                (r.ram_mib, r.pause_ms_p50) for r in rows if (r.case, r.scan) == (case, scan)
            )
            if pts:
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], styles[scan], label=f"{scan}, {case}"
                )
    floors = sorted((r.ram_mib, r.floor_ms) for r in rows if (r.scan, r.case) == ("log", "1%"))
    if floors:
        ax.plot([p[0] for p in floors], [p[1] for p in floors], "k-", lw=0.8, label="floor, 1%")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel("checkpoint pause p50 (ms)")
    ax.set_title("Checkpoint pause by dirty-page scan (synthetic guest, 50 ms epochs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
                keys=keys.load(cfg_a.keys),
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
    ram_mib: int,
    pct: float,
    epoch_ms: int = 50,
    threads: int = 1,
    scan: str = "exact",
    early_send: bool = CheckpointConfig.early_send,
) -> Config:
    """A pair whose synthetic guest dirties about ``pct``% of its pages per epoch.  The
    secondary is patient (silent after 10 minutes): on these 2 busy cores a long
    hashed scan of a large guest must not look like a dead primary."""
    return replace(
        Config(),
        arbiter=replace(ArbiterConfig(), silent_after_ms=600_000, fence_after_ms=1_200_000),
        guest=replace(
            GuestConfig(),
            ram_mib=ram_mib,
            outputs_per_s=200,
            dirty_pages_per_s=dirty_rate_for((ram_mib << 20) // PS, pct, epoch_ms),
        ),
        checkpoint=replace(
            CheckpointConfig(), epoch_ms=epoch_ms, threads=threads, max_in_flight=2, scan=scan,
            early_send=early_send,
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
    early_send: bool = CheckpointConfig.early_send,
) -> CheckpointResult:
    base = case_config(ram_mib, pct, epoch_ms, threads, scan, early_send)
    base = base if curve else insecure(base)
    with running_engine(base, f"mirror-bench-{ram_mib}.ram") as engine:
        engine.run(threading.Event().is_set, epochs=checkpoints)
        s = summary(engine)
        precopy_s, method = engine.stats.precopy_s, engine.method
        early = bool(engine.early_status()["on"]) and method == "log"
        early_p50 = median(r.early_pages for r in list(engine.stats.records)[2:])
    return CheckpointResult(
        ram_mib, pct, epoch_ms, s.checkpoints, s.dirty_pages_p50, s.pause_ms_p50,
        s.pause_ms_p99, s.floor.ms, s.split_ms_p50, s.replication_gbps,
        (ram_mib << 20) / precopy_s / 1e9, method, s.floor, early, early_p50,
    )  # fmt: skip


@dataclass
class EarlyResult:
    """Early send off and on, alternating on one engine, guest and secondary (same run)."""

    ram_mib: int
    dirty_pct: float
    epoch_ms: int
    at_pct: int
    max_pause_ms: int
    rounds: int
    off_checkpoints: int
    on_checkpoints: int
    off_pause_p50: float
    off_pause_p99: float
    on_pause_p50: float
    on_pause_p99: float
    off_pages_p50: float  # pages in the pause
    on_pages_p50: float
    on_early_pages_p50: float  # pages sent early (while the guest ran)
    on_early_ms_p50: float  # the early send's time (off the pause)
    off_ack_ms_p50: float
    on_ack_ms_p50: float
    off_throttle_p50: float  # the throttle's level (0: full speed)
    on_throttle_p50: float
    off_split_ms_p50: dict[str, float] = field(default_factory=dict)
    on_split_ms_p50: dict[str, float] = field(default_factory=dict)

    @property
    def ratio_p50(self) -> float:
        return self.on_pause_p50 / self.off_pause_p50

    @property
    def ratio_p99(self) -> float:
        return self.on_pause_p99 / self.off_pause_p99


def _p(values: list[float], pct: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(pct / 100 * (len(v) - 1)))] if v else 0.0


def compare_early(
    ram_mib: int,
    pct: float,
    *,
    epoch_ms: int = 50,
    rounds: int = 4,
    checkpoints: int = 20,
    threads: int = 2,
    at_pct: int = 70,
    max_pause_ms: int = 0,
) -> EarlyResult:
    """Pause with and without ``checkpoint.early_send`` in the same run: one engine, one
    guest, one secondary; after ``checkpoints`` checkpoints of warm-up (left out: the
    pre-copy's wake), ``rounds`` rounds of ``checkpoints`` checkpoints without, then with
    (the first 2 of each left out: the switch)."""
    base = case_config(ram_mib, pct, epoch_ms, threads, "log")
    ck = replace(base.checkpoint, early_send=True, early_send_at_pct=at_pct,
                 max_pause_ms=max_pause_ms)  # fmt: skip
    base = replace(base, checkpoint=ck)
    modes = {False: replace(ck, early_send=False), True: ck}
    recs: dict[bool, list[Any]] = {False: [], True: []}
    with running_engine(base, f"mirror-bench-early-{ram_mib}.ram") as engine:
        if engine.method != "log":
            raise RuntimeError(f"the early send needs the dirty-page log: {engine.stats.scan_note}")
        warm = engine.epoch + checkpoints  # the pre-copy's wake (and the throttle's start)
        engine.cfg = modes[False]
        engine.run(lambda: engine.epoch >= warm, release=False)
        for _ in range(rounds):
            for early in (False, True):
                engine.cfg = modes[early]
                first = engine.epoch + 3
                target = engine.epoch + checkpoints
                engine.run(lambda t=target: engine.epoch >= t, release=False)  # type: ignore[misc]
                recs[early] += [r for r in engine.stats.records if first <= r.epoch <= target]
        while engine.in_flight:  # the acks of the last ones
            engine.pump(time.monotonic() + 0.05)
    off, on = recs[False], recs[True]

    def med(rs: list[Any], name: str) -> float:
        vals = [getattr(r, name) for r in rs if getattr(r, name) is not None]
        return round(median(vals), 3) if vals else 0.0

    return EarlyResult(
        ram_mib, pct, epoch_ms, at_pct, max_pause_ms, rounds, len(off), len(on),
        round(_p([r.pause_ms for r in off], 50), 3), round(_p([r.pause_ms for r in off], 99), 3),
        round(_p([r.pause_ms for r in on], 50), 3), round(_p([r.pause_ms for r in on], 99), 3),
        med(off, "pages"), med(on, "pages"), med(on, "early_pages"), med(on, "early_ms"),
        med(off, "ack_ms"), med(on, "ack_ms"), med(off, "throttle_level"),
        med(on, "throttle_level"),
        {k: med(off, f"{k}_ms") for k in ("stop", "scan", "gather", "state", "resume")},
        {k: med(on, f"{k}_ms") for k in ("stop", "scan", "gather", "state", "resume")},
    )  # fmt: skip


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of this process and of process ``pid`` (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return ru.ru_utime + ru.ru_stime + (int(fields[11]) + int(fields[12])) / ticks


def link_capacity(
    ram_mib: int = 256,
    batch_mib: int = 64,
    rounds: int = 8,
    *,
    curve: bool = True,
    sealed: bool = True,
    cpu: list[float] | None = None,
) -> float:
    """GB/s of page data that the interconnect and a real standby commit, with no
    guest competing for the CPU: prebuilt checkpoints sent one after another to
    a `mirror secondary` process, each timed from send to ack (median after two
    rounds of warm-up).  ``curve``: with keys (the default of a pair), the pages sealed
    under AES-256-GCM off CURVE (what a pair does) or, with ``sealed=False``, on the
    CurveZMQ data socket as before pagecrypt (the old way, for comparison).  ``cpu``:
    appended the CPU ms both sides spent per GB committed (user + system)."""
    base = replace(
        Config(),
        pair=PairConfig(f"capacity-{os.getpid()}"),  # its own standby image in /dev/shm
        guest=replace(GuestConfig(), ram_mib=ram_mib),
    )
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
                keys=keys.load(cfg_a.keys),
            )
            session = 1
            link.session[0] = session
            link.send(
                wire.Hello(cfg_b.pair.name, cfg_b.pair.generation, "bench", ram_mib << 20, session)
            )
            welcome = link.recv(30)
            if not isinstance(welcome, wire.Welcome):
                raise RuntimeError("the secondary refused the benchmark's HELLO")
            if curve and sealed:
                lk = keys.load(cfg_a.keys)
                assert lk is not None and welcome.bulk_port
                key = pagecrypt.page_key(lk, cfg_b.pair.name, cfg_b.pair.generation, session)
                link.seal_pages(welcome.bulk_port, key)
            npages = (ram_mib << 20) // PS
            ram = pd.alloc_pages(npages)
            ram[:] = os.urandom(len(ram))
            idx = list(range(0, npages, max(1, npages // ((batch_mib << 20) // PS))))
            batch = pd.gather(ram, idx, out=pd.alloc_pages(len(idx)))
            sums = pd.checksums(ram, idx)
            rates = []
            for epoch in range(1, rounds + 3):
                if epoch == 3:  # after the warm-up: CPU of both sides from here
                    cpu0 = _cpu_s(secondary.proc.pid)
                start = time.perf_counter()
                msg = wire.Pages.of(epoch, batch, sums, state=b"bench")
                link.send(replace(msg, session=session, seq=epoch))
                if link.recv(60) != wire.Ack(session, epoch, 0):
                    raise RuntimeError(f"the secondary did not acknowledge checkpoint {epoch}")
                rates.append(len(batch.data) / (time.perf_counter() - start) / 1e9)
            if cpu is not None:  # CPU ms (both sides, every thread) per GB committed
                cpu.append(
                    (_cpu_s(secondary.proc.pid) - cpu0) * 1e3 / (rounds * len(batch.data) / 1e9)
                )
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
    curve_capacity: float | None = None,
) -> None:
    """``results``/``capacity`` with keys (pages sealed); ``plain``/``plain_capacity`` the
    same run's cases without keys (the encryption's cost); ``curve_capacity`` with the
    pages on CurveZMQ (the way before pagecrypt)."""
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
            " with keys (pages sealed)"
        )
    if plain_capacity is not None and capacity is not None:
        print(
            f"  without keys (same run): {plain_capacity:.2f} GB/s; with/without "
            f"{capacity / plain_capacity:.2f}x"
        )
    if plain_capacity is not None and curve_capacity is not None:
        print(
            f"  pages on CURVE (same run): {curve_capacity:.2f} GB/s; "
            f"{curve_capacity / plain_capacity:.2f}x without keys"
        )
    for r, p in zip(results, plain or [], strict=False):
        print(
            f"  {r.ram_mib} MiB {r.dirty_pct:g}%: pause p50 {r.pause_ms_p50:.2f} ms with keys, "
            f"{p.pause_ms_p50:.2f} ms without; replication {r.replication_gbps:.2f} GB/s "
            f"with, {p.replication_gbps:.2f} without"
        )
    print("targets: pause <= 1.5x floor; >= 1 GB/s of dirty pages replicated; keys >= 0.85x")
    if plain_capacity is not None and capacity is not None:
        ratio = capacity / plain_capacity
        print(f"  {'ok  ' if ratio >= 0.85 else 'MISS'} capacity with/without keys: {ratio:.2f}x")
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


def capacities(rounds: int = 3, **kw: Any) -> dict[str, list[float]]:
    """The link + standby capacity three ways, each way once per round in rotating order
    (the machine's noise hits all alike): the pages sealed off CURVE (a pair's default),
    the pages on the CurveZMQ data socket (the way before it), and no keys at all."""
    ways: dict[str, dict[str, bool]] = {
        "sealed": {"curve": True, "sealed": True},
        "curve": {"curve": True, "sealed": False},
        "plain": {"curve": False},
    }
    out: dict[str, list[float]] = {w: [] for w in ways}
    out.update({f"{w}_cpu": [] for w in ways})
    names = list(ways)
    for r in range(rounds):
        for w in names[r % 3 :] + names[: r % 3]:
            out[w].append(link_capacity(**ways[w], cpu=out[f"{w}_cpu"], **kw))
    return out


def print_capacities(caps: dict[str, list[float]]) -> None:
    sealed, curve, plain = (median(caps[w]) for w in ("sealed", "curve", "plain"))
    per_round = [s / p for s, p in zip(caps["sealed"], caps["plain"], strict=True)]
    print(
        "link + standby capacity (64 MiB checkpoints, no guest running), median of "
        f"{len(caps['plain'])} rounds:"
    )
    cpu = {w: median(caps[f"{w}_cpu"]) for w in ("sealed", "curve", "plain")}
    print(
        f"  pages sealed (AES-256-GCM, off CURVE): {sealed:.2f} GB/s, CPU {cpu['sealed']:.0f} ms/GB"
    )
    print(
        f"  pages on CURVE (XSalsa20-Poly1305):     {curve:.2f} GB/s, CPU {cpu['curve']:.0f} ms/GB"
    )
    print(
        f"  no keys (plain):                        {plain:.2f} GB/s, CPU {cpu['plain']:.0f} ms/GB"
    )
    print(
        f"  CPU both sides spent per GB (user + system), over plain: sealed "
        f"{cpu['sealed'] / cpu['plain']:.2f}x, CURVE {cpu['curve'] / cpu['plain']:.2f}x"
    )
    print(
        f"  sealed/plain {sealed / plain:.2f}x (per round "
        f"{', '.join(f'{x:.2f}' for x in per_round)}); curve/plain {curve / plain:.2f}x"
    )
    print(f"  {'ok  ' if sealed / plain >= 0.85 else 'MISS'} sealed/plain >= 0.85x")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m bench.checkpoint",
        description="The link + standby capacity with the pages sealed, on CURVE, and "
        "without keys, in the same run (rotating order).",
    )
    ap.add_argument("--rounds", type=int, default=3, help="each way this many times")
    ap.add_argument("--ram-mib", type=int, default=256, help="the pair's RAM")
    ap.add_argument("--batch-mib", type=int, default=64, help="each checkpoint's pages")
    args = ap.parse_args(argv)
    print_capacities(capacities(args.rounds, ram_mib=args.ram_mib, batch_mib=args.batch_mib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
