"""The dirty-page log on the synthetic guest (a real guest process writing its own
mapping of the RAM file, a real `mirror secondary`): ground truth against an exact
compare, a lost registration, the safety net, and an old kernel simulated."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import CheckpointConfig, Config, GuestConfig, PairConfig
from mirror.guests.base import Guest, OutputHandler
from mirror.guests.synthetic import SHM_DIR, SyntheticGuest, SyntheticParams
from mirror.replication import dirtylog
from mirror.replication import pagediff as pd
from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.inflight import ReplicationError
from mirror.replication.outputs import OutputBuffer
from tests.dirtylog_rig import rig
from tests.integration.conftest import Pair

if dirtylog.probe() is not None:
    pytest.skip(f"no dirty-page log here: {dirtylog.probe()}", allow_module_level=True)

EPOCH_MS = 4
QUIET = OutputBuffer(lambda outs: None)  # outputs nobody reads


def synthetic(cfg: Config, root: Path, on_output: OutputHandler) -> Guest:
    name = f"mirror-dltest-{os.getpid()}-{root.name}.ram"
    return SyntheticGuest.boot(SyntheticParams.from_config(cfg.guest), SHM_DIR / name, on_output)


def config(scan: str = "auto", verify_slices: int = 64, rate: int = 3000) -> Config:
    return replace(
        Config(),
        pair=PairConfig(name=f"dl{os.getpid()}"),  # apart from other runs' pairs
        guest=replace(GuestConfig(), ram_mib=16, dirty_pages_per_s=rate, outputs_per_s=200),
        checkpoint=replace(CheckpointConfig(), scan=scan, epoch_ms=10, verify_slices=verify_slices),
    )


def test_log_is_a_superset_of_what_changed_and_survives_a_lost_registration() -> None:
    """1,000 checkpoints: every page that really changed is in its checkpoint; the
    log's registration is dropped at checkpoint 400 (its userfaultfd closed: the
    kernel's EPERM), which costs a full scan and no page; the standby ends equal."""
    with rig(config(), synthetic) as r:
        assert r.engine.method == "log" and r.engine.stats.scan == "log"

        def drop(i: int) -> None:
            if i == 400:
                assert r.engine.log is not None
                r.engine.log.drop()

        r.run(1000, EPOCH_MS, between=drop)
        st = r.engine.stats
        assert r.missing == {}, f"pages changed but not sent: {r.missing}"
        assert r.changed_total > 5000  # the guest really wrote: not a vacuous pass
        assert st.log_losses == 1 and r.engine.log_state == "ok" and r.engine.log is not None
        assert st.log_missed_pages == 0 and st.verified_pages > 0
        assert r.image_differs() == []


def test_safety_net_finds_a_write_the_log_cannot_see() -> None:
    """A pwrite() to the RAM file is not in the log (it does not go through the
    guest's mapping): the rotating check of RAM against the table finds it within
    one round of slices, sends it, and counts it; the standby ends equal."""
    with rig(config(verify_slices=16, rate=200), synthetic) as r:
        page = r.engine.npages // 2 + 3
        fd = os.open(r.guest.ram_path, os.O_WRONLY)
        try:

            def poke(i: int) -> None:
                if i == 5:
                    os.pwrite(fd, b"written behind the log's back", page * pd.PAGE_SIZE + 100)

            r.run(5 + 2 * 16, EPOCH_MS, between=poke)
        finally:
            os.close(fd)
        assert r.engine.stats.log_missed_pages >= 1
        assert r.image_differs() == []


def test_auto_falls_back_to_hashed_on_an_old_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """PAGEMAP_SCAN refused (simulated): auto takes the hashed scan and says why;
    scan = "log" is refused with the reason."""
    monkeypatch.setenv(dirtylog.SIMULATE_ENV, "old-kernel")
    out: list[object] = []
    guest = SyntheticGuest.boot(
        SyntheticParams(ram_mib=4), SHM_DIR / f"mirror-dltest-old-{os.getpid()}.ram", out.append
    )
    try:
        for scan, method in (("auto", "hashed"), ("hashed", "hashed"), ("exact", "exact")):
            eng = CheckpointEngine(
                guest, None, replace(CheckpointConfig(), scan=scan), QUIET,  # type: ignore[arg-type]
                pair="p", generation=1, node="n",
            )  # fmt: skip
            assert eng.method == method and eng.stats.scan == method
            if scan == "auto":  # said in the status summary (status.json), with the reason
                summary = eng.stats.summary(OutputBuffer(lambda outs: None))
                assert summary["scan"] == "hashed"
                assert "PAGEMAP_SCAN refused" in summary["scan_note"]
        with pytest.raises(ReplicationError, match=r'scan = "log" cannot be used.*6\.7'):
            CheckpointEngine(
                guest, None, replace(CheckpointConfig(), scan="log"), QUIET,  # type: ignore[arg-type]
                pair="p", generation=1, node="n",
            )  # fmt: skip
        monkeypatch.delenv(dirtylog.SIMULATE_ENV)
        eng = CheckpointEngine(
            guest, None, replace(CheckpointConfig(), scan="auto"), QUIET,  # type: ignore[arg-type]
            pair="p", generation=1, node="n",
        )  # fmt: skip
        assert eng.method == "log"
    finally:
        guest.stop()


def test_agents_lose_the_log_and_set_it_up_again(pair: Pair) -> None:
    """Real `mirror primary`/`secondary` processes: the log is lost before checkpoint
    10 (MIRROR_FAULT=lose-log: its userfaultfd closed); that checkpoint scans all of
    RAM, the log is set up again, and the standby ends equal to RAM."""
    n = 40
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n), env={"MIRROR_FAULT": "lose-log:10"})
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    summary = st_a["summary"]
    assert summary["scan"] == "log" and summary["log_losses"] == 1, summary
    assert summary["log_missed_pages"] == 0 and summary["verified_pages"] > 0
    text = a.log_path.read_text()
    assert '"event": "dirty-log-lost", "checkpoint": 10' in text
    assert '"event": "dirty-log-restored", "checkpoint": 10' in text
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()


def test_agents_on_an_old_kernel_take_the_hashed_scan(pair: Pair) -> None:
    """PAGEMAP_SCAN refused (simulated): `auto` runs on the hashed scan, says so in
    status.json, and replicates correctly."""
    n = 15
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n), env={dirtylog.SIMULATE_ENV: "old-kernel"})
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    assert st_a["summary"]["scan"] == "hashed"
    assert "PAGEMAP_SCAN refused" in st_a["summary"]["scan_note"]
    assert "the hashed scan, as PAGEMAP_SCAN refused" in a.log_path.read_text()
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
