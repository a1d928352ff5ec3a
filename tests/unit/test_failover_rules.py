"""Every row of the failover decision tables, on a fixed clock."""

from __future__ import annotations

import pytest

from mirror.ha.arbiter import ClaimResult
from mirror.ha.rules import TRANSITIONS, Action, FailoverRules, Observation, Role, State, Timeouts

WON = ClaimResult(True, "me", "x")
LOST = ClaimResult(False, "other", "promote")


def obs(
    now: float = 10.0,
    net: float | None = 0.1,
    storage: float | None = 0.1,
    own: bool = True,
    committed: int = 5,
    claim: ClaimResult | None = None,
    seen: bool = True,
) -> Observation:
    """``seen``: the peer's storage slot has been seen on the arbiter in this generation
    (the tables' rows assume it; the "never seen" rows below say otherwise)."""
    return Observation(now, net, storage, own, committed, claim, peer_slot_seen=seen)


SEEN = {"peer_slot_seen": True}  # for the rows that build an Observation whole


def secondary() -> FailoverRules:
    return FailoverRules(Role.SECONDARY, Timeouts(silent_after=0.5, fence_after=2.0))


def primary() -> FailoverRules:
    return FailoverRules(Role.PRIMARY, Timeouts(silent_after=0.5, fence_after=2.0))


# ---- the secondary's table --------------------------------------------------


def test_b_primary_dead_claims_then_promotes():
    c = secondary()
    d = c.step(obs(net=0.6, storage=0.7))
    assert (d.action, d.state) == (Action.CLAIM_PROMOTE, State.CLAIMING_PROMOTE)
    assert str(d) == "primary silent on both paths: claiming promote"
    d = c.step(obs(net=0.7, storage=0.8))  # the claim could not be made: asked again
    assert (d.action, d.state) == (Action.CLAIM_PROMOTE, State.CLAIMING_PROMOTE)
    d = c.step(obs(net=0.7, storage=0.8, claim=WON))
    assert (d.action, d.state) == (Action.PROMOTE, State.PROMOTED)
    assert str(d) == "won the promote claim: promoting from checkpoint 5"


def test_b_interconnect_cut_alerts_once_and_never_promotes():
    c = secondary()
    d = c.step(obs(net=0.6, storage=0.1))
    assert (d.action, d.state) == (Action.ALERT, State.PARTITIONED)
    for t in range(20):
        d = c.step(obs(now=11 + t, net=5.0 + t, storage=0.1))
        assert d.action is Action.NONE and d.state is State.PARTITIONED
    assert c.step(obs(net=0.1, storage=0.1)).state is State.STANDBY  # healed


def test_b_both_fresh_is_healthy():
    c = secondary()
    d = c.step(obs())
    assert (d.action, d.state, str(d)) == (
        Action.NONE,
        State.STANDBY,
        "primary healthy on the network",
    )


def test_b_network_fresh_storage_stale_is_still_healthy():
    assert secondary().step(obs(net=0.1, storage=9.0)).action is Action.NONE


@pytest.mark.parametrize(
    "net,storage,acts", [(0.5, 0.6, False), (0.51, 0.6, True), (None, 0.6, True)]
)
def test_b_silent_means_strictly_more_than_the_threshold(net, storage, acts):
    d = secondary().step(obs(net=net, storage=storage))
    assert (d.action is Action.CLAIM_PROMOTE) == acts


def test_b_lost_claim_never_promotes():
    c = secondary()
    c.step(obs(net=1, storage=1))
    d = c.step(obs(net=1, storage=1, claim=LOST))
    assert (d.action, d.state) == (Action.NONE, State.CLAIM_LOST)
    assert "lost the claim to other (promote)" in str(d)
    assert c.step(obs(net=9, storage=9)).action is Action.NONE


def test_b_without_a_committed_checkpoint_does_not_promote():
    d = secondary().step(obs(net=None, storage=0.9, committed=0))
    assert d.action is Action.NONE and "no committed checkpoint" in str(d)


