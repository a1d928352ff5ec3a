"""A pair with keys sends its checkpoints' pages sealed off CURVE (pagecrypt), replicates
exactly, fails over onto its standby, and is protected again, sealed the other way."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.lab.demo import Host, free_ports
from tests.integration.conftest import SMALL, Pair


def test_sealed_pages_replicate_and_fail_over(pair: Pair) -> None:
    n = 20
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n))
    st_a = pair.wait("A frozen at N", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    # every page went sealed, on the pages port the WELCOME named (not the data port)
    assert st_b["pages_port"] and st_b["pages_port"] != pair.cfg_b.link.data_port
    assert st_b["sealed_parts"] >= 2 * n, st_b  # a head and at least one data part each
    assert st_b["rejected"] == 0 and st_b["dropped"] == 0, st_b
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()

    a.signal(signal.SIGKILL)  # host A dies whole
    a.proc.wait()
    pair.wait("B to promote", lambda: (s := b.status()) and s.get("role") == "primary",
              alive=[b])  # fmt: skip
    # A comes back as B's standby: B's checkpoints go sealed to A's pages port
    a2 = Host("hostA", "secondary", pair.cfg_a, pair.root)
    pair.hosts.append(a2)
    st = pair.wait("A to hold B's checkpoints, sealed",
                   lambda: (s := a2.status()) and s.get("sealed_parts", 0) >= 20
                   and s["committed"] >= 5 and s, alive=[b, a2])  # fmt: skip
    assert st["rejected"] == 0, st
    pair.wait("outputs after the failover",
              lambda: len(pair.observer.seen.seqs) > 200, alive=[b, a2])  # fmt: skip
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)), "outputs lost or repeated across the failover"


def test_a_corrupted_sealed_part_is_rejected_and_sent_again(pair: Pair) -> None:
    """MIRROR_FAULT=corrupt flips a bit of checkpoint 7's last sealed part: the standby
    refuses it (its tag), says which checkpoint, REJECTs it, and takes the resend."""
    n = 12
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(n), env={"MIRROR_FAULT": "corrupt:7"})
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == n and s)
    assert st_a["summary"]["rejects"] == 1 and st_b["rejected"] == 1
    log = b.log_path.read_text()
    assert "checkpoint 7 part 0 rejected: checkpoint 7 part 0: its sealed data part" in log
    assert "does not verify" in log
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()


@pytest.mark.pair_config(replace(SMALL, link=replace(SMALL.link, bulk_port=free_ports(1)[0])))
def test_a_configured_pages_port_is_the_one_used(pair: Pair) -> None:
    port = pair.cfg_b.link.bulk_port
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", "8")
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)
    st_b = pair.wait("B at 8", lambda: (s := b.status()) and s["committed"] == 8 and s)
    assert st_b["pages_port"] == port and st_b["sealed_parts"] >= 16, st_b
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
