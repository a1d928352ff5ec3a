"""Checkpoint replication with real processes: a primary host and a secondary host.

Each host is a `mirror` process group; the guest is the synthetic guest
process; the interconnect is zmq on loopback; the observer is a TCP server.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.guests.synthetic import SyntheticGuest, SyntheticParams, reference_outputs, unpack_state
from tests.integration.conftest import SMALL, Pair

# A secondary that stops answering looks dead after silent_after_ms and the primary
# then goes unprotected (tests/chaos covers that); here the silence is made long so
# that only the output-commit rule is at work.
PATIENT = replace(SMALL, arbiter=replace(SMALL.arbiter, silent_after_ms=600_000))


@pytest.mark.pair_config(PATIENT)
def test_outputs_wait_for_the_secondary_ack(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("outputs at the observer", lambda: pair.observer.count() > 30)

    b.signal(signal.SIGSTOP)  # the secondary stops acknowledging
    # The standby's committed state (written before each ack) bounds what may be
    # released: no output after the last committed checkpoint's, ever.
    time.sleep(0.1)
    _, regs = unpack_state((pair.root / "hostB" / "committed.state").read_bytes())
    committed_seq = regs[0]
    time.sleep(0.5)  # acks already on the wire may still land
    frozen = pair.observer.count()
    held_before = (a.status() or {})["summary"]["outputs_held"]
    time.sleep(1.5)
    assert pair.observer.count() == frozen, "outputs were released without an ack"
    assert max(pair.observer.seen.seqs) <= committed_seq, (
        "an output of a checkpoint the standby never committed was released"
    )
    status = a.status() or {}
    assert status["summary"]["outputs_held"] > held_before, "the guest stopped producing"

    b.signal(signal.SIGCONT)
    pair.wait("outputs flowing again", lambda: pair.observer.count() > frozen + 30)
    a.stop()
    assert a.proc.returncode == 0, a.log_tail()
    seen = pair.observer.seen
    assert seen.gaps() == 0 and seen.duplicates() == 0 and seen.malformed == 0
    params = SyntheticParams.from_config(pair.cfg_a.guest)
    ref = reference_outputs(params, len(seen.outputs))
    assert [(s, p) for s, p, _ in seen.outputs] == ref


def test_standby_equals_checkpoint_n_and_the_guest_resumes_from_it(
    pair: Pair, tmp_path: Path
) -> None:
    n = 25
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n))
    st_a = pair.wait(
        "the primary to hold checkpoint N",
        lambda: (s := a.status()) and s["phase"] == "frozen" and s,
    )
    st_b = pair.wait(
        "the standby to commit N", lambda: (s := b.status()) and s["committed"] == n and s
    )
    ram = Path(st_a["ram"]).read_bytes()
    image = Path(st_b["image"]).read_bytes()
    assert ram == image, "standby image differs from the primary's RAM at checkpoint N"

    state = Path(st_b["state"]).read_bytes()
    params, regs = unpack_state(state)
    assert params == SyntheticParams.from_config(pair.cfg_a.guest)
    last_seq = regs[0]
    released = pair.observer.snapshot()
    assert released and released[-1][0] == last_seq  # all of epoch <= N released, nothing after
    copy = tmp_path / "resumed.img"
    shutil.copyfile(st_b["image"], copy)
    a.stop()
    b.stop()

    resumed: list[tuple[int, bytes]] = []
    guest = SyntheticGuest.launch_from(copy, state, lambda o: resumed.append((o.seq, o.payload)))
    try:
        guest.resume()
        deadline = time.monotonic() + 10
        while len(resumed) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        guest.pause()
    finally:
        guest.stop()
    reference = reference_outputs(params, last_seq + len(resumed))
    assert [(s, p) for s, p, _ in released] == reference[:last_seq]
    assert resumed and resumed[0][0] == last_seq + 1
    assert resumed == reference[last_seq:]


def test_a_clean_primary_stop_is_not_a_failure(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("outputs at the observer", lambda: pair.observer.count() > 30)
    a.stop()  # SIGTERM: the primary says BYE before it goes
    assert a.proc.returncode == 0
    released = pair.observer.count()
    time.sleep(2.0)  # four times the silence that would mean death
    st = b.status() or {}
    assert st.get("role") == "secondary", f"the secondary promoted after a clean stop: {st}"
    assert pair.observer.count() == released
    assert "standing down, not promoting" in b.log_path.read_text()


def test_a_checkpoint_corrupted_on_the_wire_is_rejected_and_sent_again(pair: Pair) -> None:
    """The primary's resend-after-reject path, end to end: checkpoint 10 arrives with a
    flipped bit (MIRROR_FAULT=corrupt), the standby rejects it, the primary says HELLO
    again and resends it intact; nothing is lost, and the image ends equal to RAM."""
    n = 25
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n), env={"MIRROR_FAULT": "corrupt:10"})
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    assert st_a["summary"]["rejects"] == 1, st_a["summary"]
    assert st_b["rejected"] >= 1
    assert "checkpoint 10" in b.log_path.read_text() and "does not verify" in b.log_path.read_text()
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 20