def test_b_without_storage_does_not_promote():
    d = secondary().step(obs(net=1.0, storage=1.0, own=False))
    assert d.action is Action.NONE and "cannot reach storage" in str(d)


# ---- the primary's table ----------------------------------------------------


def test_a_interconnect_cut_wins_unprotected_and_runs_on():
    c = primary()
    d = c.step(obs(net=0.6, storage=0.1))
    assert (d.action, d.state) == (Action.CLAIM_UNPROTECTED, State.CLAIMING_UNPROTECTED)
    assert "interconnect cut, secondary's storage heartbeat fresh" in str(d)
    d = c.step(obs(net=0.7, storage=0.1, claim=WON))
    assert (d.action, d.state) == (Action.RUN_UNPROTECTED, State.UNPROTECTED)


def test_a_interconnect_cut_loses_claim_and_fences():
    c = primary()
    c.step(obs(net=0.6, storage=0.1))
    d = c.step(obs(net=0.7, storage=0.1, claim=LOST))
    assert (d.action, d.state) == (Action.FENCE, State.FENCED)
    assert "fencing, releasing nothing" in str(d)


def test_a_secondary_dead_wins_unprotected():
    c = primary()
    d = c.step(obs(net=0.6, storage=3.0))
    assert d.action is Action.CLAIM_UNPROTECTED
    assert str(d) == "secondary silent on both paths: claiming unprotected"
    assert c.step(obs(net=0.6, storage=3.0, claim=WON)).action is Action.RUN_UNPROTECTED


def test_a_isolated_holds_then_fences_after_the_timeout():
    c = primary()
    d = c.step(obs(now=100.0, net=0.6, storage=None, own=False))
    assert (d.action, d.state) == (Action.HOLD_OUTPUTS, State.ISOLATED)
    assert c.step(obs(now=101.9, net=2.5, own=False)).action is Action.HOLD_OUTPUTS
    d = c.step(obs(now=102.0, net=2.6, own=False))
    assert (d.action, d.state) == (Action.FENCE, State.FENCED)


def test_a_isolated_then_secondary_back_is_protected_again():
    c = primary()
    c.step(obs(now=100.0, net=0.6, own=False))
    d = c.step(obs(now=101.0, net=0.1, own=True))
    assert (d.action, d.state) == (Action.NONE, State.PROTECTED)
    # and the isolation clock starts over next time
    c.step(obs(now=200.0, net=0.6, own=False))
    assert c.step(obs(now=201.0, net=1.6, own=False)).action is Action.HOLD_OUTPUTS


def test_a_isolated_then_storage_back_claims_unprotected():
    c = primary()
    c.step(obs(now=100.0, net=0.6, own=False))
    assert c.step(obs(now=100.5, net=1.1, storage=0.1, own=True)).action is Action.CLAIM_UNPROTECTED


def test_a_healthy_does_nothing():
    d = primary().step(obs())
    assert (d.action, d.state, str(d)) == (Action.NONE, State.PROTECTED, "secondary healthy")


def test_terminal_states_have_no_way_out():
    assert not TRANSITIONS[State.PROMOTED] and not TRANSITIONS[State.FENCED]
    assert not TRANSITIONS[State.UNPROTECTED] and not TRANSITIONS[State.CLAIM_LOST]


def test_b_operator_promotion_still_goes_through_the_claim():
    c = secondary()
    d = c.step(Observation(10.0, 0.1, 0.1, True, 5, None, manual_promote=True, **SEEN))
    assert (d.action, str(d)) == (
        Action.CLAIM_PROMOTE,
        "operator asked to promote: claiming promote",
    )
    d = c.step(obs(claim=LOST))  # the primary already holds this generation
    assert (d.action, d.state) == (Action.NONE, State.CLAIM_LOST)


def test_b_operator_promotion_needs_a_committed_checkpoint():
    d = secondary().step(Observation(10.0, 0.1, 0.1, True, 0, None, manual_promote=True, **SEEN))
    assert d.action is Action.NONE and "no committed checkpoint" in str(d)


