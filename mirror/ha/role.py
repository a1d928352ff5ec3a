"""What both roles of a host's daemon share: structured events, signals, the storage
heartbeat and the failover driver.  The roles are mirror/ha/primary.py
and mirror/ha/secondary.py.

The failover rules decide (mirror/ha/rules.py); the failover driver observes and acts.
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
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mirror.config import ArbiterConfig, LogConfig, MetricsConfig, PairConfig, require_arbiter
from mirror.ha import claims, logsink
from mirror.ha.arbiter import Arbiter, ArbiterError, ClaimResult, DirectoryArbiter
from mirror.ha.cleanup import clean_start
from mirror.ha.rules import (
    Action,
    Decision,
    FailoverRules,
    Observation,
    Role,
    State,
    Timeouts,
)
from mirror.hoststate import process_record, read_json, write_json
from mirror.replication import metrics

log = logging.getLogger("mirror.ha.role")
# decisions an operator must hear of: a cut interconnect, an isolated or fenced primary
ALERTING = frozenset({Action.ALERT, Action.HOLD_OUTPUTS, Action.FENCE})


# Events an operator must act on (the pair lost its protection or cannot keep it): logged
# at WARNING.  Every other event is routine and logged at INFO.
WARNING_EVENTS = frozenset(
    {
        "guest-died",
        "re-pairing-refused",
        "pairing-failed",
        "fenced",
        "unprotected",
        "switchover-failed",
        "storage-heartbeat-failing",
        "claim-failed",
    }
)


def event(name: str, level: int | None = None, **fields: Any) -> None:
    """A structured event: one JSON object on one log line (at WARNING when it is in
    WARNING_EVENTS or ``level`` says so, else INFO).  With ``--log-json`` its fields
    are the log line's own (JsonFormatter)."""
    obj = {"event": name, **fields}
    if level is None:
        level = logging.WARNING if name in WARNING_EVENTS else logging.INFO
    log.log(level, "%s", json.dumps(obj, default=str), extra={"event_fields": obj})


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald or a log shipper: time (UTC, ISO 8601),
    level, logger and message; an event's fields are merged in (``event`` names it)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "event_fields", None)
        if isinstance(fields, dict):
            obj.update(fields)
        else:
            obj["message"] = record.getMessage()
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(verbose: bool = False, as_json: bool = False) -> None:
    """Log to stderr: text lines, or with ``as_json`` one JSON object per line."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


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
            except Exception as e:  # ArbiterError; anything else must not end the beat either
                if not self._failing:
                    event("storage-heartbeat-failing", error=str(e))
                self._failing = True
            self.halt.wait(self.interval)

    def ok(self, within: float) -> bool:
        return self.last_ok is not None and time.monotonic() - self.last_ok <= within


class FailoverDriver:
    """One role's failover rules with the arbiter: observe, decide, claim (through
    mirror/ha/claims.py)."""

    def __init__(
        self,
        arbiter: ArbiterConfig,
        role: Role,
        epoch: Callable[[], int],
        generation: int,
        *,
        pair: str,
        node: str,
    ) -> None:
        a = arbiter
        self.generation = generation
        self.arbiter_cfg, self.node = arbiter, node
        self.arbiter = make_arbiter(arbiter, pair, node)
        self.claims = claims.Claims(self.arbiter, node)
        self.timeouts = Timeouts(a.silent_after_ms / 1000, a.fence_after_ms / 1000)
        self.rules = FailoverRules(role, self.timeouts)
        self.beat = StorageBeat(
            self.arbiter,
            a.heartbeat_interval_ms / 1000,
            lambda: self.role_name,
            lambda: self.generation,
            epoch,
        )
        self.role_name = role.value
        self._claim: ClaimResult | None = None
        self._claim_error = ""  # the last claim failure, logged once (claims retry every tick)
        self._next = 0.0
        self._logged: tuple[State, Action] = (self.rules.state, Action.NONE)
        self.peer_slot_seen = False  # the peer's slot seen changing here in this generation
        self.metrics = metrics.Metrics.of(pair, node)
        self.beat.start()

    def tick(
        self,
        peer: str | None,
        net_age: float | None,
        committed: int = 0,
        manual_promote: bool = False,
        session_age: float | None = None,
    ) -> Decision | None:
        """Observe and decide, at most every 20 ms; None when it is not time yet.
        ``session_age``: seconds since the session with ``peer`` began."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + 0.02
        storage_age = self.arbiter.peer_age(peer) if peer else None
        self.peer_slot_seen = bool(peer) and self.arbiter.peer_seen(str(peer), self.generation)
        obs = Observation(
            now,
            net_age,
            storage_age,
            self.beat.ok(self.timeouts.silent_after),
            committed,
            self._claim,
            manual_promote,
            session_age,
            self.peer_slot_seen,
        )
        self._claim = None
        d = self.rules.step(obs)
        self.metrics.ages(net_age, storage_age)
        self.metrics.storage_ok.set(1 if obs.own_storage_ok else 0)
        self.metrics.slot_seen(self.peer_slot_seen if peer else None)
        self.metrics.state.state(self.protection())
        if (d.state, d.action) != self._logged and (
            d.action is not Action.NONE or d.state is not self._logged[0]
        ):  # each change once: an isolated primary holds outputs at every tick
            self._logged = (d.state, d.action)
            event(
                "decision",
                logging.WARNING if d.action in ALERTING else logging.INFO,
                node=self.node,
                action=d.action.value,
                state=d.state.value,
                reason=d.reason,
                net_age=net_age,
                storage_age=storage_age,
            )
        if d.action in (Action.CLAIM_PROMOTE, Action.CLAIM_UNPROTECTED):
            kind = claims.PROMOTE if d.action is Action.CLAIM_PROMOTE else claims.UNPROTECTED
            try:
                self._claim = self.claims.claim(self.generation, kind)
                self._claim_error = ""
            except ArbiterError as e:  # storage failing: no claim made; judged again next tick
                if str(e) != self._claim_error:
                    event("claim-failed", error=str(e))
                self._claim_error = str(e)
        return d

    def protection(self) -> str:
        """The failover rules' state, except "unverified" while it judges the pair healthy
        (protected, standby) but has not seen the peer's storage slot here yet."""
        state = self.rules.state
        if not self.peer_slot_seen and state in (State.PROTECTED, State.STANDBY):
            return State.UNVERIFIED.value
        return state.value

    def unverified(self) -> str | None:
        """Why the pair is not protected by this arbiter yet (None: it is): the peer's
        storage slot has not been seen here in this generation, so neither node may act on
        the other's silence (status.json "arbiter_unverified")."""
        if self.peer_slot_seen:
            return None
        a = self.arbiter_cfg
        where = f"etcd {a.etcd}" if a.etcd else str(a.dir)
        return (f"peer's storage slot never seen on this arbiter ({where}) in generation "
                f"{self.generation}: failover is disabled until it is (is the arbiter "
                f"shared by both hosts?)")

    def close(self) -> None:
        self.metrics.slot_seen(None)
        self.beat.halt.set()
        self.beat.join(2)


