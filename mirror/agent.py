"""One host's daemon: wires the role (primary or secondary), the guest, the link,
the outputs, the storage heartbeats and the failover controller.

The controller decides (mirror/controller.py); the agent observes and acts.
Each role writes ``status.json`` in the host's state directory, which
``mirror status`` and the demo read; the primary also writes ``stats.json``
when it stops.  Decisions are logged as structured events: one JSON object
per line with an "event" key.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror import wire
from mirror.arbiter import Arbiter, ArbiterError, ClaimResult, DirectoryArbiter
from mirror.checkpoint import CheckpointEngine, Progress, ReplicationError
from mirror.config import Config
from mirror.controller import Action, Controller, Decision, Observation, Role, Timeouts
from mirror.guests.backend import Backend, OutputSink, backend_for
from mirror.guests.base import Guest, GuestOutput
from mirror.hoststate import write_json
from mirror.link import Endpoint, Link
from mirror.outputs import OutputBuffer
from mirror.standby import Standby

log = logging.getLogger("mirror.agent")


def event(name: str, **fields: Any) -> None:
    """A structured event: one JSON object on one log line."""
    log.warning("%s", json.dumps({"event": name, **fields}, default=str))


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so that roles end cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class StorageBeat(threading.Thread):
    """Writes this node's heartbeat slot every interval; knows whether writes succeed."""

    def __init__(
        self,
        arbiter: Arbiter,
        interval: float,
        role: Callable[[], str],
        generation: Callable[[], int],
        epoch: Callable[[], int],
    ) -> None:
        super().__init__(name="storage-heartbeat", daemon=True)
        self.arbiter, self.interval = arbiter, interval
        self.role, self.generation, self.epoch = role, generation, epoch
        self.last_ok: float | None = None
        self.halt = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.arbiter.beat(self.role(), self.generation(), self.epoch())
                self.last_ok = time.monotonic()
                if self._failing:
                    event("storage-heartbeat-ok")
                self._failing = False
            except ArbiterError as e:
                if not self._failing:
                    event("storage-heartbeat-failing", error=str(e))
                self._failing = True
            self.halt.wait(self.interval)

    def ok(self, within: float) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok <= within


