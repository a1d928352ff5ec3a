"""`mirror failover`: refused while the primary lives on storage; --force promotes,
and the old primary, losing the claim, fences itself without releasing anything."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import Pair


def failover(pair: Pair, *extra: str) -> subprocess.CompletedProcess[str]:
    cfg = pair.root / "hostB" / "mirror.toml"
    return subprocess.run(
        [sys.executable, "-m", "mirror", "failover", "--config", str(cfg), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refused_while_the_primary_is_alive_then_forced(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("outputs", lambda: pair.observer.count() > 40)

    run = failover(pair)
    assert run.returncode == 1
    assert "the primary hostA is alive on storage" in run.stderr
    assert (b.status() or {}).get("role") == "secondary"

    run = failover(pair, "--force")
    assert run.returncode == 0, run.stderr
    assert "promoted hostB from checkpoint" in run.stdout
    a.proc.wait(20)
    assert a.proc.returncode == 3, f"the old primary did not fence:\n{a.log_tail()}"
    count = pair.observer.count()
    pair.wait("the new primary's outputs", lambda: pair.observer.count() > count + 40, alive=[b])
    seen = pair.observer.seen
    assert seen.seqs == list(range(1, len(seen.seqs) + 1)), "outputs lost or repeated"
    assert not seen.interleaved()
