"""Failover decisions as a pure state machine: observations in, decisions out.

No I/O and no clock of its own: the failover driver observes (heartbeat ages on both
paths, whether its own storage writes succeed, claim results, the committed
checkpoint) and carries out the decision.  Every rule of the decision tables
in docs/ARCHITECTURE.md is a transition here; each decision carries one
sentence saying why, which the role logs and tests assert on.  Whether a
claim may be made at all is the claims' rule (mirror/ha/claims.py: may_promote,
may_run_unprotected), which the transitions ask.

Secondary (B), judging the primary (A):
    network silent, storage slot stale  -> A is dead: claim "promote"; won -> promote
    network silent, storage slot fresh  -> interconnect cut: do nothing, alert
    network silent, slot never seen     -> no evidence: do nothing, alert ("unverified")
    both fresh                          -> healthy: nothing
Primary (A), judging the secondary (B):
    heartbeats stop, B's slot fresh     -> interconnect cut: claim "unprotected";
                                           won -> release held outputs, run on; lost -> fence
    heartbeats stop, B's slot stale     -> B dead: claim "unprotected"; won -> run on
    heartbeats stop, slot never seen    -> no evidence: hold outputs, claim nothing
                                           ("holding") until B or its slot is seen
    no storage and no B                 -> isolated: hold outputs; after the fence timeout,
                                           stop the guest (self-fence)

"Never seen": the peer's slot has not been seen to change on this arbiter in this
generation (Observation.peer_slot_seen).  Its silence there is then no evidence: the
two nodes may not share the arbiter at all (each a local folder of its own), and a
claim won at an arbiter the peer does not use proves nothing (docs/ARCHITECTURE.md,
"one primary").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mirror.ha.arbiter import ClaimResult
from mirror.ha.claims import Evidence, Refusal, may_promote, may_run_unprotected

UNSEEN_B = (
    "primary silent on the network, and its storage slot never seen on this arbiter in "
    "this generation: no evidence that it is dead (the arbiter may not be shared)"
)
UNSEEN_A = (
    "interconnect cut, and the secondary's storage slot never seen on this arbiter in this "
    "generation: a claim there would prove nothing (the arbiter may not be shared): "
    "holding outputs, claiming nothing"
)


class Role(Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class State(Enum):
    # secondary
    STANDBY = "standby"
    PARTITIONED = "partitioned"  # interconnect cut, primary alive on storage
    UNVERIFIED = "unverified"  # primary silent, its storage slot never seen: no evidence
    CLAIMING_PROMOTE = "claiming-promote"
    PROMOTED = "promoted"
    CLAIM_LOST = "claim-lost"  # never promotes again in this generation
    # primary
    PROTECTED = "protected"
    CLAIMING_UNPROTECTED = "claiming-unprotected"
    UNPROTECTED = "unprotected"
    ISOLATED = "isolated"
    HOLDING = "holding"  # secondary silent, its storage slot never seen: hold, claim nothing
    FENCED = "fenced"


# The allowed transitions, where the states are defined (a state may also stay).
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STANDBY: frozenset({State.PARTITIONED, State.UNVERIFIED, State.CLAIMING_PROMOTE}),
    State.PARTITIONED: frozenset({State.STANDBY, State.UNVERIFIED, State.CLAIMING_PROMOTE}),
    State.UNVERIFIED: frozenset({State.STANDBY, State.PARTITIONED, State.CLAIMING_PROMOTE}),
    State.CLAIMING_PROMOTE: frozenset(
        {State.PROMOTED, State.CLAIM_LOST, State.STANDBY, State.PARTITIONED, State.UNVERIFIED}
    ),
    State.PROMOTED: frozenset(),
    State.CLAIM_LOST: frozenset(),
    State.PROTECTED: frozenset({State.CLAIMING_UNPROTECTED, State.ISOLATED, State.HOLDING}),
    State.CLAIMING_UNPROTECTED: frozenset(
        {State.UNPROTECTED, State.FENCED, State.ISOLATED, State.PROTECTED, State.HOLDING}
    ),
    State.ISOLATED: frozenset(
        {State.PROTECTED, State.CLAIMING_UNPROTECTED, State.FENCED, State.HOLDING}
    ),
    State.HOLDING: frozenset({State.PROTECTED, State.CLAIMING_UNPROTECTED, State.ISOLATED}),
    State.UNPROTECTED: frozenset(),
    State.FENCED: frozenset(),
}


class Action(Enum):
    NONE = "none"
    ALERT = "alert"
    CLAIM_PROMOTE = "claim-promote"
    PROMOTE = "promote"
    CLAIM_UNPROTECTED = "claim-unprotected"
    RUN_UNPROTECTED = "run-unprotected"
    HOLD_OUTPUTS = "hold-outputs"
    FENCE = "fence"


@dataclass(frozen=True)
class Timeouts:
    silent_after: float = 0.5  # a path with no heartbeat for this long is silent
    fence_after: float = 2.0  # an isolated primary stops its guest after this long


@dataclass(frozen=True)
class Observation:
    now: float
    peer_net_age: float | None  # None: never seen
    peer_storage_age: float | None
    own_storage_ok: bool
    committed: int = 0  # secondary: the checkpoint its image holds
    # The answer to the claim asked for at the last step.  The failover driver always answers
    # on the next step, so None while claiming means the claim could not be made
    # (storage failing): the rules then judge again.
    claim: ClaimResult | None = None
    manual_promote: bool = False  # secondary: an operator ran `mirror failover`
    # Seconds since the current session with the peer began (HELLO answered); None: no
    # session.  The peer's network silence is counted from the later of its last
    # heartbeat and the session's start: at pairing the first heartbeat may not have
    # crossed yet (its socket connects on its own), or the last one seen is an earlier
    # session's, and neither is a silent peer.
    session_age: float | None = None
    # Whether this node has seen the peer's storage slot change on this arbiter in this
    # generation (Arbiter.peer_seen).  Until it has, the peer's storage silence is no
    # evidence: nothing is claimed on it.  False by default: no evidence is assumed.
    peer_slot_seen: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    state: State
    reason: str

    def __str__(self) -> str:
        return self.reason


class FailoverRules:
    def __init__(self, role: Role, timeouts: Timeouts = Timeouts()) -> None:
        self.role = role
        self.timeouts = timeouts
        self.state = State.STANDBY if role is Role.SECONDARY else State.PROTECTED
        self._isolated_since: float | None = None

    def _silent(self, age: float | None) -> bool:
        return age is None or age > self.timeouts.silent_after

    @staticmethod
    def _net_age(obs: Observation) -> float | None:
        """The peer's network silence: since its last heartbeat, or since the session
        began if that is later (or no heartbeat was seen yet)."""
        ages = [a for a in (obs.peer_net_age, obs.session_age) if a is not None]
        return min(ages) if ages else None

    def _evidence(self, obs: Observation) -> Evidence:
        """What the claims' rules (mirror/ha/claims.py) judge from."""
        return Evidence(
            self._silent(self._net_age(obs)),
            obs.own_storage_ok,
            obs.peer_slot_seen,
            self._silent(obs.peer_storage_age),
            obs.committed,
        )

    def _go(self, state: State, action: Action, reason: str) -> Decision:
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise AssertionError(f"transition {self.state.value} -> {state.value} not allowed")
        self.state = state
        return Decision(action, state, reason)

    def step(self, obs: Observation) -> Decision:
        if self.role is Role.SECONDARY:
            return self._secondary(obs)
        return self._primary(obs)

    # -- secondary ------------------------------------------------------------

    def _secondary(self, obs: Observation) -> Decision:
        s = self.state
        if s is State.CLAIMING_PROMOTE and obs.claim is not None:
            if obs.claim.won:
                return self._go(
                    State.PROMOTED,
                    Action.PROMOTE,
                    f"won the promote claim: promoting from checkpoint {obs.committed}",
                )
            return self._go(
                State.CLAIM_LOST,
                Action.NONE,
                f"lost the claim to {obs.claim.holder} ({obs.claim.action}): "
                f"never promoting in this generation",
            )
        if s in (State.PROMOTED, State.CLAIM_LOST):
            return self._go(s, Action.NONE, f"{s.value}: nothing more to decide")
        ev = self._evidence(obs)
        if obs.manual_promote:
            if may_promote(ev, operator=True) is not None:
                return self._go(
                    s,
                    Action.NONE,
                    "operator asked to promote, but there is no committed checkpoint",
                )
            return self._go(
                State.CLAIMING_PROMOTE,
                Action.CLAIM_PROMOTE,
                "operator asked to promote: claiming promote",
            )
        rest = State.STANDBY if s is State.CLAIMING_PROMOTE else s  # a failed claim: judge anew
        why = may_promote(ev)
        if why is Refusal.PEER_ON_NETWORK:
            return self._go(State.STANDBY, Action.NONE, "primary healthy on the network")
        if why is Refusal.NO_STORAGE:
            return self._go(rest, Action.NONE, "cannot reach storage: not promoting")
        if why is Refusal.SLOT_UNSEEN:
            if rest is State.UNVERIFIED:
                return self._go(rest, Action.NONE, UNSEEN_B + ": still not promoting")
            return self._go(State.UNVERIFIED, Action.ALERT, UNSEEN_B + ": not promoting")
        if why is Refusal.PEER_ON_STORAGE:
            if rest is State.PARTITIONED:
                return self._go(rest, Action.NONE, "interconnect still cut: not promoting")
            return self._go(
                State.PARTITIONED,
                Action.ALERT,
                "interconnect cut, primary's storage heartbeat fresh: not promoting",
            )
        if why is Refusal.NO_CHECKPOINT:
            return self._go(
                rest,
                Action.NONE,
                "primary silent on both paths, but no committed checkpoint to promote from",
            )
        return self._go(
            State.CLAIMING_PROMOTE,
            Action.CLAIM_PROMOTE,
            "primary silent on both paths: claiming promote",
        )

    # -- primary ----------------------------------------------------------------

    def _primary(self, obs: Observation) -> Decision:
        s = self.state
        if s is State.CLAIMING_UNPROTECTED and obs.claim is not None:
            if obs.claim.won:
                return self._go(
                    State.UNPROTECTED,
                    Action.RUN_UNPROTECTED,
                    "won the unprotected claim: releasing held outputs, running on alone",
                )
            return self._go(
                State.FENCED,
                Action.FENCE,
                f"lost the claim to {obs.claim.holder} ({obs.claim.action}): "
                f"fencing, releasing nothing",
            )
        if s in (State.UNPROTECTED, State.FENCED):
            return self._go(s, Action.NONE, f"{s.value}: nothing more to decide")
        ev = self._evidence(obs)
        why = may_run_unprotected(ev)
        if why is Refusal.NO_STORAGE:  # and the secondary silent on the network
            if s is not State.ISOLATED:
                self._isolated_since = obs.now
                return self._go(
                    State.ISOLATED,
                    Action.HOLD_OUTPUTS,
                    "isolated (no storage, no secondary): holding outputs",
                )
            since = self._isolated_since if self._isolated_since is not None else obs.now
            if obs.now - since >= self.timeouts.fence_after:
                return self._go(
                    State.FENCED,
                    Action.FENCE,
                    f"isolated for {obs.now - since:.1f} s: fencing (stopping the guest)",
                )
            return self._go(s, Action.HOLD_OUTPUTS, "still isolated: holding outputs")
        if why is Refusal.PEER_ON_NETWORK:
            if s is not State.PROTECTED:
                self._isolated_since = None
                return self._go(State.PROTECTED, Action.NONE, "secondary back: protected")
            return self._go(s, Action.NONE, "secondary healthy")
        if why is Refusal.SLOT_UNSEEN:
            return self._go(State.HOLDING, Action.HOLD_OUTPUTS, UNSEEN_A)
        if not ev.peer_storage_silent:
            return self._go(
                State.CLAIMING_UNPROTECTED,
                Action.CLAIM_UNPROTECTED,
                "interconnect cut, secondary's storage heartbeat fresh: claiming unprotected",
            )
        return self._go(
            State.CLAIMING_UNPROTECTED,
            Action.CLAIM_UNPROTECTED,
            "secondary silent on both paths: claiming unprotected",
        )
