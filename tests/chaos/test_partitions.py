"""Partitions in real network namespaces: the interconnect cut; host A cut off from all.

The observer runs in the root namespace and sees both hosts; the shared
storage is a directory both reach, host A through a symlink that the test can
break to take storage away from A alone.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import Config
from mirror.lab.demo import Host, free_ports, wait_for, with_keys
from mirror.lab.observer import Observer
from tests.chaos.netlab import NetLab, NetLabUnavailable
from tests.chaos.test_host_kills import CHAOS

pytestmark = pytest.mark.chaos


class PartitionedPair:
    def __init__(self, lab: NetLab, root: Path, base: Config, name: str) -> None:
        self.lab, self.root = lab, root
        base = replace(base, pair=replace(base.pair, name=name))
        self.observer = Observer("0.0.0.0")
        shared = root / "shared"
        shared.mkdir()
        self.storage_a = root / "storage-a"
        self.storage_a.symlink_to(shared)
        data, hb = free_ports(2)
        link = replace(base.link, host="10.77.0.2", data_port=data, heartbeat_port=hb)
        port = self.observer.port

        def host_cfg(name: str, octet: int, storage: Path) -> Config:
            return replace(
                base,
                link=link,
                node=replace(base.node, name=name, state_dir=str(root / name)),
                output=replace(base.output, observer=f"10.78.{octet}.1:{port}"),
                arbiter=replace(base.arbiter, dir=str(storage)),
            )

        self.cfg_a, self.cfg_b = with_keys(
            root / "keys", host_cfg("hostA", 1, self.storage_a), host_cfg("hostB", 2, shared)
        )
        self.hosts: list[Host] = []

    def start(self) -> tuple[Host, Host]:
        b = Host("hostB", "secondary", self.cfg_b, self.root, prefix=self.lab.prefix("B"))
        self.hosts.append(b)
        wait_for("the secondary", b.status, 30, self.hosts)
        a = Host("hostA", "primary", self.cfg_a, self.root, prefix=self.lab.prefix("A"))
        self.hosts.append(a)
        wait_for("outputs", lambda: self.observer.count() > 40, 30, self.hosts)
        return a, b

    def cut_storage_of_a(self) -> None:
        self.storage_a.unlink()
        self.storage_a.write_text("storage unreachable from host A")

    def close(self) -> None:
        for h in reversed(self.hosts):
            h.signal(signal.SIGCONT)
            h.stop()
        self.observer.close()


@pytest.fixture
def partitioned(tmp_path: Path, pair_name: str, no_leftovers: None) -> Iterator[PartitionedPair]:
    try:
        lab = NetLab()
    except NetLabUnavailable as e:
        pytest.skip(str(e))
    pair = None
    try:
        pair = PartitionedPair(lab, tmp_path, CHAOS, pair_name)
        yield pair
    finally:
        if pair:
            pair.close()
        lab.close()


def gapless(pair: PartitionedPair) -> None:
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)), "outputs lost or repeated"
    assert not pair.observer.seen.interleaved(), "two sources interleaved"


def test_interconnect_cut_no_promotion_primary_runs_on(partitioned: PartitionedPair) -> None:
    a, b = partitioned.start()
    partitioned.lab.cut_interconnect()
    cut = time.monotonic()
    wait_for(
        "host A to go unprotected",
        lambda: (s := a.status()) and s.get("phase") == "unprotected",
        15,
        [a, b],
    )
    took = time.monotonic() - cut
    count = partitioned.observer.count()
    wait_for(
        "host A's outputs running on",
        lambda: partitioned.observer.count() > count + 100,
        15,
        [a, b],
    )
    time.sleep(1.0)
    st = b.status() or {}
    assert st.get("role") == "secondary", f"host B promoted during a partition: {st}"
    assert "interconnect cut" in b.log_path.read_text()
    gapless(partitioned)
    assert took < 5, f"host A took {took:.1f} s to go unprotected"


def test_primary_cut_off_from_everything_fences_and_b_promotes(
    partitioned: PartitionedPair,
) -> None:
    a, b = partitioned.start()
    partitioned.cut_storage_of_a()
    partitioned.lab.cut_interconnect()
    wait_for(
        "host B to promote",
        lambda: (
            (s := b.status()) and s.get("role") == "primary" and s.get("failover_ms") is not None
        ),
        20,
        [b],
    )
    a.proc.wait(20)  # A fences itself after the fence timeout
    assert a.proc.returncode == 3, f"host A did not fence (exit {a.proc.returncode})"
    assert '"event": "fenced"' in a.log_path.read_text()
    count = partitioned.observer.count()
    wait_for("host B's outputs", lambda: partitioned.observer.count() > count + 50, 15, [b])
    gapless(partitioned)
    seen = partitioned.observer.seen
    first_b = seen.sources.index(1)
    assert all(src == 0 for src in seen.sources[:first_b])  # A's, then only B's
