"""One host's daemon: wires the role (primary or secondary), the guest, the link and the outputs.

The agent does the I/O; the engines decide nothing about failover (that is
the controller's job, a later issue).  Each role writes ``status.json`` in
the host's state directory, which ``mirror status`` and the demo read; the
primary also writes ``stats.json`` (summary and per-checkpoint records).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mirror.checkpoint import CheckpointEngine, Progress
from mirror.config import Config
from mirror.guests.synthetic import SHM_DIR, SyntheticGuest
from mirror.hoststate import write_json
from mirror.link import Endpoint, Link
from mirror.outputs import ObserverSink, OutputBuffer
from mirror.standby import Standby

log = logging.getLogger("mirror.agent")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so that roles end cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run_secondary(cfg: Config, stop: threading.Event) -> int:
    standby = Standby(cfg)
    try:
        standby.serve(stop)
    finally:
        standby.close()
    return 0


def progress_bar(prefix: str) -> Callable[[Progress], None]:
    def show(p: Progress) -> None:
        width = 30
        frac = p.done_pages / p.total_pages if p.total_pages else 1.0
        bar = "#" * int(frac * width)
        mib = p.done_pages * 4096 >> 20
        sys.stderr.write(
            f"\r{prefix} [{bar:<{width}}] {frac:4.0%} {mib}/{p.total_pages * 4096 >> 20} MiB"
        )
        if p.done_pages >= p.total_pages:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def run_primary(
    cfg: Config, stop: threading.Event, *, duration: float | None = None, epochs: int | None = None
) -> int:
    """Boot the guest, pair, pre-copy, then checkpoint until stopped.

    ``duration``: stop after that many seconds of checkpoints.  ``epochs``:
    take exactly that many checkpoints, then hold the guest paused at the
    last one (acknowledged) until stopped.
    """
    state_dir = cfg.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    host, port = cfg.output.address()
    sink = ObserverSink(host, port)
    outputs = OutputBuffer(sink)
    ram_path = SHM_DIR / f"mirror-{cfg.pair.name}-{cfg.node.name}-{os.getpid()}.ram"
    guest = SyntheticGuest.boot(cfg.guest.synthetic(), ram_path, outputs.add)
    link = Link.client(
        Endpoint(cfg.link.host, cfg.link.data_port, cfg.link.heartbeat_port),
        cfg.node.name,
        heartbeat_interval=cfg.link.heartbeat_interval_ms / 1000,
    )
    engine = CheckpointEngine(
        guest,
        link,
        cfg.checkpoint,
        outputs,
        pair=cfg.pair.name,
        generation=cfg.pair.generation,
        node=cfg.node.name,
    )
    phase = "pairing"

    def status() -> dict[str, Any]:
        return {
            "role": "primary",
            "phase": phase,
            "pair": cfg.pair.name,
            "node": cfg.node.name,
            "generation": cfg.pair.generation,
            "pid": os.getpid(),
            "ram": str(ram_path),
            "epoch": engine.epoch,
            "acked": engine.acked,
            "heartbeat_age_s": link.peer.age(),
            "summary": engine.stats.summary(outputs),
        }

    try:
        write_json(state_dir / "status.json", status())
        engine.handshake()
        guest.resume()
        phase = "precopy"
        engine.precopy(progress_bar("pre-copy"))
        phase = "protected"
        log.info(
            "pre-copy of %d MiB done in %.2f s; checkpoints every %d ms",
            cfg.guest.ram_mib,
            engine.stats.precopy_s,
            cfg.checkpoint.epoch_ms,
        )
        end = None if duration is None else time.monotonic() + duration
        last_status = 0.0

        def should_stop() -> bool:
            nonlocal last_status
            now = time.monotonic()
            if now - last_status > 0.5:
                write_json(state_dir / "status.json", status())
                last_status = now
            return stop.is_set() or (end is not None and now >= end)

        engine.run(should_stop, epochs=epochs)
        if epochs is not None:
            phase = "frozen"  # paused at the last checkpoint, which the standby holds
            write_json(state_dir / "status.json", status())
            while not stop.is_set() and (end is None or time.monotonic() < end):
                stop.wait(0.2)
        phase = "stopped"
        return 0
    finally:
        write_json(
            state_dir / "stats.json",
            {"summary": engine.stats.summary(outputs), "checkpoints": engine.records_json()},
        )
        write_json(state_dir / "status.json", status())
        guest.stop()
        link.close()
        sink.close()