class Failover:
    """One role's controller with the arbiter: observe, decide, claim."""

    def __init__(
        self, cfg: Config, role: Role, epoch: Callable[[], int], generation: int | None = None
    ) -> None:
        a = cfg.arbiter
        self.generation = cfg.pair.generation if generation is None else generation
        self.cfg = cfg
        self.arbiter = DirectoryArbiter(Path(a.dir), cfg.pair.name, cfg.node.name)
        self.timeouts = Timeouts(a.silent_after_ms / 1000, a.fence_after_ms / 1000)
        self.controller = Controller(role, self.timeouts)
        self.beat = StorageBeat(
            self.arbiter,
            a.heartbeat_interval_ms / 1000,
            lambda: self.role_name,
            lambda: self.generation,
            epoch,
        )
        self.role_name = role.value
        self._claim: ClaimResult | None = None
        self._next = 0.0
        self.beat.start()

    def tick(
        self,
        peer: str | None,
        net_age: float | None,
        committed: int = 0,
        manual_promote: bool = False,
    ) -> Decision | None:
        """Observe and decide, at most every 20 ms; None when it is not time yet."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + 0.02
        storage_age = self.arbiter.peer_age(peer) if peer else None
        obs = Observation(
            now,
            net_age,
            storage_age,
            self.beat.ok(self.timeouts.silent_after),
            committed,
            self._claim,
            manual_promote,
        )
        self._claim = None
        before = self.controller.state
        d = self.controller.step(obs)
        if d.action is not Action.NONE or d.state is not before:
            event(
                "decision",
                node=self.cfg.node.name,
                action=d.action.value,
                state=d.state.value,
                reason=d.reason,
                net_age=net_age,
                storage_age=storage_age,
            )
        if d.action in (Action.CLAIM_PROMOTE, Action.CLAIM_UNPROTECTED):
            what = "promote" if d.action is Action.CLAIM_PROMOTE else "unprotected"
            try:
                self._claim = self.arbiter.claim(self.generation, self.cfg.node.name, what)
            except ArbiterError as e:
                event("claim-failed", error=str(e))
        return d

    def close(self) -> None:
        self.beat.halt.set()
        self.beat.join(2)


# ---- the secondary -----------------------------------------------------------


def run_secondary(cfg: Config, stop: threading.Event) -> int:
    backend = backend_for(cfg)
    standby = Standby(cfg, generation=current_generation(cfg), fingerprint=backend.fingerprint())
    try:
        # the ready standby: a guest waiting for its state (for QEMU, on the image)
        ready = backend.ready(standby.image.path)
    except BaseException:
        standby.close()
        raise
    failover = Failover(cfg, Role.SECONDARY, lambda: standby.committed, standby.generation)
    promote = False
    standby.extra_status = lambda: {
        "protection": failover.controller.state.value,
        "storage_age_s": failover.arbiter.peer_age(standby.primary) if standby.primary else None,
    }
    manual = threading.Event()  # `mirror failover` sends SIGUSR1
    signal.signal(signal.SIGUSR1, lambda signum, frame: manual.set())

    def tick() -> bool:
        nonlocal promote
        link = standby.link
        if link is None or standby.primary is None:
            return False  # never paired: nothing to judge
        failover.generation = standby.generation  # a HELLO may have moved it on
        d = failover.tick(
            standby.primary,
            link.peer.age(),
            standby.committed,
            manual_promote=manual.is_set() or standby.handover,
        )
        if d is not None and d.action is Action.CLAIM_PROMOTE:
            manual.clear()
        promote = d is not None and d.action is Action.PROMOTE
        return promote

    try:
        standby.serve(stop, tick)
        if promote:
            return run_promoted(cfg, backend, standby, failover, stop, ready)
        return 0
    finally:
        if not promote:
            backend.discard(ready)
        failover.close()
        standby.close(remove_image=not promote)


def run_promoted(
    cfg: Config,
    backend: Backend,
    standby: Standby,
    failover: Failover,
    stop: threading.Event,
    ready: Any,
) -> int:
    """Promotion: go on from the committed checkpoint as the (unprotected) primary."""
    failover.role_name = "primary"
    assert standby.link is not None
    last_heartbeat = standby.link.peer.last or time.monotonic()
    released_by_old = standby.link.peer.committed  # what the old primary last said it released
    committed = standby.committed
    # A primary that is alive (a forced manual failover) may still release outputs for
    # acks already on their way to it: let them land before asking the observer.
    settle = failover.timeouts.silent_after - (time.monotonic() - standby.last_ack_at)
    if settle > 0 and not standby.handover:  # a handover comes after the last release
        time.sleep(settle)
    sink = backend.sink(ready)
    # The committed outputs the observer lacks: those after its position, or, for an
    # observer that does not say, those of epochs the old primary had not yet reported.
    if sink.position is not None:
        replay = [(s, p) for e, s, p in standby.outputs_tail if s > sink.position]
    else:
        replay = [(s, p) for e, s, p in standby.outputs_tail if e > released_by_old]
    now = time.monotonic()
    sink([GuestOutput(s, p, now) for s, p in replay])
    first: list[float] = []
    unprotected = OutputBuffer(sink)
    unprotected.go_unprotected()
    current = [unprotected]  # where the guest's outputs go: direct, until re-protected

    def on_output(out: GuestOutput) -> None:
        current[0].add(out)
        if not first:
            first.append(time.monotonic())

    guest = backend.launch(ready, standby.image.path, standby.state_path, on_output)
    guest.resume()
    event(
        "promoted",
        node=cfg.node.name,
        checkpoint=committed,
        replayed=len(replay),
        observer_position=sink.position,
    )
    failover.close()
    promoted = {"promoted_from": committed, "replayed_outputs": len(replay)}

    def note() -> dict[str, Any]:
        return {**promoted, "failover_ms": (first[0] - last_heartbeat) * 1000 if first else None}

    try:
        return lead(cfg, backend, guest, sink, current, failover.generation + 1, stop, None, note)
    finally:
        guest.stop()
        sink.close()


def lead(
    cfg: Config,
    backend: Backend,
    guest: Guest,
    sink: OutputSink,
    current: list[OutputBuffer],
    generation: int,
    stop: threading.Event,
    end: float | None,
    note: Callable[[], dict[str, Any]] = dict,
) -> int:
    """Run the guest as the pair's only primary under a new ``generation`` (recorded on
    the arbiter, so that nodes of older ones are refused): unprotected while no
    standby answers at ``link.peer_host``, protected again as soon as one pairs.
    ``current[0]`` is where the guest's outputs go."""
    arbiter = DirectoryArbiter(Path(cfg.arbiter.dir), cfg.pair.name, cfg.node.name)
    released = 0
    while not stop.is_set() and (end is None or time.monotonic() < end):
        arbiter.set_generation(generation)
        run = PrimaryRun(
            cfg, backend, guest, OutputBuffer(sink), generation, cfg.link.peer_host or cfg.link.host
        )
        run.phase = "unprotected"
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                run.extra = {**note(), "outputs_released": released + current[0].released}
                run.write_status()
                if not guest.alive:
                    event("guest-died", node=cfg.node.name)
                    return 1
                try:
                    run.engine.handshake(timeout=1.0)
                except ReplicationError as e:
                    if "refused" in str(e):
                        event("re-pairing-refused", node=cfg.node.name, reason=str(e))
                        stop.wait(1.0)
                    continue
                event("re-protecting", node=cfg.node.name, generation=generation)
                released += current[0].released
                current[0] = run.outputs  # held from here on, released on acks
                run.extra = {**note(), "outputs_released": released}
                code = run.protect(stop, end, None)
                if code != UNPROTECTED:
                    return code
                break  # the standby was lost again: lead the next generation
        finally:
            run.close()
        generation += 1
    return 0


