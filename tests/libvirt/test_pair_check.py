"""`mirror pair --check` and the definition changes `mirror pair`/`unpair` make, against a
real (private) libvirtd: the check reads what libvirt says, changes nothing, and the
domain's XML comes back exactly as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirror.guests.libvirtdom import Domains
from mirror.lab.libvirtlab import domain_xml
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(180)]


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=120)


def inactive(conn: object, name: str) -> str:
    import libvirt

    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def test_check_and_restore_on_a_real_libvirtd(libvirt_host: HostFactory, tmp_path: Path) -> None:
    h = libvirt_host("A")
    conn = h.connect()
    img = tmp_path / "img"  # defining does not read the kernel
    good = domain_xml("web01", img, nic_port=5555)
    bad = (
        domain_xml("legacy", img, nic_port=5556)
        .replace("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>",
                 "")
        .replace("<memballoon model='none'/>",
                 "<interface type='user'><mac address='52:54:00:00:00:09'/>"
                 "<model type='e1000'/></interface>")
    )  # fmt: skip
    conn.defineXML(good)
    conn.defineXML(bad)
    before = {n: inactive(conn, n) for n in ("web01", "legacy")}

    r = mirror("pair", "web01", "--check", "--connect", h.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "web01: can be mirrored" in r.stdout

    r = mirror("pair", "legacy", "--check", "--connect", h.uri)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    # libvirt added a virtio balloon to the definition: the check sees what libvirt has
    for code in ("ram-not-shared-file", "balloon", "nics", "nic-type", "nic-model"):
        assert f"[{code}]" in out, out
    assert "<memballoon model='none'/>" in out and "<access mode='shared'/>" in out
    assert out.count("why: ") >= 5 and out.count("change: ") >= 5

    r = mirror("pair", "nosuch", "--check", "--connect", h.uri)
    assert r.returncode == 2 and "no domain 'nosuch'" in r.stderr and "legacy" in r.stderr
    r = mirror("pair", "web01", "--check", "--connect", "qemu+unix:///system?socket=/nonexistent")
    assert r.returncode == 2 and "cannot connect to libvirt" in r.stderr

    # --check changed nothing
    assert {n: inactive(conn, n) for n in ("web01", "legacy")} == before

    # what pair does to the definition, and what unpair gives back, byte for byte
    conn.lookupByName("web01").setAutostart(1)
    original = inactive(conn, "web01")
    with Domains(h.uri) as lv:
        saved = lv.inactive_xml("web01")
        assert saved == original and lv.facts("web01")["autostart"]
        lv.mark_paired("web01", "hostB")
        marked = inactive(conn, "web01")
        assert marked != original and 'peer="hostB"' in marked
        assert not lv.facts("web01")["autostart"]
        lv.restore("web01", saved, True)
    assert inactive(conn, "web01") == original
    assert conn.lookupByName("web01").autostart() == 1
    for n in ("web01", "legacy"):
        conn.lookupByName(n).undefine()
