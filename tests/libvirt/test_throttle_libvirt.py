"""The throttle's mechanism for a libvirt domain, with a real private libvirtd: the
domain's live vCPU quota (virDomainSetSchedulerParameters vcpu_quota) is set to the
speed asked and put back to the domain's own on release."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.lab.demo import free_ports
from mirror.lab.libvirtlab import domain_xml
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(300)]


def kernel_quotas(pid: int | None) -> set[int]:
    """The CFS quotas (µs) of the cpu cgroups that QEMU's threads are in (v1 or v2)."""
    assert pid is not None
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for f in (Path("/sys/fs/cgroup/cpu") / path.lstrip("/") / "cpu.cfs_quota_us",
                      Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.max"):  # fmt: skip
                if ("cpu" in controllers.split(",") or controllers == "") and f.is_file():
                    first = f.read_text().split()[0]
                    if first.lstrip("-").isdigit():
                        found.add(int(first))
    return found


def test_a_domains_vcpu_quota_follows_the_throttle(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    import libvirt

    from mirror.config import LibvirtConfig
    from mirror.guests.libvirt import LibvirtGuest

    h = libvirt_host("A")
    conn = h.connect()
    dom = conn.createXML(domain_xml("web01", guest_image, nic_port=free_ports(1)[0]), 0)
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    own = dom.schedulerParametersFlags(live)
    g = LibvirtGuest.attach(LibvirtConfig(domain="web01", connect=h.uri, qmp="libvirt"), 128,
                            lambda out: None)  # fmt: skip
    try:
        blocker = g.throttle_blocker()
        assert blocker is None, blocker
        g.set_speed(0.2)
        now = dom.schedulerParametersFlags(live)
        assert now["vcpu_quota"] == int(0.2 * (now["vcpu_period"] or 100_000)), now
        assert 20_000 in kernel_quotas(h.qemu_pid("web01"))  # the kernel holds it
        g.set_speed(1.0)
        back = dom.schedulerParametersFlags(live)
        assert back["vcpu_quota"] == own["vcpu_quota"] or (
            own["vcpu_quota"] <= 0 and back["vcpu_quota"] <= 0
        ), (own, back)
    finally:
        g.stop()
