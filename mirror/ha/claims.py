"""Generations and claims: the one place where a pair's generation is claimed at the
arbiter, and where the rule for when each kind of claim may be made is kept
(docs/ARCHITECTURE.md, "one primary").

A pair's generation grows with every re-pairing.  A claim of a generation is won by
exactly one caller (``Arbiter.claim``); whoever wins leads the pair under the next
generation, recorded on the arbiter, and a node that loses never releases output again
in that generation.  Every kind of claim, who makes it and when it may be made:

- ``promote``: a secondary, when the failover rules (mirror/ha/rules.py) find the
  primary silent on both paths (:func:`may_promote`), or when an operator asks
  (``mirror failover``, a planned switchover's handover): :meth:`Claims.claim`, from the
  failover driver.  The guard ``mirror failover`` applies first, without --force, is
  :func:`manual_failover_refusal` (the CLI's ``manual_failover``, in
  mirror/cli/roles.py, asks it);
- ``unprotected``: a primary whose secondary is silent on the network
  (:func:`may_run_unprotected`), or whose first pairing failed after its guest
  resumed (:meth:`Claims.unprotected`);
- ``resume``: a host agent starting again a primary role that is gone
  (:func:`resume`);
- ``restart``: the pool controller, for a pair whose standby has not promoted in
  time (:func:`preempt`: it takes the standby's generation so that it never can).

The rule of every claim judged on a peer's silence: that silence is evidence only about
a slot seen there.  A peer whose slot is absent may simply use another arbiter, and a
claim won where the peer does not ask proves nothing, so nothing is claimed on it.

The pool's own ``claims/VM/EPOCH`` (who moved a VM away from a placement,
mirror/pool/store.py) are placements, not generations: they stay with the pool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from mirror.ha.arbiter import Arbiter, ArbiterError, ClaimResult

if TYPE_CHECKING:
    from mirror.ha.etcd import Etcd

# the kinds of claim, as the arbiter stores them
PROMOTE = "promote"
UNPROTECTED = "unprotected"
RESUME = "resume"
RESTART = "restart"


# -- when a claim may be made ------------------------------------------------------------


class Refusal(Enum):
    """Why a claim may not be made now."""

    PEER_ON_NETWORK = "peer-on-network"  # the peer's heartbeats arrive on the interconnect
    NO_STORAGE = "no-storage"  # this node's own slot writes fail: it cannot claim
    SLOT_UNSEEN = "slot-unseen"  # the peer's slot never seen here: its silence is no evidence
    PEER_ON_STORAGE = "peer-on-storage"  # the peer's slot is fresh: it is alive
    NO_CHECKPOINT = "no-checkpoint"  # nothing committed to promote from


@dataclass(frozen=True)
class Evidence:
    """What a role sees of its peer when it judges (the failover rules' observation)."""

    peer_net_silent: bool
    own_storage_ok: bool
    # the peer's slot seen changing on this arbiter in this generation (Arbiter.peer_seen)
    peer_slot_seen: bool
    peer_storage_silent: bool
    committed: int = 0  # a secondary's committed checkpoint


def may_promote(e: Evidence, operator: bool = False) -> Refusal | None:
    """May a secondary claim "promote"?  None: it may.  The primary must be silent on
    both paths, its slot seen on this arbiter, and there must be a committed checkpoint;
    an ``operator`` (``mirror failover``, a switchover) decides the rest himself."""
    if operator:
        return Refusal.NO_CHECKPOINT if e.committed < 1 else None
    if not e.peer_net_silent:
        return Refusal.PEER_ON_NETWORK
    if not e.own_storage_ok:
        return Refusal.NO_STORAGE
    if not e.peer_slot_seen:
        return Refusal.SLOT_UNSEEN
    if not e.peer_storage_silent:
        return Refusal.PEER_ON_STORAGE
    if e.committed < 1:
        return Refusal.NO_CHECKPOINT
    return None


def may_run_unprotected(e: Evidence) -> Refusal | None:
    """May a primary claim "unprotected"?  None: it may.  The secondary must be silent on
    the network (alive on storage or not: a lost claim fences this primary), this node
    able to write its own slot, and the secondary's slot seen on this arbiter."""
    if not e.peer_net_silent:
        return Refusal.PEER_ON_NETWORK
    if not e.own_storage_ok:
        return Refusal.NO_STORAGE
    if not e.peer_slot_seen:
        return Refusal.SLOT_UNSEEN
    return None


def manual_failover_refusal(arbiter: Arbiter, primary: str, silent_after: float) -> str | None:
    """Why ``mirror failover`` (without --force) must not ask ``primary``'s secondary to
    promote (None: it may): the primary's slot is not on this arbiter at all (its
    silence says nothing), or it changed within ``silent_after`` seconds (it is alive).
    Reads the slot twice, ``silent_after`` apart (ages are judged by the reader's clock)."""
    arbiter.peer_age(primary)
    time.sleep(silent_after)
    age = arbiter.peer_age(primary)
    if age is None:
        return (f"the primary {primary}'s storage slot is not on this arbiter: cannot tell "
                f"whether it is alive (do both hosts share the arbiter?); refusing to "
                f"promote a second primary. Use --force only if you know it is dead or "
                f"fenced.")  # fmt: skip
    if age <= silent_after:
        return (f"the primary {primary} is alive on storage (its heartbeat slot changed "
                f"{age:.2f} s ago): refusing to promote a second primary. Use --force only "
                f"if you know it is dead or fenced.")  # fmt: skip
    return None


# -- making claims, and the generations ----------------------------------------------------


class Claims:
    """One node's claims at its pair's arbiter, and the pair's generation there."""

    def __init__(self, arbiter: Arbiter, node: str) -> None:
        self.arbiter = arbiter
        self.node = node

    def generation(self, at_least: int = 0) -> int:
        """The pair's generation: the one recorded on the arbiter, or ``at_least`` (the
        configured one) if that is later.  ArbiterError if the arbiter is unusable."""
        return max(at_least, self.arbiter.generation())

    def record(self, generation: int) -> None:
        """Record ``generation`` as the pair's (its leader's, after a claim won)."""
        self.arbiter.set_generation(generation)

    def claim(self, generation: int, kind: str) -> ClaimResult:
        """Claim ``generation`` for ``kind`` (the failover driver's "promote" or
        "unprotected", once :func:`may_promote` or :func:`may_run_unprotected` allowed
        it): exactly one caller per generation wins.  ArbiterError: no claim was made."""
        return self.arbiter.claim(generation, self.node, kind)

    def unprotected(self, generation: int) -> ClaimResult:
        """A primary whose first pairing failed after its guest resumed (outputs held):
        it runs on unprotected only with this claim; lost, it fences."""
        return self.claim(generation, UNPROTECTED)


@dataclass(frozen=True)
class Resume:
    """What a host agent does with a pair whose primary role is gone (:func:`resume`):
    start it as the ``role`` "primary" (it won) or "secondary" (the peer may run the
    guest) under ``generation``, or "" (wait; ``why`` says for what)."""

    role: str
    generation: int
    why: str


def resume(
    open_arbiter: Callable[[], Arbiter], node: str, peer: str, generation: int,
    silent_after: float,
) -> Resume:
    """The "resume" claim: may ``node`` start again the primary it ran, last in
    ``generation``?  If ``peer`` may run the guest (its heartbeat is fresh as a primary,
    or in a later generation) this node becomes its secondary; alive with the standby, it
    waits for the peer to promote; with the peer's slot absent from this arbiter it waits
    too (the peer's silence there is no evidence).  Otherwise it claims the current
    generation (so the peer can never promote in it) and, won, leads under the next,
    recorded on the arbiter; lost, it becomes the secondary of whoever won."""
    try:
        claims = Claims(open_arbiter(), node)
        arb = claims.arbiter
        recorded = claims.generation()
        age = arb.peer_age(peer)
        if age is not None:
            # ages are judged from when this reader first saw the slot: look again later
            time.sleep(1.5 * silent_after)
            age = arb.peer_age(peer)
        slot = arb.peer_slot(peer)
        gen = max(generation, recorded)
        if age is not None and age <= silent_after and slot is not None:
            if slot.role == "primary" or slot.generation > generation:
                return Resume("secondary", max(gen, slot.generation),
                              f"{peer} runs the guest (its heartbeat is fresh, role "
                              f"{slot.role})")  # fmt: skip
            return Resume("", 0, f"{peer} is alive with the standby: waiting for it to "
                                 f"promote (this host's guest is gone)")  # fmt: skip
        if slot is None:  # its silence here is no evidence: it may not use this arbiter
            return Resume("", 0, f"{peer}'s storage slot was never seen on this arbiter: "
                                 f"not starting the guest (is the arbiter shared?)")  # fmt: skip
        won = claims.claim(gen, RESUME)
    except ArbiterError as e:
        return Resume("", 0, f"cannot ask the arbiter ({e}): not starting the guest")
    if not won.won:
        return Resume("secondary", gen + 1, f"{won.holder} won generation {gen} ({won.action})")
    try:
        claims.record(gen + 1)
    except ArbiterError as e:
        return Resume("", 0, f"cannot record generation {gen + 1} ({e})")
    return Resume("primary", gen + 1,
                  f"won generation {gen} ({peer} silent): started the primary under {gen + 1}")


# -- a pool's pairs, on its etcd -------------------------------------------------------------


def held(etcd: Etcd, prefix: str, pair: str) -> dict[int, tuple[str, str]]:
    """The claims of ``pair``'s arbiter (keys under ``prefix``): generation -> (node, kind)."""
    kvs, _ = etcd.get_prefix(f"{prefix}/{pair}/claims/")
    out: dict[int, tuple[str, str]] = {}
    for kv in kvs:
        _, _, gen = kv.key.rpartition("generation-")
        try:
            d = json.loads(kv.value)
            out[int(gen)] = (str(d.get("node")), str(d.get("action")))
        except (ValueError, AttributeError):
            continue
    return out


def unrecorded_promotion(
    etcd: Etcd, prefix: str, pair: str, seen_generation: int, node: str | None = None,
) -> tuple[int, str] | None:
    """The latest promotion claim (by ``node``, or any) of a generation above
    ``seen_generation`` (the last the pool acted on): (generation, the node that won it);
    None if there is none.  While there is one, no fresh primary may start: it would be
    a second one."""
    won = [(g, who) for g, (who, kind) in held(etcd, prefix, pair).items()
           if g > seen_generation and kind == PROMOTE and node in (None, who)]
    return max(won) if won else None


def preempt(etcd: Etcd, prefix: str, pair: str, standby: str) -> tuple[int, bool]:
    """The "restart" claim: ``pair``'s standby has not promoted in time, so the pool takes
    the claim of its generation (and of any it may yet be moved to) so that it never can
    (a claim is won once), and moves the pair's generation on, so that a fresh pair
    starts above it.  Returns the generation and whether the standby promoted after all
    (it won that claim first)."""
    from mirror.ha.etcd_arbiter import claim_key  # etcd's client: only where etcd is used

    base = f"{prefix}/{pair}/"
    gens: list[int] = []
    for key in ("generation", f"slot/{standby}"):
        kv = etcd.get(base + key)
        if kv is None:
            continue
        try:
            v = json.loads(kv.value)
            gens.append(int(v["generation"] if isinstance(v, dict) else v))
        except (ValueError, KeyError, TypeError):
            continue
    lo, hi = min(gens, default=1), max(gens, default=1)
    for g in range(max(1, lo), hi + 1):  # the standby's, and any it may yet be moved to
        res = claim_key(etcd, f"{base}claims/generation-{g}", "pool", RESTART)
        if res.holder == standby and res.action == PROMOTE:
            return g, True
    etcd.put(base + "generation", str(hi + 1))
    return hi, False