# ---- the primary --------------------------------------------------------------


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


SWITCHED_OVER = 10  # PrimaryRun.protect: handed over, become the secondary
UNPROTECTED = 11  # PrimaryRun.protect: won "unprotected": run on, lead the next generation


class PrimaryRun:
    """The primary side of one pairing (one generation): pair with a standby, pre-copy,
    checkpoint, and act on the controller's decisions.  The guest is the caller's."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        guest: Guest,
        outputs: OutputBuffer,
        generation: int,
        address: str,
    ) -> None:
        self.cfg, self.guest, self.outputs, self.generation = cfg, guest, outputs, generation
        self.link = Link.client(
            Endpoint(address, cfg.link.data_port, cfg.link.heartbeat_port),
            cfg.node.name,
            heartbeat_interval=cfg.link.heartbeat_interval_ms / 1000,
        )
        self.engine = CheckpointEngine(
            guest,
            self.link,
            cfg.checkpoint,
            outputs,
            pair=cfg.pair.name,
            generation=generation,
            node=cfg.node.name,
            fingerprint=backend.fingerprint(),
        )
        self.failover = Failover(cfg, Role.PRIMARY, lambda: self.engine.acked, generation)
        self.phase = "pairing"
        self.extra: dict[str, Any] = {}
        self.switch = threading.Event()  # `mirror switchover` asks to hand over

    def status(self) -> dict[str, Any]:
        link, engine = self.link, self.engine
        return {
            "role": "primary", "phase": self.phase, "pair": self.cfg.pair.name,
            "node": self.cfg.node.name, "generation": self.generation, "pid": os.getpid(),
            "ram": str(self.guest.ram_path), "epoch": engine.epoch, "acked": engine.acked,
            "protection": self.failover.controller.state.value,
            "heartbeat_age_s": link.peer.age(),
            "storage_age_s": self.failover.arbiter.peer_age(link.peer.node)
            if link.peer.node else None,
            "summary": engine.stats.summary(self.outputs), **self.extra,
        }  # fmt: skip

    def write_status(self) -> None:
        write_json(self.cfg.state_dir / "status.json", self.status())

    def protect(self, stop: threading.Event, end: float | None, epochs: int | None) -> int:
        """After the handshake: pre-copy, then checkpoints until stopped, the end, or
        ``epochs`` checkpoints; then as the controller decides.  Exit code 3: fenced."""
        cfg, engine, outputs, failover, link = (
            self.cfg,
            self.engine,
            self.outputs,
            self.failover,
            self.link,
        )
        self.phase = "precopy"
        engine.precopy(progress_bar("pre-copy"))
        self.phase = "protected"
        log.info(
            "pre-copy of %d MiB done in %.2f s; checkpoints every %d ms (generation %d)",
            cfg.guest.ram_mib,
            engine.stats.precopy_s,
            cfg.checkpoint.epoch_ms,
            self.generation,
        )
        last_status = 0.0
        verdict: list[Action] = []

        def should_stop() -> bool:
            nonlocal last_status
            now = time.monotonic()
            if now - last_status > 0.5:
                self.write_status()
                last_status = now
            d = failover.tick(link.peer.node or None, link.peer.age())
            if d is not None and d.action in (Action.RUN_UNPROTECTED, Action.FENCE):
                verdict.append(d.action)
                return True
            return self.switch.is_set() or stop.is_set() or (end is not None and now >= end)

        engine.run(should_stop, epochs=epochs)
        if self.switch.is_set() and not verdict:
            return self._hand_over()
        if verdict and verdict[0] is Action.FENCE:
            self.phase = "fenced"
            self.guest.stop()  # releases nothing: what it held dies with it
            event("fenced", node=cfg.node.name, held=outputs.held)
            return 3
        if verdict:
            self.phase = "unprotected"
            event("unprotected", node=cfg.node.name, released=outputs.go_unprotected())
            return UNPROTECTED
        if epochs is not None:
            self.phase = "frozen"  # paused at the last checkpoint, which the standby holds
        self.write_status()
        while not stop.is_set() and (end is None or time.monotonic() < end):  # frozen, alone
            stop.wait(0.2)
            self.write_status()
        self.phase = "stopped"
        if not outputs.unprotected:
            link.send(wire.Bye(cfg.node.name, "stopped by its operator"))
            time.sleep(0.05)  # let it leave before the socket closes
        return 0

    def _hand_over(self) -> int:
        """Planned switchover: a last checkpoint with the guest left paused; once it is
        acknowledged every output is released, and the standby goes on from exactly
        there.  Returns SWITCHED_OVER (the caller becomes the secondary)."""
        engine = self.engine
        self.phase = "switching-over"
        while engine.in_flight:  # the window first, so the last checkpoint follows in order
            engine.pump(time.monotonic() + 0.01)
        engine.checkpoint(resume=False)
        deadline = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < deadline:
            engine.pump(time.monotonic() + 0.01)
        if engine.in_flight:
            self.guest.resume()
            event("switchover-failed", node=self.cfg.node.name, reason="no ack")
            raise ReplicationError(
                "switchover failed: the standby did not acknowledge the "
                "last checkpoint; the guest runs on here"
            )
        self.link.send(wire.Handover(self.cfg.node.name, engine.epoch))
        reply: wire.Message | None = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not isinstance(reply, wire.Ack | wire.Reject):
            reply = self.link.recv(max(0.0, deadline - time.monotonic()))  # skip strays
        if reply != wire.Ack(engine.epoch, 0):
            self.guest.resume()
            raise ReplicationError(
                f"switchover failed: the standby answered {reply}; the guest runs on here"
            )
        self.guest.stop()  # the standby has it now; this copy never runs again
        self.phase = "switched-over"
        event("switched-over", node=self.cfg.node.name, checkpoint=engine.epoch)
        return SWITCHED_OVER

    def close(self) -> None:
        self.failover.close()
        write_json(
            self.cfg.state_dir / "stats.json",
            {
                "summary": self.engine.stats.summary(self.outputs),
                "checkpoints": self.engine.records_json(),
            },
        )
        self.write_status()
        self.link.close()


def run_primary(
    cfg: Config, stop: threading.Event, *, duration: float | None = None, epochs: int | None = None
) -> int:
    """Boot the guest, pair, pre-copy, then checkpoint until stopped.

    ``duration``: stop after that many seconds of checkpoints.  ``epochs``:
    take exactly that many checkpoints, then hold the guest paused at the
    last one (acknowledged) until stopped.  Exit code 3: fenced.
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    backend = backend_for(cfg)
    current: list[OutputBuffer] = []  # where the guest's outputs go (a later pairing swaps it)
    guest = backend.boot(lambda out: current[0].add(out))  # paused until paired
    event("guest-booted", node=cfg.node.name, kind=cfg.guest.kind, ram=str(guest.ram_path))
    run = None
    sink: OutputSink | None = None
    try:
        sink = backend.sink(guest)
        outputs = OutputBuffer(sink)
        current.append(outputs)
        generation = current_generation(cfg)
        run = PrimaryRun(cfg, backend, guest, outputs, generation, cfg.link.host)
        signal.signal(signal.SIGUSR2, lambda signum, frame: run.switch.set() if run else None)
        run.write_status()
        run.engine.handshake()
        guest.resume()
        end = None if duration is None else time.monotonic() + duration
        code = run.protect(stop, end, epochs)
        if code == UNPROTECTED:  # the secondary is gone: lead on, and pair when one comes
            run.close()
            run = None
            code = lead(cfg, backend, guest, sink, current, generation + 1, stop, end)
    finally:
        if run:
            run.close()
        guest.stop()
        if sink is not None:
            sink.close()
    if code == SWITCHED_OVER:
        log.info("switched over: this host is now the secondary")
        return run_secondary(cfg, stop)
    return code


def current_generation(cfg: Config) -> int:
    """The pair's generation: the configured one, or a later one a promotion recorded."""
    return max(
        cfg.pair.generation,
        DirectoryArbiter(Path(cfg.arbiter.dir), cfg.pair.name, cfg.node.name).generation(),
    )
