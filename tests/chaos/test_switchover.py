"""`mirror switchover`: a planned role swap with nothing lost or repeated."""

from __future__ import annotations

import subprocess
import sys

from tests.chaos.test_host_kills import CHAOS, check_observer
from tests.integration.conftest import Pair


def test_switchover_swaps_roles_and_reprotects(pair_factory) -> None:
    pair: Pair = pair_factory(CHAOS)
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 5)
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "switchover", "--config", str(a.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr + a.log_tail()
    assert "hostA is now the secondary" in run.stdout
    st = pair.wait(
        "hostB primary and protected by hostA",
        lambda: (
            (s := b.status())
            and s.get("role") == "primary"
            and s.get("phase") == "protected"
            and s.get("acked", 0) >= 5
            and s
        ),
    )
    assert st["replayed_outputs"] == 0  # a handover leaves nothing to replay
    assert st["generation"] == 2
    count = pair.observer.count()
    pair.wait("outputs from hostB", lambda: pair.observer.count() > count + 30)
    b.stop()
    a.stop()
    check_observer(pair)
