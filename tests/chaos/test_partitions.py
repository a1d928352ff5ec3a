"""Partitions in real network namespaces: the interconnect cut; host A cut off from all.

The observer runs in the root namespace and sees both hosts; the shared
storage is a directory both reach, host A through a symlink that the test can
break to take storage away from A alone.  With ``separate`` each host has a local
arbiter folder of its own instead (a misconfiguration: two arbiters), which must
never give two primaries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
    def __init__(
        self, lab: NetLab, root: Path, base: Config, name: str, separate: bool = False
    ) -> None:
        self.lab, self.root = lab, root
        base = replace(base, pair=replace(base.pair, name=name))
        self.observer = Observer("0.0.0.0")
        shared = root / "shared"
        shared.mkdir()
        self.storage_a = root / "storage-a"
        if separate:  # each host a local folder of its own: B's is "shared", A's its own
            self.storage_a.mkdir()
        else:
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
def partitioned(
    request: pytest.FixtureRequest, tmp_path: Path, pair_name: str, no_leftovers: None
) -> Iterator[PartitionedPair]:
    """A partitionable pair; indirect parametrisation "separate" gives each host a local
    arbiter folder of its own."""
    try:
        lab = NetLab()
    except NetLabUnavailable as e:
        pytest.skip(str(e))
    pair = None
    try:
        separate = getattr(request, "param", "") == "separate"
        pair = PartitionedPair(lab, tmp_path, CHAOS, pair_name, separate)
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


def running_guests(host: Host) -> list[int]:
    """The guest processes of ``host`` that run a guest: a synthetic guest process of its
    process group that has a guest's RAM (a /dev/shm/mirror-* file) mapped and is not
    stopped.  A ready standby's process has none mapped until it is promoted."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != host.proc.pid:
                continue
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            if b"mirror.guests.synthetic" not in cmd:
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            maps = (d / "maps").read_text()
        except (OSError, ProcessLookupError):
            continue  # gone meanwhile
        if state not in ("T", "t", "Z", "X") and "/dev/shm/mirror-" in maps:
            pids.append(int(d.name))
    return pids


def mirror_status(host: Host) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "status", "--config", str(host.config_path)],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


@pytest.mark.parametrize("partitioned", ["separate"], indirect=True)
def test_two_local_arbiter_folders_and_a_cut_never_run_two_guests(
    partitioned: PartitionedPair,
) -> None:
    """The arbiter misconfigured as a local folder on each host: neither ever sees the
    other's slot.  The pair says it is not protected, and why, from the start; when the
    interconnect is cut, B does not promote (the primary's silence on an arbiter it never
    saw it use is no evidence) and A claims nothing and holds its outputs (a claim won
    at its own folder proves nothing): at most one guest runs.  Healed, the pair goes
    on, gapless."""
    a, b = partitioned.start()
    assert partitioned.cfg_a.arbiter.dir != partitioned.cfg_b.arbiter.dir
    why = "peer's storage slot never seen on this arbiter"
    for h in (a, b):  # not protected, and why, before anything fails
        wait_for(f"{h.name} to say it is not protected",
                 lambda h=h: (s := h.status()) and why in str(s.get("arbiter_unverified")),
                 10, [a, b])  # fmt: skip
        out = mirror_status(h)
        assert "protection: unverified" in out and f"not protected: {why}" in out, out
    assert len(running_guests(a)) == 1 and running_guests(b) == []

    partitioned.lab.cut_interconnect()
    cut_count = partitioned.observer.count()
    silent = partitioned.cfg_a.arbiter.silent_after_ms / 1000
    fence = partitioned.cfg_a.arbiter.fence_after_ms / 1000
    end = time.monotonic() + silent + fence + 3  # past every timeout that could act
    while time.monotonic() < end:
        assert running_guests(b) == [], "host B runs a second guest"
        assert len(running_guests(a)) == 1, "host A's guest stopped"
        time.sleep(0.2)
    wait_for("host A to hold", lambda: (s := a.status()) and s.get("protection") == "holding",
             5, [a, b])  # fmt: skip
    assert a.proc.poll() is None and b.proc.poll() is None
    sa, sb = a.status() or {}, b.status() or {}
    assert (sa.get("role"), sa.get("protection")) == ("primary", "holding"), sa
    assert (sb.get("role"), sb.get("protection")) == ("secondary", "unverified"), sb
    out_a, out_b = mirror_status(a), mirror_status(b)
    assert "protection: holding" in out_a and f"not protected: {why}" in out_a, out_a
    assert "protection: unverified" in out_b and f"not protected: {why}" in out_b, out_b
    seen = partitioned.observer.seen
    assert 1 not in seen.sources, "host B's guest released outputs"
    held = partitioned.observer.count()
    assert held - cut_count < 100, "host A released outputs with no standby and no claim"
    log_a, log_b = a.log_path.read_text(), b.log_path.read_text()
    assert "claiming nothing" in log_a and "claim-unprotected" not in log_a
    assert "no evidence that it is dead" in log_b and "claim-promote" not in log_b
    # an operator's failover on B is refused too: A's slot is not on B's arbiter
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "failover", "--config", str(b.config_path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 1 and "storage slot is not on this arbiter" in run.stderr, run
    assert (b.status() or {}).get("role") == "secondary" and running_guests(b) == []
    for root in (partitioned.storage_a, partitioned.root / "shared"):  # no claim anywhere
        assert not list((root / partitioned.cfg_a.pair.name / "claims").iterdir())

    lab = partitioned.lab  # healed: the held outputs go out, in order, and on
    lab.run("A", "ip", "link", "set", lab.ic["A"], "up")
    wait_for("host A's outputs again", lambda: partitioned.observer.count() > held + 100,
             60, [a, b])  # fmt: skip
    assert running_guests(b) == [] and (b.status() or {}).get("role") == "secondary"
    gapless(partitioned)
