"""One pairing of the primary role (one generation): pair with a standby, pre-copy,
checkpoint every epoch, act on the failover rules' decisions, hand over on a switchover.
The role around it (booting the guest, leading the next generations) is
mirror/ha/primary.py."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mirror.config import Config, ConfigError
from mirror.guests.base import Guest
from mirror.ha.arbiter import ArbiterError
from mirror.ha.backend import Backend
from mirror.ha.rekey import current as current_rekey
from mirror.ha.rekey import keyed
from mirror.ha.role import FailoverDriver, event
from mirror.ha.rules import Action, Role
from mirror.hoststate import process_record, write_json
from mirror.replication import keys, metrics, wire
from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.disk import replicated
from mirror.replication.inflight import ReplicationError
from mirror.replication.link import Endpoint, Link
from mirror.replication.outputs import OutputBuffer
from mirror.replication.pagediff import PAGE_SIZE
from mirror.replication.precopy import Progress

log = logging.getLogger("mirror.ha.role")


class PairingRetry:
    """Pairings that failed after the standby's WELCOME (it refused a pre-copy part or the
    disk copy, or stopped answering during them): the guest runs on unprotected and the
    pairing is tried again after a wait that doubles with each failure (up to ``MAX_S``)."""

    FIRST_S, MAX_S = 1.0, 30.0

    def __init__(self) -> None:
        self.failures = 0
        self.error = ""
        self.until = 0.0  # monotonic time of the next attempt

    def failed(self, error: str) -> float:
        """One more failure; returns the wait before the next attempt."""
        self.failures += 1
        self.error = error
        wait = min(self.MAX_S, self.FIRST_S * 2.0 ** (self.failures - 1))
        self.until = time.monotonic() + wait
        return wait

    def succeeded(self) -> None:
        self.failures, self.error, self.until = 0, "", 0.0

    def waiting(self) -> float:
        return max(0.0, self.until - time.monotonic())

    def status(self) -> dict[str, Any]:
        if not self.failures:
            return {}
        return {"pairing_failures": self.failures, "pairing_error": self.error,
                "pairing_retry_in_s": round(self.waiting(), 1)}  # fmt: skip

def progress_bar(prefix: str) -> Callable[[Progress], None] | None:
    """A progress bar on stderr, only when stderr is a terminal (a log file or journald
    gets no carriage-return text; the pre-copy's end is logged either way)."""
    if not sys.stderr.isatty():
        return None

    def show(p: Progress) -> None:
        width = 30
        frac = p.done_pages / p.total_pages if p.total_pages else 1.0
        bar = "#" * int(frac * width)
        mib = p.done_pages * 4096 >> 20
        rnd = f" round {p.round}" if p.round else ""
        sys.stderr.write(
            f"\r{prefix}{rnd} [{bar:<{width}}] {frac:4.0%} {mib}/{p.total_pages * 4096 >> 20} MiB"
        )
        if p.done_pages >= p.total_pages:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def disk_progress_bar(prefix: str) -> Callable[[int, int], None]:
    """The initial disk copy's progress, as the pre-copy's (only on a terminal)."""
    show = progress_bar(prefix)
    last = [-1]

    def disk(done: int, total: int) -> None:
        if show is not None and done != last[0]:
            last[0] = done
            show(Progress(done // 4096, max(1, total // 4096)))

    return disk


DISK_LOST_GRACE_S = 5.0  # disk stream ended, standby heartbeating: stop after this long
SWITCHED_OVER = 10  # PrimaryRun.protect: handed over, become the secondary
UNPROTECTED = 11  # PrimaryRun.protect: won "unprotected": run on, lead the next generation
PAIRING_FAILED = 12  # PrimaryRun.protect: the pre-copy or disk copy failed: never protected


class PrimaryRun:
    """The primary side of one pairing (one generation): pair with a standby, pre-copy,
    checkpoint, and act on the failover rules' decisions.  The guest is the caller's."""

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
        self.address = address
        self.keys = keys.load(keyed(cfg.keys, cfg.node.name))  # as last reloaded
        self.link = self._link()
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
        self.failover = FailoverDriver(cfg.arbiter, Role.PRIMARY, lambda: self.engine.acked,
                                       generation, pair=cfg.pair.name, node=cfg.node.name)
        self.phase = "pairing"
        self.extra: dict[str, Any] = {}
        self._disk_storage = "local"  # where the disk server last said its I/O goes
        self._output_faults: list[str] = []  # the guest's broken NIC gates, as last reported
        self.switch = threading.Event()  # `mirror switchover` asks to hand over
        self.retry = PairingRetry()  # the lead's, shared by its runs

    def _link(self) -> Link:
        cfg = self.cfg
        return Link.client(
            Endpoint(self.address, cfg.link.data_port, cfg.link.heartbeat_port),
            cfg.node.name,
            keys=self.keys,
            heartbeat_interval=cfg.link.heartbeat_interval_ms / 1000,
            max_pages=len(self.guest.ram) // PAGE_SIZE,
        )

    def relink_if_rekeyed(self) -> None:
        """Not paired: if the configured keys changed (a new peer), connect with the new."""
        if self.keys is None:
            return
        try:
            new = keys.load(keyed(self.cfg.keys, self.cfg.node.name))
        except ConfigError as e:
            log.error("interconnect keys unreadable, keeping the current ones: %s", e)
            return
        self.use_keys(new)

    def use_keys(self, new: keys.LinkKeys | None) -> bool:
        """Keys read again (a pool's new peer, SIGHUP, `mirror keys reload`): if they
        differ, connect again with them; the session goes on (what is in flight is sent
        again, as after any loss), and so does what the peer's heartbeats told.  True:
        changed."""
        if new == self.keys:
            return False
        log.info("the interconnect keys changed (peer key now %s): connecting again",
                 keys.fingerprint(new.peer) if new else "none")  # fmt: skip
        old = self.link
        self.keys = new
        old.close()
        link = self._link()
        link.heartbeats.peer = old.heartbeats.peer
        link.committed[0], link.session[0] = old.committed[0], old.session[0]
        self.link = self.engine.link = link
        return True

    def status(self) -> dict[str, Any]:
        link, engine = self.link, self.engine
        return {
            "role": "primary", "phase": self.phase, "pair": self.cfg.pair.name,
            "node": self.cfg.node.name, "generation": self.generation, **process_record(),
            "ram": str(self.guest.ram_path), "epoch": engine.epoch, "acked": engine.acked,
            "protection": self.protection(),
            "arbiter_unverified": self.failover.unverified()
            if self.phase in ("protected", "frozen", "switching-over") else None,
            "heartbeat_age_s": link.peer.age(),
            "storage_age_s": self.failover.arbiter.peer_age(link.peer.node)
            if link.peer.node else None,
            "summary": engine.stats.summary(self.outputs), "metrics": metrics.served(),
            "throttle": engine.throttle_status(), "early_send": engine.early_status(),
            **self.extra,
            **(self.retry.status() if self.protection() == "unprotected" else {}),
            **({"disk": replicated(self.guest.disk).summary()} if self.guest.disk else {}),
            "peer_node": link.peer.node,
            "output_faults": self.guest.output_faults(),
        }  # fmt: skip

    def protection(self) -> str:
        """The pair's real protection: the failover rules' judgement only while a standby
        holds this run's checkpoints; before that (pairing, pre-copy) and after (a
        promoted or unprotected leader with no standby yet) the guest is unprotected."""
        if self.phase in ("protected", "frozen", "switching-over"):
            return self.failover.protection()
        if self.phase in ("fenced", "stopped", "switched-over"):
            return self.phase
        return "unprotected"

    def write_status(self) -> None:
        st = self.status()
        write_json(self.cfg.state_dir / "status.json", st)
        m, protection = self.engine.metrics, st["protection"]
        m.role.state("primary")
        m.generation.set(self.generation)
        m.outputs_held.set(self.outputs.held)
        if protection in metrics.STATES:
            m.state.state(protection)
        if protection in ("stopped", "switched-over", "fenced"):
            m.guest_here(None)
        else:
            m.guest_here(protection == "protected")
        disk = st.get("disk")
        if isinstance(disk, dict) and disk.get("storage") in ("local", "remote", "suspended"):
            self.disk_storage_changed(disk, st.get("peer_node"))
        self.output_faults_changed(st["output_faults"])

    def output_faults_changed(self, faults: list[str]) -> None:
        """A NIC's gate broke (or was found whole again): the metric, and an event."""
        self.engine.metrics.nic_gates_broken.set(len(faults))
        if faults == self._output_faults:
            return
        self._output_faults = faults
        if faults:
            event("nic-gate-broken", logging.ERROR, node=self.cfg.node.name, faults=faults)
        else:
            event("nic-gates-holding", node=self.cfg.node.name)

    def disk_storage_changed(self, disk: dict[str, Any], peer: str | None) -> None:
        """The disk server switched its path (local image failed, back, or suspended):
        an event, and the metrics."""
        m, storage = self.engine.metrics, disk["storage"]
        m.disk_storage.state(storage)
        m.disk_failovers.set(disk.get("failovers", 0))
        m.disk_dirty_local.set(disk.get("dirty_local", 0))
        if storage == self._disk_storage:
            return
        self._disk_storage = storage
        fields = {"node": self.cfg.node.name, "storage": storage, "peer": peer,
                  "error": disk.get("storage_error"),
                  "dirty_blocks": disk.get("dirty_local")}  # fmt: skip
        if storage == "remote":
            event("disk-storage-remote", logging.WARNING, **fields)
        elif storage == "suspended":
            event("disk-storage-suspended", logging.ERROR, **fields)
        elif disk.get("switchbacks"):
            event("disk-storage-local", **fields)

    def protect(self, stop: threading.Event, end: float | None, epochs: int | None) -> int:
        """After the handshake: pre-copy, then checkpoints until stopped, the end, or
        ``epochs`` checkpoints; then as the failover rules decide.  Exit code 3: fenced."""
        cfg, engine, outputs, failover = self.cfg, self.engine, self.outputs, self.failover
        rekey = current_rekey(cfg.keys, cfg.node.name)
        self.phase = "precopy"
        self.write_status()  # (`mirror status` shows the copy under way)
        paired_at = time.monotonic()  # the standby answered HELLO just now
        try:
            if self.guest.disk is not None:
                mode, blocks = engine.start_disk(
                    self.address, cfg.disk.port, disk_progress_bar("disk copy"), self.keys
                )
                mib = self.guest.disk.spec.size >> 20
                event("disk-synced", node=cfg.node.name, mib=mib, mode=mode,
                      resync_blocks=blocks)  # fmt: skip
                paired_at = time.monotonic()
            engine.precopy(progress_bar("pre-copy"))
        except ReplicationError as e:  # the standby refused or went: nothing it holds is ours
            wait = self.retry.failed(str(e))
            self.phase = "unprotected"
            # the standby stands down (a BYE) rather than judge this session's end a cut
            with contextlib.suppress(ConnectionError):  # no connection: nobody to tell
                self.link.send(wire.Bye(engine.session, cfg.node.name, "the pairing failed"))
            event("pairing-failed", node=cfg.node.name, generation=self.generation,
                  reason=str(e), failures=self.retry.failures, retry_in_s=wait)  # fmt: skip
            return PAIRING_FAILED
        self.retry.succeeded()
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
            # the session began with the standby's WELCOME: before its first heartbeat
            # crosses, the secondary is not silent (the failover rules')
            if rekey.due():  # SIGHUP or `mirror keys reload`: between two checkpoints
                rekey.apply(self.use_keys)
            link = self.link
            d = failover.tick(
                link.peer.node or None, link.peer.age(), session_age=now - paired_at
            )
            if d is not None and d.action in (Action.RUN_UNPROTECTED, Action.FENCE):
                verdict.append(d.action)
                return True
            if engine.disk_lost is not None:
                self._disk_stream_lost(engine.disk_lost, now)
            return self.switch.is_set() or stop.is_set() or (end is not None and now >= end)

        while True:
            try:
                engine.run(should_stop, epochs=epochs)
            except Exception:
                # QMP sees the end before the process is gone: give it a moment to exit
                deadline = time.monotonic() + 5
                while self.guest.alive and time.monotonic() < deadline:
                    time.sleep(0.02)
                if self.guest.alive or self.guest.end_reason() != "shutdown":
                    raise  # a guest that died otherwise: its standby goes on (failover)
                return self._guest_shut_down()
            if not (self.switch.is_set() and not verdict):
                break
            if self._hand_over():
                return SWITCHED_OVER
            self.switch.clear()  # it failed: the guest runs on here, still protected
            self.phase = "protected"
        if verdict and verdict[0] is Action.FENCE:
            self.phase = "fenced"
            engine.metrics.fenced.inc()
            self.guest.stop()  # releases nothing: what it held dies with it
            event("fenced", node=cfg.node.name, held=outputs.held)
            return 3
        if verdict:
            self.phase = "unprotected"
            engine.metrics.unprotected.inc()
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
            with contextlib.suppress(ConnectionError):  # no connection: nobody to tell
                self.link.send(wire.Bye(engine.session, cfg.node.name, "stopped by its operator"))
            time.sleep(0.05)  # let it leave before the socket closes
        return 0

    def claim_unprotected(self) -> int:
        """The first pairing failed after the guest was resumed (its outputs held): run on
        unprotected only with this generation's "unprotected" claim (UNPROTECTED); a claim
        held by the standby stops the guest, as a fenced primary (3)."""
        node = self.cfg.node.name
        try:
            won = self.failover.claims.unprotected(self.generation)
        except ArbiterError as e:
            raise ReplicationError(
                f"the pairing failed ({self.retry.error}) and the arbiter cannot be claimed "
                f"to run on unprotected: {e}"
            ) from e
        if not won.won:
            self.phase = "fenced"
            self.guest.stop()
            event("fenced", node=node, held=self.outputs.held,
                  reason=f"the pairing failed and {won.holder} holds generation "
                  f"{self.generation} ({won.action})")  # fmt: skip
            return 3
        self.engine.metrics.unprotected.inc()
        event("unprotected", node=node, released=self.outputs.go_unprotected(),
              reason="the pairing failed")  # fmt: skip
        return UNPROTECTED

    def _guest_shut_down(self) -> int:
        """The guest powered itself off: no host failed, so its standby must not bring
        it back.  Tell the standby (a BYE: it stands down, not promoting), release what
        the guest said before it went (no copy of it will ever run again), exit 0."""
        self.phase = "stopped"
        self.extra = {**self.extra, "guest_ended": "shutdown"}  # the host agent reads it
        released = self.outputs.go_unprotected()
        with contextlib.suppress(ConnectionError):
            self.link.send(wire.Bye(self.engine.session, self.cfg.node.name,
                                    "the guest shut itself down"))  # fmt: skip
        time.sleep(0.05)  # let it leave before the socket closes
        event("guest-shutdown", node=self.cfg.node.name, released=released,
              checkpoint=self.engine.acked)  # fmt: skip
        self.write_status()
        return 0

    def _disk_stream_lost(self, lost: tuple[str, float], now: float) -> None:
        """The disk's stream to the standby ended: no checkpoint can commit, outputs are
        held.  A standby that is gone is judged so by the failover rules (heartbeats silent,
        the unprotected claim won): the guest runs on unprotected, and a returning
        standby is resynced.  One still heartbeating after ``DISK_LOST_GRACE_S`` (its
        disk stream broke, not its host): stop, so that it goes on from its last
        checkpoint, memory and disk, rather than every output being held from now on."""
        why, since = lost
        if now - since > DISK_LOST_GRACE_S + self.failover.timeouts.silent_after:
            event("disk-stream-lost-stopping", logging.ERROR, node=self.cfg.node.name,
                  reason=why, lost_for_s=round(now - since, 2), checkpoint=self.engine.acked,
                  peer=self.link.peer.node)  # fmt: skip
            raise ReplicationError(
                f"the guest's disk is no longer replicated ({why}) and the standby "
                f"{self.link.peer.node or self.address} still answers: stopping; the standby "
                f"holds the last committed checkpoint (checkpoint {self.engine.acked})"
            )

    def _hand_over(self) -> bool:
        """Planned switchover: a last checkpoint with the guest left paused; once it is
        acknowledged every output is released, and the standby goes on from exactly
        there.  True: handed over (the caller becomes the secondary).  False: the
        standby did not take it, and the guest runs on here (nothing the standby says
        stops it)."""
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
            event("switchover-failed", node=self.cfg.node.name, reason="no ack of the last "
                  "checkpoint: the guest runs on here")  # fmt: skip
            return False
        with contextlib.suppress(ConnectionError):  # not sent: no answer, it fails below
            self.link.send(wire.Handover(engine.session, self.cfg.node.name, engine.epoch))
        reply: wire.Message | None = None
        deadline = time.monotonic() + 10
        answer = wire.Ack(engine.session, engine.epoch, 0)
        while time.monotonic() < deadline and reply != answer:
            try:
                reply = self.link.recv(max(0.0, deadline - time.monotonic()))
            except wire.WireError:
                continue
            if (
                isinstance(reply, wire.Reject)
                and reply.session == engine.session
                and (reply.answers == wire.Kind.HANDOVER)
            ):
                break  # its answer: refused
        if reply != answer:
            self.guest.resume()
            event("switchover-failed", node=self.cfg.node.name,
                  reason=f"the standby answered {reply}: the guest runs on here")  # fmt: skip
            return False
        self.guest.stop()  # the standby has it now; this copy never runs again
        self.phase = "switched-over"
        event("switched-over", node=self.cfg.node.name, checkpoint=engine.epoch)
        return True

    def close(self) -> None:
        self.engine.close()
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
