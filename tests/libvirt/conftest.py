"""Fixtures for real libvirt: each simulated host runs its own libvirtd and virtlogd
(mirror/lab/libvirtlab.py); everything they started is gone after the test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirror.lab.libvirtlab import LibvirtHost, LibvirtUnavailable, check_capable
from tests.qemu.conftest import guest_image  # noqa: F401 (fixture)

HostFactory = Callable[..., LibvirtHost]


@pytest.fixture
def libvirt_host(tmp_path: Path) -> Iterator[HostFactory]:
    """``libvirt_host(name, netns=None)``: a started private libvirtd; closed after the
    test, and checked: no QEMU, daemon, mount or RAM file of it left."""
    try:
        check_capable()
    except LibvirtUnavailable as e:
        pytest.skip(f"{e} (CI runs as root with scripts/setup's packages)")
    made: list[LibvirtHost] = []

    def make(name: str = "A", *, netns: str | None = None) -> LibvirtHost:
        h = LibvirtHost(tmp_path, name, netns=netns)
        made.append(h)
        return h

    yield make
    pids: list[int] = []
    for h in made:
        pids += h.qemu_pids()
        holder = h._holder.pid if h._holder is not None else None
        h.close()
        assert not h.root.exists() and not h.ram_dir.exists(), f"host {h.name} left files"
        if holder is not None:
            with pytest.raises(ProcessLookupError):
                os.killpg(holder, 0)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
