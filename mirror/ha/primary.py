"""The primary role: boot the guest, pair, pre-copy, checkpoint every epoch (one pairing
is a :class:`mirror.ha.primaryrun.PrimaryRun`); and, after a promotion or a won
"unprotected" claim, lead the pair under a new generation until a standby pairs again."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from mirror.config import Config
from mirror.guests.base import Guest
from mirror.ha import control
from mirror.ha.arbiter import ArbiterError
from mirror.ha.backend import Backend, OutputSink, backend_for
from mirror.ha.claims import Claims
from mirror.ha.primaryrun import (
    PAIRING_FAILED,
    SWITCHED_OVER,
    UNPROTECTED,
    PairingRetry,
    PrimaryRun,
)
from mirror.ha.rekey import current as current_rekey
from mirror.ha.role import begin, current_generation, event, make_arbiter
from mirror.hoststate import private_dir
from mirror.replication import keys
from mirror.replication.inflight import PairingStopped, ReplicationError
from mirror.replication.outputs import OutputBuffer

log = logging.getLogger("mirror.ha.role")

DETACHED = threading.Event()  # `mirror unpair`: the role ends, the guest runs on where it can


def detach_on(stop: threading.Event) -> Callable[[], dict[str, Any]]:
    """The control op ``detach`` (the host agent's `mirror unpair`): stop the role cleanly
    (a BYE: the standby does not promote) and leave the guest running if its backend can
    (a libvirt domain); other guests stop with the role."""

    def detach() -> dict[str, Any]:
        DETACHED.set()
        stop.set()
        return {"accepted": True}

    return detach


def stop_guest(guest: Guest) -> None:
    """The role ends: the guest stops, or is let go of after ``detach``."""
    (guest.detach if DETACHED.is_set() else guest.stop)()


def switching(run: PrimaryRun) -> Callable[[], dict[str, Any]]:
    """`mirror switchover` (the control socket) for ``run``: accepted while protected."""

    def switch_now() -> dict[str, Any]:
        if run.phase != "protected":
            return {"accepted": False, "phase": run.phase}
        run.switch.set()
        return {"accepted": True}

    return switch_now


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
    retry: PairingRetry | None = None,
) -> int:
    """Run the guest as the pair's only primary under a new ``generation`` (recorded on
    the arbiter, so that nodes of older ones are refused): unprotected while no
    standby answers at ``link.peer_host``, protected again as soon as one pairs.
    ``current[0]`` is where the guest's outputs go.  A pairing that fails after the
    standby's WELCOME leaves the guest running unprotected; the next is tried under the
    next generation after ``retry``'s wait."""
    claims = Claims(make_arbiter(cfg.arbiter, cfg.pair.name, cfg.node.name), cfg.node.name)
    released = 0
    retry = retry or PairingRetry()
    while not stop.is_set() and (end is None or time.monotonic() < end):
        recorded = warned = False
        run = PrimaryRun(
            cfg, backend, guest, OutputBuffer(sink), generation, cfg.link.peer_host or cfg.link.host
        )
        run.retry = retry
        control.serve({"status": run.status, "switchover": switching(run),
                       "detach": detach_on(stop),
                       "reload-keys": current_rekey(cfg.keys, cfg.node.name).control})  # fmt: skip
        run.phase = "unprotected"
        try:
            while not stop.is_set() and (end is None or time.monotonic() < end):
                if not recorded:  # storage failing: the guest runs on; recorded when it can be
                    try:
                        claims.record(generation)
                        recorded = True
                    except ArbiterError as e:
                        if not warned:
                            event("generation-not-recorded", generation=generation, error=str(e))
                        warned = True
                run.extra = {**note(), "outputs_released": released + current[0].released}
                run.write_status()
                if not guest.alive:
                    if guest.end_reason() == "shutdown":  # unprotected: nobody to tell
                        event("guest-shutdown", node=cfg.node.name)
                        return 0
                    event("guest-died", node=cfg.node.name)
                    return 1
                run.relink_if_rekeyed()  # the pool may have placed a new standby elsewhere
                rekey = current_rekey(cfg.keys, cfg.node.name)
                if rekey.due():  # SIGHUP or `mirror keys reload`
                    rekey.apply(run.use_keys)
                if retry.waiting() > 0:  # the last pairing failed: not before its wait is over
                    stop.wait(min(0.2, retry.waiting()))
                    continue
                try:
                    run.engine.handshake(timeout=1.0, stop=stop)
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
                if code == PAIRING_FAILED:
                    run.outputs.go_unprotected()  # what the pairing held: nobody protects it
                    break  # the next attempt under the next generation, after the wait
                if code != UNPROTECTED:
                    return code
                break  # the standby was lost again: lead the next generation
        finally:
            run.close()
        generation += 1
    return 0


