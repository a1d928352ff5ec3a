"""The test rig itself: a private libvirtd per simulated host runs the demo guest as a
domain whose RAM mirror can map, and leaves nothing behind."""

from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

import pytest

from mirror.lab.libvirtlab import domain_xml
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(180)]


def test_a_domain_with_shared_file_ram_runs_on_a_private_libvirtd(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    import libvirt_qemu

    with GuestLan() as lan:
        h = libvirt_host("A", netns=lan.ns["A"])
        serial = h.root / "serial.log"
        dom = h.connect().createXML(domain_xml("web01", guest_image, serial=serial), 0)
        pid = h.qemu_pid("web01")
        assert pid is not None and dom.isActive()
        # QEMU runs in host A's network namespace
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink(
            f"/proc/{h._holder.pid}/ns/net"  # type: ignore[union-attr]
        )
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        answer = libvirt_qemu.qemuMonitorCommand(
            dom,
            json.dumps(
                {"execute": "qom-get",
                 "arguments": {"path": "/objects/pc.ram", "property": "mem-path"}}
            ),
            0,
        )  # fmt: skip
        ram = Path(json.loads(answer)["return"])
        assert ram.is_relative_to(h.ram_dir) and ram.stat().st_size == 128 << 20
        # what the guest writes, a process outside the namespace sees in the file
        deadline = time.monotonic() + 90
        while "guestd: tick" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline, serial.read_text()[-500:]
            time.sleep(0.2)
        with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m.find(b"guestd") >= 0
        # a libvirtd restart keeps the domain running
        h.restart_libvirtd()
        assert h.connect().lookupByName("web01").isActive() and h.qemu_pid("web01") == pid