def test_a_claim_that_fails_with_storage_gone_becomes_isolation_then_fence():
    """Storage failed just before the network went silent: the claim cannot be made."""
    c = primary()
    d = c.step(obs(now=100.0, net=0.6, storage=0.4, own=True))
    assert d.action is Action.CLAIM_UNPROTECTED
    d = c.step(obs(now=100.1, net=0.7, storage=0.5, own=False))  # no answer: storage gone
    assert (d.action, d.state) == (Action.HOLD_OUTPUTS, State.ISOLATED)
    d = c.step(obs(now=102.1, net=2.7, own=False))
    assert (d.action, d.state) == (Action.FENCE, State.FENCED)


def test_a_claim_that_fails_with_storage_fine_is_asked_again():
    c = primary()
    c.step(obs(net=0.6, storage=0.1))
    d = c.step(obs(net=0.7, storage=0.1))
    assert (d.action, d.state) == (Action.CLAIM_UNPROTECTED, State.CLAIMING_UNPROTECTED)
    d = c.step(obs(net=0.1, storage=0.1))  # the secondary came back meanwhile
    assert (d.action, d.state) == (Action.NONE, State.PROTECTED)


def test_b_claim_that_fails_with_storage_gone_stands_by():
    c = secondary()
    c.step(obs(net=1, storage=1))
    d = c.step(obs(net=1, storage=1, own=False))
    assert (d.action, d.state) == (Action.NONE, State.STANDBY)
    assert "cannot reach storage" in str(d)


# ---- pairing: the session's start counts as a sign of life -------------------


@pytest.mark.parametrize("stale_net", [None, 42.0])
def test_b_no_false_partition_alert_at_pairing(stale_net):
    """The secondary's first judgement comes right after HELLO, when the primary's first
    heartbeat may not have crossed yet (the heartbeat socket connects on its own; one
    run in 20 it was later than HELLO) or the last one seen is an earlier session's,
    while the primary's storage slot is fresh: that is no interconnect cut."""
    c = secondary()
    d = c.step(Observation(100.0, stale_net, 0.05, True, 0, None, session_age=0.001, **SEEN))
    assert (d.action, d.state) == (Action.NONE, State.STANDBY)
    assert "interconnect cut" not in str(d)
    d = c.step(Observation(100.4, stale_net, 0.05, True, 0, None, session_age=0.4, **SEEN))
    assert (d.action, d.state) == (Action.NONE, State.STANDBY)
    # still no heartbeat past the timeout counted from the session: now it is a cut
    d = c.step(Observation(100.6, stale_net, 0.05, True, 0, None, session_age=0.6, **SEEN))
    assert (d.action, d.state) == (Action.ALERT, State.PARTITIONED)


def test_b_session_age_does_not_hide_a_silent_primary():
    """A heartbeat newer than the session start is what counts: a long session whose
    primary went silent on both paths is a dead primary."""
    c = secondary()
    d = c.step(Observation(100.0, 0.9, 0.9, True, 5, None, session_age=60.0, **SEEN))
    assert d.action is Action.CLAIM_PROMOTE


def test_a_no_false_unprotected_claim_before_the_first_heartbeat():
    c = primary()
    d = c.step(Observation(100.0, None, 0.05, True, 0, None, session_age=0.2, **SEEN))
    assert (d.action, d.state) == (Action.NONE, State.PROTECTED)
    d = c.step(Observation(100.6, None, 0.05, True, 0, None, session_age=0.6, **SEEN))
    assert d.action is Action.CLAIM_UNPROTECTED


# ---- the one-primary rule: silence on a slot never seen is no evidence ------------


def test_b_never_promotes_on_a_slot_it_never_saw():
    """Two hosts with a local arbiter folder each: B never sees A's slot.  Whatever the
    ages say, B never claims; it alerts once and says why."""
    c = secondary()
    d = c.step(obs(net=0.6, storage=None, seen=False))
    assert (d.action, d.state) == (Action.ALERT, State.UNVERIFIED)
    assert "storage slot never seen on this arbiter" in str(d) and "not promoting" in str(d)
    for t in range(50):
        d = c.step(obs(now=11 + t, net=5.0 + t, storage=None if t % 2 else 99.0, seen=False))
        assert d.action is Action.NONE and d.state is State.UNVERIFIED, d
    assert c.step(obs(net=0.1, storage=None, seen=False)).state is State.STANDBY  # healed