def run_primary(
    cfg: Config,
    stop: threading.Event,
    *,
    duration: float | None = None,
    epochs: int | None = None,
    stay: bool = True,
) -> int:
    """Boot the guest, pair, pre-copy, then checkpoint until stopped.

    ``duration``: stop after that many seconds of checkpoints.  ``epochs``:
    take exactly that many checkpoints, then hold the guest paused at the
    last one (acknowledged) until stopped.  Exit code 3: fenced.  After a switchover
    this host becomes the secondary, or, without ``stay``, exits (0).
    """
    keys.load(cfg.keys)  # no keys (and not insecure): refuse before anything starts
    private_dir(cfg.state_dir)
    # the arbiter first: unusable, nothing is booted
    generation = current_generation(cfg.arbiter, cfg.pair, cfg.node.name)
    begin(cfg.metrics, cfg.pair.name, cfg.node.name, cfg.state_dir, log=cfg.log)
    backend = backend_for(cfg)
    backend.generation = generation  # the disk server's, until a pairing hands it the current
    current: list[OutputBuffer] = []  # where the guest's outputs go (a later pairing swaps it)
    guest = backend.boot(lambda out: current[0].add(out))  # paused until paired
    event("guest-booted", node=cfg.node.name, kind=cfg.guest.kind, ram=str(guest.ram_path))
    run = None
    sink: OutputSink | None = None
    try:
        sink = backend.sink(guest)
        outputs = OutputBuffer(sink)
        current.append(outputs)
        run = PrimaryRun(cfg, backend, guest, outputs, generation, cfg.link.host)
        # a running domain paired as it runs: it runs on (and its outputs pass) until its
        # first checkpoint; no reason to stop it while the standby answers
        live = cfg.guest.kind == "libvirt" and cfg.libvirt.private_ram
        if live:
            outputs.passing = True
            guest.resume()
        signal.signal(signal.SIGUSR2, lambda signum, frame: run.switch.set() if run else None)

        control.serve({"status": run.status, "switchover": switching(run),
                       "detach": detach_on(stop),
                       "reload-keys": current_rekey(cfg.keys, cfg.node.name).control})  # fmt: skip
        run.write_status()
        try:
            run.engine.handshake(timeout=cfg.link.pair_timeout_s, stop=stop)
        except PairingStopped:
            log.info("stopped before a standby answered: the guest never ran")
            return 0
        if not live:
            guest.resume()
        end = None if duration is None else time.monotonic() + duration
        code = run.protect(stop, end, epochs)
        retry = run.retry
        if code == PAIRING_FAILED:  # run on alone only with this generation's claim
            code = run.claim_unprotected()
        if code == UNPROTECTED:  # the secondary is gone: lead on, and pair when one comes
            run.close()
            run = None
            code = lead(cfg, backend, guest, sink, current, generation + 1, stop, end,
                        retry=retry)  # fmt: skip
    finally:
        if run:
            run.close()
        stop_guest(guest)
        if sink is not None:
            sink.close()
    if code == SWITCHED_OVER and not stay:
        log.info("switched over: leaving")
        return 0
    if code == SWITCHED_OVER:
        log.info("switched over: this host is now the secondary")
        from mirror.ha.secondary import run_secondary  # the roles call each other

        return run_secondary(cfg, stop, bind_wait=10.0)
    return code
