"""Fixtures that run real hosts: each `mirror` role is its own process group."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mirror.config import CheckpointConfig, Config, GuestConfig
from mirror.lab.demo import Host, pair_configs, wait_for
from mirror.lab.observer import Observer

SHM = Path("/dev/shm")


def shm_files(pair_name: str = "") -> set[str]:
    return {p.name for p in SHM.glob(f"mirror-{pair_name}*")}


@pytest.fixture
def pair_name() -> str:
    """A pair name of this test's own, so that its /dev/shm files are its own too
    (several test runs may share a machine)."""
    return f"t{os.getpid()}x{next(_names)}"


_names = itertools.count()


@pytest.fixture
def no_leftovers(pair_name: str) -> Iterator[None]:
    yield
    time.sleep(0.1)
    left = shm_files(pair_name)
    assert not left, f"a test left files in /dev/shm: {sorted(left)}"


class Pair:
    def __init__(self, root: Path, base: Config, name: str) -> None:
        self.root = root
        self.observer = Observer()
        base = replace(base, pair=replace(base.pair, name=name))
        self.cfg_a, self.cfg_b = pair_configs(root, base, f"127.0.0.1:{self.observer.port}")
        self.hosts: list[Host] = []

    def start_secondary(self) -> Host:
        b = Host("hostB", "secondary", self.cfg_b, self.root)
        self.hosts.append(b)
        wait_for("the secondary", b.status, 30, self.hosts)
        return b

    def start_primary(self, *extra: str, env: dict[str, str] | None = None) -> Host:
        a = Host("hostA", "primary", self.cfg_a, self.root, *extra, env=env)
        self.hosts.append(a)
        return a

    def wait(
        self,
        what: str,
        cond: Callable[[], Any],
        timeout: float = 30,
        alive: list[Host] | None = None,
    ) -> Any:
        """Wait for ``cond``; fail early if a host that should live (all, by default) exits."""
        return wait_for(what, cond, timeout, self.hosts if alive is None else alive)

    def close(self) -> None:
        for h in reversed(self.hosts):
            h.signal(signal.SIGCONT)
            h.stop()
        self.observer.close()


SMALL = replace(
    Config(),
    guest=replace(GuestConfig(), ram_mib=16, dirty_pages_per_s=4000, outputs_per_s=200),
    checkpoint=replace(CheckpointConfig(), epoch_ms=30),
)


@pytest.fixture
def pair(
    request: pytest.FixtureRequest, tmp_path: Path, pair_name: str, no_leftovers: None
) -> Iterator[Pair]:
    """A pair of hosts; a test marked ``pair_config(cfg)`` gets that configuration."""
    marker = request.node.get_closest_marker("pair_config")
    p = Pair(tmp_path, marker.args[0] if marker else SMALL, pair_name)
    try:
        yield p
    finally:
        p.close()
    for h in p.hosts:  # every process of every group is gone
        with pytest.raises(ProcessLookupError):
            os.killpg(h.proc.pid, 0)


def log_events(text: str, name: str) -> list[dict[str, Any]]:
    """The structured events called ``name`` in a role's log text (its JSON lines)."""
    found = []
    for line in text.splitlines():
        start = line.find('{"event": ')
        if start >= 0:
            obj = json.loads(line[start:])
            if obj["event"] == name:
                found.append(obj)
    return found
