"""Fixtures for real QEMU guests (TCG): the guest image, and pairs of hosts running them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import Config, QemuConfig
from mirror.guests import image
from mirror.lab.netlab import NetLabUnavailable, check_capable
from tests.chaos.conftest import no_leftovers, pair_factory, pair_name  # noqa: F401 (fixtures)

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def guest_image() -> Path:
    """The demo guest (built once into the image cache; reused while its recipe holds)."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (scripts/setup installs qemu-system-x86)")
    return image.ensure(image.DEFAULT_DIR, say=lambda m: None)


def qemu_base(img: Path, *, ram_mib: int = 128, epoch_ms: int = 50) -> Config:
    base = Config()
    return replace(
        base,
        guest=replace(base.guest, kind="qemu", ram_mib=ram_mib),
        qemu=QemuConfig(kernel=str(image.kernel(img)), initrd=str(img / "initramfs.cpio.gz")),
        checkpoint=replace(base.checkpoint, epoch_ms=epoch_ms),
    )


def qemu_pid_gone(run_dir: Path) -> bool:
    """Whether the QEMU that wrote ``run_dir/qemu.pid`` has exited."""
    try:
        pid = int((run_dir / "qemu.pid").read_text())
    except (OSError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def root_or_skip() -> Iterator[None]:
    """Namespaces and TAP devices: root (CI runs as root), `ip`, /dev/net/tun."""
    try:
        check_capable()
    except NetLabUnavailable as e:
        pytest.skip(f"{e} (CI runs as root)")
    yield