def test_b_seen_then_silent_promotes_as_before():
    c = secondary()
    assert c.step(obs(net=0.1, storage=0.1, seen=True)).state is State.STANDBY
    d = c.step(obs(net=0.6, storage=0.7, seen=True))
    assert (d.action, d.state) == (Action.CLAIM_PROMOTE, State.CLAIMING_PROMOTE)
    assert c.step(obs(net=0.7, storage=0.8, claim=WON)).action is Action.PROMOTE


def test_b_unverified_then_slot_seen_judges_normally():
    c = secondary()
    c.step(obs(net=0.6, storage=None, seen=False))
    d = c.step(obs(net=0.7, storage=0.1, seen=True))  # alive on storage: a cut
    assert (d.action, d.state) == (Action.ALERT, State.PARTITIONED)
    d = c.step(obs(net=2.0, storage=0.9, seen=True))  # seen, then silent: dead
    assert d.action is Action.CLAIM_PROMOTE


def test_b_operator_may_still_promote_without_the_slot():
    """`mirror failover` is the operator's decision (it checks the slot itself)."""
    c = secondary()
    c.step(obs(net=0.6, storage=None, seen=False))
    d = c.step(Observation(12.0, 2.0, None, True, 5, None, manual_promote=True))
    assert d.action is Action.CLAIM_PROMOTE


def test_a_never_claims_unprotected_on_a_slot_it_never_saw():
    """A's interconnect is cut and B's slot was never seen: a claim won at an arbiter B
    may not use proves nothing, so A claims nothing and holds its outputs."""
    c = primary()
    d = c.step(obs(net=0.6, storage=None, seen=False))
    assert (d.action, d.state) == (Action.HOLD_OUTPUTS, State.HOLDING)
    assert "never seen on this arbiter" in str(d) and "claiming nothing" in str(d)
    for t in range(50):  # no timeout makes it a win: it holds (B cannot promote either)
        d = c.step(obs(now=11 + t, net=5.0 + t, storage=None, seen=False))
        assert d.action is Action.HOLD_OUTPUTS and d.state is State.HOLDING, d
    d = c.step(obs(now=70.0, net=0.1, storage=None, seen=False))  # the interconnect is back
    assert (d.action, d.state) == (Action.NONE, State.PROTECTED)


def test_a_holding_without_storage_fences_after_the_timeout():
    c = primary()
    c.step(obs(now=100.0, net=0.6, seen=False))
    assert c.step(obs(now=100.1, net=0.7, own=False, seen=False)).state is State.ISOLATED
    d = c.step(obs(now=102.2, net=2.8, own=False, seen=False))
    assert (d.action, d.state) == (Action.FENCE, State.FENCED)


def test_a_seen_then_silent_claims_as_before():
    c = primary()
    c.step(obs(net=0.1, storage=0.1, seen=True))
    d = c.step(obs(net=0.6, storage=3.0, seen=True))
    assert d.action is Action.CLAIM_UNPROTECTED
    c2 = primary()
    c2.step(obs(net=0.6, seen=False))
    d = c2.step(obs(net=0.7, storage=0.1, seen=True))  # seen while cut: alive, a cut
    assert (d.action, d.state) == (Action.CLAIM_UNPROTECTED, State.CLAIMING_UNPROTECTED)


def test_an_observation_assumes_no_slot_was_seen():
    """The safe default: an Observation that does not say the slot was seen gives no
    claim on silence."""
    assert Observation(10.0, None, None, True, 5).peer_slot_seen is False
    assert secondary().step(Observation(10.0, 9.0, 9.0, True, 5)).action is Action.ALERT
    d = primary().step(Observation(10.0, 9.0, 9.0, True, 5))
    assert d.action is Action.HOLD_OUTPUTS
