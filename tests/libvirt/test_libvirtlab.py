"""The test rig itself: a private libvirtd per simulated host runs the demo guest as a
domain whose RAM mirror can map, and leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.lab.demo import free_ports
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


def test_the_primary_refuses_a_domain_it_cannot_mirror_and_says_what_to_change(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    from mirror.config import LibvirtConfig
    from mirror.guests.base import GuestError
    from mirror.guests.libvirt import LibvirtGuest

    h = libvirt_host("A")
    conn = h.connect()
    anon = domain_xml("anon", guest_image, nic_port=free_ports(1)[0]).replace(
        "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", ""
    )
    conn.createXML(anon, 0)
    s = LibvirtConfig(domain="anon", connect=h.uri, qmp="libvirt")
    with pytest.raises(GuestError, match=r"private anonymous memory .*mirror pair anon --prepare"):
        LibvirtGuest.attach(s, 128, lambda out: None)
    with pytest.raises(GuestError, match="no <qemu:commandline> -qmp"):
        LibvirtGuest.attach(replace(s, qmp="socket"), 128, lambda out: None)
    with pytest.raises(GuestError, match="no domain 'nope'"):
        LibvirtGuest.attach(replace(s, domain="nope"), 128, lambda out: None)
    conn.defineXML(domain_xml("off", guest_image, nic_port=5600))
    with pytest.raises(GuestError, match="'off' is not running"):
        LibvirtGuest.attach(replace(s, domain="off"), 128, lambda out: None)
    conn.createXML(domain_xml("big", guest_image, nic_port=free_ports(1)[0]), 0)
    with pytest.raises(GuestError, match=r"has 128 MiB of RAM but guest\.ram_mib = 256"):
        LibvirtGuest.attach(replace(s, domain="big"), 256, lambda out: None)
    # nothing was changed: both running domains still run
    assert conn.lookupByName("anon").isActive() and conn.lookupByName("big").isActive()
    assert conn.lookupByName("big").state()[0] == 1  # running, not left paused


def test_a_standby_runs_over_this_hosts_definition_and_discarding_it_leaves_that(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    from mirror.config import LibvirtConfig
    from mirror.guests.libvirt import LibvirtGuest

    h = libvirt_host("B")
    conn = h.connect()
    xml = domain_xml("web01", guest_image, nic_port=free_ports(1)[0])
    conn.defineXML(xml)
    before = conn.lookupByName("web01").XMLDesc(2)  # inactive
    g = LibvirtGuest.ready(LibvirtConfig(domain="web01", connect=h.uri, qmp="libvirt"), 128)
    dom = conn.lookupByName("web01")
    assert dom.isActive() and dom.state()[0] == 3  # paused, waiting for its state
    status = g.command("query-status")["status"]
    assert status == "inmigrate", status
    assert g.relay is not None and not g.relay.active  # frames from the LAN are dropped
    g.stop()
    dom = conn.lookupByName("web01")
    assert not dom.isActive() and dom.XMLDesc(2) == before


def test_how_an_attached_domain_ended_is_told_apart(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    import signal

    from mirror.config import LibvirtConfig
    from mirror.guests.base import GuestError
    from mirror.guests.libvirt import LibvirtGuest

    h = libvirt_host("A")
    conn = h.connect()
    seen = {}
    for name, end in (("quit", "quit"), ("destroy", "destroy"), ("kill", "kill")):
        # persistent: libvirt keeps a stopped transient domain's state nowhere
        conn.defineXML(domain_xml(name, guest_image, nic_port=free_ports(1)[0])).create()
        g = LibvirtGuest.attach(
            LibvirtConfig(domain=name, connect=h.uri, qmp="libvirt"), 128, lambda out: None
        )
        g.resume()
        assert g.alive and g.end_reason() is None
        if end == "quit":  # QEMU ends cleanly, as when the guest powers off
            with contextlib.suppress(GuestError):  # QEMU may go before it answers
                g.command("quit")
        elif end == "destroy":
            conn.lookupByName(name).destroy()
        else:
            pid = h.qemu_pid(name)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while g.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seen[end] = g.end_reason()
        g.stop()
    assert seen == {"quit": "shutdown", "destroy": "destroyed", "kill": "crashed"}
