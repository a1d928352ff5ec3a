"""The primary's statistics stay bounded however long it runs, and count everything."""

from __future__ import annotations

from mirror.replication.inflight import RECENT, CheckpointRecord, Stats
from mirror.replication.outputs import OutputBuffer


def test_stats_keep_recent_records_and_count_all() -> None:
    stats = Stats()
    n = RECENT + 123
    for epoch in range(1, n + 1):
        pause = 100.0 if epoch <= 123 else 1.0  # the oldest ones fall out of the window
        stats.add(CheckpointRecord(epoch, 0, pause, 0, 0, 0, pause, 10, 4096, 1,
                                   sent_at=epoch * 0.05))
    assert len(stats.records) == RECENT
    s = stats.summary(OutputBuffer(lambda outs: None))
    assert s["checkpoints"] == n
    assert s["bytes_sent"] == n * 4096
    assert s["pause_ms_p99"] == 1.0  # percentiles of the recent window
