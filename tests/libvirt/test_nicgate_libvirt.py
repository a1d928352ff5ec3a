"""The NIC gate on a real libvirt domain: ``<interface type='bridge'>``, the tap libvirt
made, QEMU (TCG) behind it; the XML untouched; a libvirtd restart leaves the gate on."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

from mirror.lab.gatelab import GUEST_IP, GUEST_MAC, GateLab
from mirror.lab.libvirtlab import domain_xml
from mirror.lab.netlab import NetLabUnavailable
from mirror.replication.nicgate import NicGate
from tests.libvirt.conftest import HostFactory
from tests.nicgate.test_nicgate import Held

pytestmark = [pytest.mark.libvirt, pytest.mark.slow, pytest.mark.timeout(240)]


def bridge_nic_xml(name: str, image: Path, serial: Path) -> str:
    xml = domain_xml(name, image, serial=serial, mac=GUEST_MAC)
    nic = (
        f"<interface type='bridge'><mac address='{GUEST_MAC}'/><source bridge='br0'/>"
        f"<model type='virtio'/><rom enabled='no'/></interface>"
    )
    return xml.replace("<memballoon", nic + "\n    <memballoon")


def nic_of(xml: str) -> str:
    m = re.search(r"<interface.*?</interface>", xml, re.S)
    assert m, xml
    return m.group(0)


def tc_state(lab: GateLab, dev: str) -> str:
    return lab.run("H", "tc", "qdisc", "show", "dev", dev) + lab.run(
        "H", "tc", "filter", "show", "dev", dev, "ingress"
    )


def recv_line(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    try:
        return conn.recv(100)
    except TimeoutError:
        return b""


def test_a_bridged_domain_s_frames_are_held_and_survive_a_libvirtd_restart(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    try:
        lab = GateLab(veth_guest=False)  # the guest is libvirt's
    except NetLabUnavailable as e:
        pytest.skip(f"{e} (needs root; CI runs as root)")
    with lab:
        h = libvirt_host("A", netns=lab.ns["H"])
        serial = h.root / "serial.log"
        conn = h.connect()
        dom = conn.createXML(bridge_nic_xml("web01", guest_image, serial), 0)
        xml_before = dom.XMLDesc(0)
        m = re.search(r"<target dev='([^']+)'", xml_before)
        assert m, xml_before
        tap = m.group(1)
        deadline = time.monotonic() + 120
        while "guestd: tick" not in serial.read_text(errors="replace"):
            assert time.monotonic() < deadline, serial.read_text()[-500:]
            time.sleep(0.2)
        lab.run("C", "ip", "neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC, "dev", "eth0")
        before = tc_state(lab, tap)

        held = Held()
        with lab.inside("H"):
            gate = NicGate(tap, "br0", GUEST_MAC, held).install()
        try:
            with lab.inside("C"):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(1.0)
            with pytest.raises(TimeoutError):  # the guest's answer to the SYN is held
                client.connect((GUEST_IP, 7000))
            assert held.outputs, "the guest's frames were handed to the gate"

            def release_all() -> None:
                with lab.inside("H"):
                    gate.release(held.take())

            client.settimeout(None)
            client.setblocking(False)
            for _ in range(200):
                release_all()
                if client.connect_ex((GUEST_IP, 7000)) in (0, 106):  # connected / EISCONN
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("no connection through the gate")
            client.setblocking(True)
            line = b""
            for _ in range(100):
                release_all()
                line = recv_line(client, 0.05)
                if line:
                    break
            assert line.startswith(b"n="), line

            assert dom.XMLDesc(0) == xml_before, "the gate changes nothing in the domain"

            # paused guest: after drain() nothing more comes from it
            dom.suspend()
            with lab.inside("H"):
                gate.drain()
            n = len(held.outputs)
            time.sleep(0.5)
            assert len(held.outputs) == n, "a paused guest's frame came after drain()"
            dom.resume()

            # libvirtd restarts: the gate stays, the guest's frames are still held
            on = tc_state(lab, tap)
            h.restart_libvirtd()
            dom = h.connect().lookupByName("web01")
            assert dom.isActive()
            assert tc_state(lab, tap) == on
            release_all()
            while recv_line(client, 0.3):  # what was released: read it all
                pass
            held.take()  # (frames after take() are released below, in order)
            assert recv_line(client, 1.5) == b"", "a frame left the guest unreleased"
            assert held.outputs, "the guest's lines were held meanwhile"
            got = b""
            for _ in range(100):
                release_all()
                got += recv_line(client, 0.05)
                if b"n=" in got:
                    break
            assert b"n=" in got, "released: the lines go on"
        finally:
            with lab.inside("H"):
                gate.remove()
        assert tc_state(lab, tap) == before
        # (libvirtd's restart re-renders an unrelated USB controller; the NIC is as made)
        assert nic_of(dom.XMLDesc(0)) == nic_of(xml_before)
        assert recv_line(client, 3.0), "after remove(): the guest's lines come directly"
        client.close()
        dom.destroy()


def test_a_dead_run_s_gate_is_removed_by_the_agent_s_cleanup_unless_still_paired(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """A role killed with its gate on holds its guest's frames (fail closed): `mirror
    unpair` (cleanup.ungate) and the agent's start (cleanup.ungate_unpaired, for domains
    no longer paired) remove that gate; a domain still paired keeps it (its next run
    takes it over)."""
    import signal
    import subprocess
    import sys

    from mirror.ha import cleanup
    from tests.nicgate.test_nicgate import _DEAD_RUN

    try:
        lab = GateLab(veth_guest=False)
    except NetLabUnavailable as e:
        pytest.skip(f"{e} (needs root; CI runs as root)")
    with lab:
        h = libvirt_host("A", netns=lab.ns["H"])
        dom = h.connect().createXML(bridge_nic_xml("web01", guest_image, h.root / "s.log"), 0)
        m = re.search(r"<target dev='([^']+)'", dom.XMLDesc(0))
        assert m
        tap = m.group(1)
        before = tc_state(lab, tap)
        for how in ("unpair", "agent start"):
            proc = subprocess.Popen(
                ["ip", "netns", "exec", lab.ns["H"], sys.executable, "-c", _DEAD_RUN, tap,
                 GUEST_MAC], stdout=subprocess.PIPE, text=True, start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )  # fmt: skip
            try:
                assert proc.stdout is not None and proc.stdout.readline() == "installed\n"
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            held = tc_state(lab, tap)
            assert "mirror_hold" in held
            with lab.inside("H"):
                assert cleanup.ungate_unpaired(h.uri, ["web01"]) == []  # still paired
                assert tc_state(lab, tap) == held
                if how == "unpair":
                    assert cleanup.ungate(h.uri, "web01") == [tap]
                else:
                    assert cleanup.ungate_unpaired(h.uri, ["other"]) == [tap]
            assert tc_state(lab, tap) == before, how
        dom.destroy()
