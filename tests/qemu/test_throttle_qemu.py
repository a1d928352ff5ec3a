"""The throttle's mechanism on a real QEMU guest (TCG): its vCPU threads (QMP
query-cpus-fast) go into a cgroup of mirror's whose CPU quota follows the speed asked,
while QEMU's other threads stay out; the cgroup goes when the guest stops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.guests.qemu import QemuGuest
from mirror.guests.synthetic import SHM_DIR
from tests.integration.test_cpulimit import cpu_share
from tests.qemu.conftest import qemu_base

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


def test_qemu_vcpu_threads_are_held_to_the_speed_asked(guest_image: Path, tmp_path: Path) -> None:
    cfg = qemu_base(guest_image, ram_mib=128)
    ram = SHM_DIR / f"mirror-thrqemu-{os.getpid()}.ram"
    g = QemuGuest.boot(cfg.qemu, cfg.guest.ram_mib, ram, tmp_path / "qemu", lambda out: None)
    try:
        g.resume()  # the kernel boots: TCG keeps its vCPU thread busy
        blocker = g.throttle_blocker()
        if blocker is not None and "cgroup" in blocker and os.geteuid() != 0:
            pytest.skip(blocker)
        assert blocker is None, blocker
        limit = g._cpulimit
        assert limit is not None and limit.group.is_dir()
        vcpus = [int(c["thread-id"]) for c in g.command("query-cpus-fast")]
        assert limit.tids == vcpus and g.proc.pid not in vcpus  # the vCPUs, not QEMU's main
        g.set_speed(0.1)
        assert limit.quota_file.read_text().split()[0] == str(int(0.1 * 100_000 * len(vcpus)))
        held = cpu_share(vcpus[0], 2.0)
        assert held <= 0.2, held
        g.set_speed(1.0)
        assert limit.quota_file.read_text().split()[0] in ("max", "-1")
    finally:
        g.stop()
    assert not limit.group.exists()  # the cgroup went with the guest
