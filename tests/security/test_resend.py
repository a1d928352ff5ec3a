"""One bad frame never costs a copy of the VM: a checkpoint corrupted on the wire with
many checkpoints in flight (MIRROR_FAULT=corrupt:N, 10 ms epochs, max_in_flight 4) is
rejected by the standby and sent again by the primary, which never stops.  Before
sessions and matched REJECTs the primary died in 1-2 runs of 5 ("the standby refused
this primary: no session: send HELLO first")."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.integration.conftest import SMALL, Pair

FAST = replace(
    SMALL,
    checkpoint=replace(SMALL.checkpoint, epoch_ms=10, max_in_flight=4),
    guest=replace(SMALL.guest, ram_mib=8),
)
N = 60


def one_run(pair: Pair, corrupt: int) -> None:
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(N), env={"MIRROR_FAULT": f"corrupt:{corrupt}"})
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == N and s)
    assert a.proc.poll() is None, a.log_tail()
    assert st_a["summary"]["rejects"] >= 1, st_a["summary"]
    assert "does not verify" in b.log_path.read_text()
    assert "refused this primary" not in a.log_path.read_text()
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.pair_config(FAST)
@pytest.mark.parametrize("corrupt", [5, 23, 41])
def test_corrupt_in_flight_is_resent(pair: Pair, corrupt: int) -> None:
    one_run(pair, corrupt)


@pytest.mark.slow
@pytest.mark.pair_config(FAST)
@pytest.mark.parametrize("run", range(20))
def test_corrupt_in_flight_20_runs(pair: Pair, run: int) -> None:
    one_run(pair, 3 + run * 2)
