"""The secondary role: hold the standby (image, committed state, a ready guest), judge
the primary through the failover rules, and promote when they decide so."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from mirror.config import Config
from mirror.guests.base import GuestOutput
from mirror.ha import control
from mirror.ha.backend import Backend, backend_for
from mirror.ha.primary import lead, stop_guest
from mirror.ha.primaryrun import SWITCHED_OVER
from mirror.ha.rekey import current as current_rekey
from mirror.ha.rekey import keyed
from mirror.ha.role import FailoverDriver, begin, current_generation, event
from mirror.ha.rules import Action, Role
from mirror.replication.outputs import OutputBuffer
from mirror.replication.standby import Standby

log = logging.getLogger("mirror.ha.role")


def run_secondary(cfg: Config, stop: threading.Event, *, bind_wait: float = 0.0) -> int:
    """``bind_wait``: seconds to wait for the interconnect ports (after a switchover their
    old holder may still be letting go); 0: a port in use is an error at once."""
    begin(cfg.metrics, cfg.pair.name, cfg.node.name, cfg.state_dir, log=cfg.log)
    backend = backend_for(cfg)
    node = cfg.node.name
    standby = Standby(
        cfg.link, keyed(cfg.keys, cfg.node.name), pair=cfg.pair.name, node=node,
        generation=current_generation(cfg.arbiter, cfg.pair, node), ram_mib=cfg.guest.ram_mib,
        state_dir=cfg.state_dir, silent_after_ms=cfg.arbiter.silent_after_ms,
        fingerprint=backend.fingerprint(),
    )  # fmt: skip
    standby.bind_wait = bind_wait
    # the arbiter's, at each HELLO
    standby.generation_now = lambda: current_generation(cfg.arbiter, cfg.pair, node)
    backend.generation = standby.generation  # the disk replica's (each HELLO hands the current)
    try:
        # the ready standby: a guest waiting for its state (for QEMU, on the image)
        ready = backend.ready(standby.image.path)
        standby.disk = getattr(ready, "disk", None)
        failover = FailoverDriver(cfg.arbiter, Role.SECONDARY, lambda: standby.committed,
                                  standby.generation, pair=cfg.pair.name, node=node)
    except BaseException:
        standby.close()
        raise
    promote = False
    crashed = True
    standby.extra_status = lambda: {
        "protection": failover.protection() if standby.primary else failover.rules.state.value,
        "arbiter_unverified": failover.unverified() if standby.primary else None,
        "storage_age_s": failover.arbiter.peer_age(standby.primary) if standby.primary else None,
        # the ready standby's NIC gates (a libvirt domain's): promotion releases through them
        "output_faults": ready.output_faults() if hasattr(ready, "output_faults") else [],
    }
    manual = threading.Event()  # `mirror failover` (the control socket; SIGUSR1 from a parent)
    cause = ["failure"]  # why a promotion comes: the primary died, unless an operator asked
    signal.signal(signal.SIGUSR1, lambda signum, frame: manual.set())

    def failover_now() -> dict[str, Any]:
        manual.set()
        return {"accepted": True}

    rekey = current_rekey(cfg.keys, cfg.node.name)
    control.serve({"status": standby.status, "failover": failover_now,
                   "reload-keys": rekey.control})  # fmt: skip

    def tick() -> bool:
        nonlocal promote
        if rekey.due():  # SIGHUP or `mirror keys reload`
            rekey.apply(lambda new: standby.use_keys(new, stop))
        link = standby.link
        if link is None or standby.primary is None:
            return False  # never paired: nothing to judge
        failover.generation = standby.generation  # a HELLO may have moved it on
        paired = standby.paired_at
        d = failover.tick(
            standby.primary,
            link.peer.age(),
            standby.committed,
            manual_promote=manual.is_set() or standby.handover,
            session_age=None if paired is None else time.monotonic() - paired,
        )
        if d is not None and d.action is Action.CLAIM_PROMOTE:
            if manual.is_set():
                cause[0] = "operator"
            manual.clear()
        promote = d is not None and d.action is Action.PROMOTE
        return promote

    code = 0
    try:
        standby.serve(stop, tick)
        crashed = False
        if promote:
            failover.metrics.promoted("switchover" if standby.handover else cause[0])
            code = run_promoted(cfg, backend, standby, failover, stop, ready)
    finally:
        if not promote:
            backend.discard(ready)
        failover.close()
        # An unforeseen error never deletes a committed checkpoint: it may be the only
        # copy of the guest left.  The image stays (and blocks a restart, which says so).
        keep = promote or (crashed and standby.committed > 0)
        if keep and not promote:
            event(
                "standby-image-kept",
                node=cfg.node.name,
                image=str(standby.image.path),
                committed=standby.committed,
            )
        standby.close(remove_image=not keep, keep_state=keep and not promote)
    if code == SWITCHED_OVER:  # handed over again (`mirror switchover` of the promoted guest)
        log.info("switched over: this host is the secondary again")
        return run_secondary(cfg, stop, bind_wait=10.0)
    return code


def run_promoted(
    cfg: Config,
    backend: Backend,
    standby: Standby,
    failover: FailoverDriver,
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
        observer_via_port=getattr(sink, "local_port", None),
    )
    failover.close()
    promoted = {"promoted_from": committed, "replayed_outputs": len(replay)}

    def note() -> dict[str, Any]:
        return {**promoted, "failover_ms": (first[0] - last_heartbeat) * 1000 if first else None}

    try:
        return lead(cfg, backend, guest, sink, current, failover.generation + 1, stop, None, note)
    finally:
        stop_guest(guest)
        sink.close()
