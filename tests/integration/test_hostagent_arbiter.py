"""The host agent's resume of a dead primary role follows the one-primary rule: the peer's
silence on the arbiter is evidence only if the peer's slot is there at all (real agents,
real roles; the rig of tests/integration/test_hostagent.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mirror.lab.observer import Observer
from tests.integration.test_hostagent import (  # noqa: F401  (agents: a fixture)
    Agent,
    agents,
    by_pair,
    kill_group,
    mirror,
    wait,
)


def test_resume_claims_nothing_when_the_peer_never_wrote_on_this_arbiter(
    agents: tuple[Agent, Agent], pair_name: str  # noqa: F811
) -> None:
    """Both roles die; B's slot is not on A's arbiter (as if B kept a folder of its own):
    A's agent must not take B's absence for a death.  It starts no primary and claims
    nothing, and says why."""
    a, b = agents
    a.start()
    b.start()
    obs = Observer()
    try:
        r = mirror("pair", pair_name, "--peer", "hostB", "--guest", "synthetic", "--ram-mib",
                   "16", "--observer", f"127.0.0.1:{obs.port}", "--agent-config", str(a.config),
                   "--timeout", "60")  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        _claim_nothing(a, b, pair_name)
    finally:
        obs.close()


def _claim_nothing(a: Agent, b: Agent, pair_name: str) -> None:
    pids = {ag.name: ag.role_pids() for ag in (a, b)}
    for ag in (b, a):
        ag.kill()
        for pid in pids[ag.name]:
            kill_group(pid)
    pair_dir = Path(a.root / "shared" / pair_name)
    (pair_dir / "slot-hostB.json").unlink()
    claims_before = sorted(p.name for p in (pair_dir / "claims").iterdir())
    a.start()
    why = "hostB's storage slot was never seen on this arbiter: not starting the guest"
    pa = wait("A's agent to wait", lambda: (p := by_pair(a, pair_name)) and
              why in str(p.get("waiting")) and p)  # fmt: skip
    time.sleep(2)  # its next looks decide the same
    pa = by_pair(a, pair_name) or {}
    assert pa.get("role") == "primary" and not pa.get("running"), pa
    assert why in str(pa.get("waiting")), pa
    for pid in a.role_pids():  # the killed role's last report: no such process now
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert sorted(p.name for p in (pair_dir / "claims").iterdir()) == claims_before
    assert "won generation" not in a.log.read_text()
