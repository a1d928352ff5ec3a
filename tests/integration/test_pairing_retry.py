"""A pairing that fails after the standby's WELCOME (it refuses the pre-copy) does not
stop the primary: the guest runs on unprotected (with this generation's claim), the
failure is an event and in the status, and the pairing is tried again after a wait,
under the next generation, until the pair is protected again."""

from __future__ import annotations

import signal
import time
from dataclasses import replace

import pytest

from mirror.config import ArbiterConfig
from tests.integration.conftest import SMALL, Pair, log_events

# B must not judge A dead while A restarts: a restarted A pairs with the standby that
# still holds A's last checkpoints of this generation
SLOW_JUDGE = replace(SMALL, arbiter=replace(ArbiterConfig(), silent_after_ms=15_000,
                                            fence_after_ms=30_000))  # fmt: skip



@pytest.mark.pair_config(SLOW_JUDGE)
def test_refused_precopy_runs_on_unprotected_and_pairs_again(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    first = pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 5 and s)
    gen = int(first["generation"])
    a.signal(signal.SIGKILL)  # A's role dies; B holds checkpoints of generation `gen`
    a.proc.wait()
    a.remove_shm_files()
    pair.hosts.remove(a)
    a2 = pair.start_primary()
    # the same generation's HELLO is welcomed, its pre-copy refused: this standby holds
    # checkpoints of it.  A goes on unprotected and says so until the next attempt.
    seen = pair.wait(
        "the failed pairing in A's status",
        lambda: (s := a2.status()) and s.get("pairing_failures") and s,
        timeout=60,
    )
    assert seen["protection"] == "unprotected", seen
    assert seen["pairing_retry_in_s"] <= 1.0, seen
    assert "pre-copy" in str(seen["pairing_error"]), seen
    failed = log_events(a2.log_path.read_text(), "pairing-failed")
    assert failed and failed[0]["retry_in_s"] == 1.0, failed
    assert "pre-copy refused" in str(failed[0]["reason"]), failed
    unprotected = log_events(a2.log_path.read_text(), "unprotected")
    assert unprotected and unprotected[0]["reason"] == "the pairing failed", unprotected
    # then the next generation's pairing: protected again, checkpoints acked
    again = pair.wait(
        "A protected again",
        lambda: (s := a2.status()) and s["protection"] == "protected" and s["acked"] >= 5 and s,
        timeout=60,
    )
    assert int(again["generation"]) > gen, again
    assert "pairing_failures" not in again, again
    assert a2.proc.poll() is None and b.proc.poll() is None
    pair.wait("B's status at the new checkpoints",
              lambda: (s := b.status()) and s["committed"] >= 5)  # written every 0.2 s
    time.sleep(0.5)
    assert a2.status()["protection"] == "protected"  # type: ignore[index]