def mark_stopped(state_dir: Path, pair: str, node: str, code: int | None) -> None:
    """The last status of a role that ends (not one that is killed): its phase is
    "stopped", so that no earlier phase reads as current.  ``code``: its exit code
    (None: it ended by an exception)."""
    path = state_dir / "status.json"
    try:
        st = dict(read_json(path))
    except (OSError, ValueError, TypeError):
        return
    if st.get("pid") != os.getpid():
        return  # not this process's report (it never wrote one)
    st.update(phase="stopped", protection="stopped", exit_code=code, **process_record())
    m = metrics.Metrics.of(pair, node)
    m.state.state("stopped")
    m.guest_here(None)
    try:
        write_json(path, st)
    except OSError as e:
        log.error("cannot write %s: %s", path, e)


def begin(served: MetricsConfig, pair: str, node: str, state_dir: Path, *,
          log: LogConfig | None = None) -> None:
    """A role starts: serve its metrics (``served``), send its log lines where ``log``
    says (mirror/ha/logsink.py), remove what a dead earlier run of this pair and node
    left behind (mirror/ha/cleanup.py)."""
    start_metrics(served)
    if log is not None:
        logsink.attach(log, pair, node)
    removed = clean_start(pair, node, state_dir)
    if removed:
        event("cleaned-leftovers", node=node, removed=removed)


def start_metrics(served: MetricsConfig) -> str | None:
    """Serve this role's Prometheus metrics where ``[metrics] listen`` says ("HOST:PORT",
    also in status.json as "metrics"); None when it is "".  A taken address is an
    error that says so (RuntimeError)."""
    addr = served.address()
    if served.socket:  # for the host agent that runs this role
        try:
            metrics.serve_socket(served.socket)
        except OSError as e:
            raise RuntimeError(f"cannot serve metrics on {served.socket}: "
                               f"{e.strerror or e}") from None
    if addr is None:
        return None
    try:
        host, port = metrics.serve(*addr)
    except OSError as e:
        raise RuntimeError(
            f"cannot serve metrics on {served.listen}: {e.strerror or e}; set "
            f'[metrics] listen to a free HOST:PORT, or "" to serve none'
        ) from None
    return f"{host}:{port}"


def make_arbiter(arbiter: ArbiterConfig, pair: str, node: str, *, prepare: bool = False) -> Arbiter:
    """``pair``'s arbiter as ``node`` sees it: the shared directory (the default), or etcd
    when ``arbiter.etcd`` names one (slots and claims as keys; claims are transactions).
    ``prepare``: check the directory now (ArbiterError naming it if it is missing) and
    create the pair's directory in it; a role does so once, at start.  A configuration
    that names neither is a ConfigError (there is no default arbiter)."""
    require_arbiter(arbiter, f"pair {pair}'s configuration")
    if arbiter.etcd:
        from mirror.ha.etcd import Etcd  # the pool's client; no dependency otherwise
        from mirror.ha.etcd_arbiter import EtcdArbiter

        # short: a storage path that does not answer within a heartbeat or two is down
        etcd = Etcd(arbiter.etcd, timeout=max(0.2, 2 * arbiter.heartbeat_interval_ms / 1000))
        return EtcdArbiter(etcd, pair, node, prefix=arbiter.etcd_prefix)
    return DirectoryArbiter(Path(arbiter.dir), pair, node, prepare=prepare)


def current_generation(arbiter: ArbiterConfig, pair: PairConfig, node: str) -> int:
    """The pair's generation: the configured one, or a later one a promotion recorded.
    Checks the arbiter (a role calls it at start): ArbiterError if it is unusable."""
    return claims.Claims(make_arbiter(arbiter, pair.name, node, prepare=True), node).generation(
        pair.generation
    )
