"""`mirror pair --check` and the definition changes `mirror pair`/`unpair` make, against a
real (private) libvirtd: the check reads what libvirt says, changes nothing, and the
domain's XML comes back exactly as it was."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mirror.guests.libvirtdom import Domains
from mirror.lab.demo import free_ports
from mirror.lab.libvirtdemo import agent_toml
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


def test_check_and_restore_on_a_real_libvirtd(libvirt_host: HostFactory, tmp_path: Path,
                                             guest_image: Path) -> None:
    h = libvirt_host("A")
    conn = h.connect()
    img = tmp_path / "img"  # defining does not read the kernel
    good = domain_xml("web01", guest_image, nic_port=free_ports(1)[0])
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
    # --check checks what pair checks: the agent's configuration and the peer too
    agent = tmp_path / "agent.toml"
    agent.write_text(agent_toml(tmp_path, "A", "B", h.uri))
    r = mirror("pair", "web01", "--check", "--connect", h.uri, "--agent-config",
               str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "missing.toml" in r.stderr, r.stdout + r.stderr
    (tmp_path / "bad.toml").write_text("[agent]\nnode = 3\n")
    r = mirror("pair", "web01", "--check", "--agent-config", str(tmp_path / "bad.toml"))
    assert r.returncode == 2 and "bad.toml" in r.stderr, r.stdout + r.stderr
    r = mirror("pair", "web01", "--check", "--peer", "hostZ", "--agent-config", str(agent))
    assert r.returncode == 2 and "unknown peer 'hostZ'" in r.stderr, r.stdout + r.stderr
    cfg = ("--agent-config", str(agent), "--peer", "hostB")

    # mirror protects a running domain: a shut-off one is not "can be mirrored"
    r = mirror("pair", "web01", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the running guest (live XML): not running" in r.stdout
    conn.lookupByName("web01").create()
    r = mirror("pair", "web01", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("web01: can be mirrored")
    assert "its next boot (persistent definition): the same" in r.stdout

    r = mirror("pair", "legacy", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    # libvirt added a virtio balloon to the definition: the check sees what libvirt has
    # (a note: it is accepted)
    for code in ("ram-private", "balloon", "nics", "nic-type"):
        assert f"[{code}]" in out, out
    assert "note: a memory balloon <memballoon model='virtio'>" in out
    assert "--prepare" in out and "<access mode='shared'/>" in out
    assert out.count("why: ") >= 5 and out.count("change: ") >= 5

    r = mirror("pair", "nosuch", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 2 and "no domain 'nosuch'" in r.stderr and "legacy" in r.stderr
    r = mirror("pair", "web01", "--check", "--connect", "qemu+unix:///system?socket=/nonexistent",
               *cfg)
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


def _without(xml: str, *tags: str) -> str:
    """``xml`` canonical, without the elements ``tags``."""
    root = ET.fromstring(xml)
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag in tags:
                parent.remove(child)
    return ET.canonicalize(ET.tostring(root, encoding="unicode"), strip_text=True)


def test_prepare_gives_an_anonymous_ram_domain_what_it_needs_at_its_next_start(
    libvirt_host: HostFactory, guest_image: Path, tmp_path: Path
) -> None:
    """What virt-install writes (no <memoryBacking>, libvirt's default virtio balloon):
    `--prepare` writes the memfd backing and the dirty-page log's preload into the
    persistent definition and nothing else; `--check` tells the running guest (restart
    needed, hashed scan) from the next boot (mirrorable, the log); after a restart it can
    be mirrored, its RAM is mapped through QEMU's memfd and the dirty-page log works."""
    from mirror.config import LibvirtConfig
    from mirror.guests.libvirt import LibvirtGuest
    from mirror.replication import dirtylog

    h = libvirt_host("A")
    conn = h.connect()
    anon = (
        domain_xml("web02", guest_image, nic_port=free_ports(1)[0])
        .replace("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>",
                 "")
        .replace("<memballoon model='none'/>", "")
    )  # fmt: skip
    dom = conn.defineXML(anon)
    dom.create()
    before = inactive(conn, "web02")
    agent = tmp_path / "agent.toml"
    agent.write_text(agent_toml(tmp_path, "A", "B", h.uri))
    cfg = ("--agent-config", str(agent), "--peer", "hostB")

    r = mirror("pair", "web02", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[ram-private]" in r.stdout and "mirror pair web02 --prepare" in r.stdout
    assert "checkpoints would use the hashed scan" in r.stdout
    assert inactive(conn, "web02") == before  # --check changes nothing

    r = mirror("pair", "web02", "--prepare", "--connect", h.uri)
    assert r.returncode == 1, r.stdout + r.stderr  # the running guest needs a restart
    out = r.stdout
    assert out.startswith("web02: its definition now has, for its next start:\n"), out
    assert out.count("\n  - ") == 2 and "source type='memfd'" in out and "LD_PRELOAD=" in out
    assert "restart web02" in out
    assert ("the running guest (live XML): 1 thing(s) to change; checkpoints would use the "
            "hashed scan") in out, out  # fmt: skip
    assert ("its next boot (persistent definition): can be mirrored; checkpoints would use "
            "the dirty-page log") in out, out  # fmt: skip
    after = inactive(conn, "web02")
    q = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    # exactly the memory backing and the preload were written, the rest is as it was
    assert _without(after, "memoryBacking", f"{q}commandline") == _without(before)
    mb = ET.fromstring(after).find("memoryBacking")
    assert mb is not None and [(c.tag, c.attrib) for c in mb] == [
        ("source", {"type": "memfd"}), ("access", {"mode": "shared"})]
    envs = [e.get("name") for e in ET.fromstring(after).iter(f"{q}env")]
    assert sorted(envs) == ["LD_PRELOAD", "MIRROR_UFFD_SOCK"]
    assert not [a for a in ET.fromstring(after).iter(f"{q}arg")]
    # a second time: nothing more to write
    r = mirror("pair", "web02", "--prepare", "--connect", h.uri)
    assert "web02: its definition has what mirror needs already" in r.stdout
    assert inactive(conn, "web02") == after

    dom.destroy()
    dom.create()
    r = mirror("pair", "web02", "--check", "--connect", h.uri, *cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("web02: can be mirrored (with 1 note(s))"), r.stdout
    assert "checkpoints would use the dirty-page log" in r.stdout
    assert "its next boot (persistent definition): the same" in r.stdout

    g = LibvirtGuest.attach(LibvirtConfig(domain="web02", connect=h.uri, qmp="libvirt"), 128,
                            lambda out: None)  # fmt: skip
    try:
        assert g.backing == "memfd" and str(g.ram_path).startswith(f"/proc/{g.pid}/fd/")
        assert g.pid == h.qemu_pid("web02") and g.log_source() is not None
        assert g.log_blockers() == []  # the balloon is watched, not a blocker
        log = dirtylog.DirtyLog(g)
        try:
            g.resume()
            deadline = time.monotonic() + 10
            while not len(log.scan()):  # the guest's own writes, through QEMU's mapping
                assert time.monotonic() < deadline
                time.sleep(0.1)
        finally:
            log.close()
        assert not g.ram_discarded()  # its balloon did not change size
    finally:
        g.detach()
    assert conn.lookupByName("web02").isActive()


def test_a_uefi_domain_gets_the_nvram_note_from_what_libvirt_says(
    libvirt_host: HostFactory, guest_image: Path, tmp_path: Path
) -> None:
    """What virt-install writes for UEFI (`<os firmware='efi'>`): libvirt 9.0 picks the
    firmware and the NVRAM file at start (they are in the live XML only); --check names
    the file in both and says it is one per host, not replicated."""
    import re

    if not Path("/usr/share/OVMF").is_dir():
        pytest.skip("no UEFI firmware here (Debian package ovmf; scripts/setup installs it)")
    h = libvirt_host("A")
    conn = h.connect()
    xml = re.sub(r"<os>.*?</os>", "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm"
                 "</type></os><features><acpi/></features>",
                 domain_xml("efi01", guest_image, nic_port=free_ports(1)[0]), flags=re.S)
    dom = conn.defineXML(xml)
    dom.createWithFlags(1)  # VIR_DOMAIN_START_PAUSED: the firmware never runs
    try:
        assert "<nvram" not in inactive(conn, "efi01") and "<nvram" in dom.XMLDesc(0)
        agent = tmp_path / "agent.toml"
        agent.write_text(agent_toml(tmp_path, "A", "B", h.uri))
        r = mirror("pair", "efi01", "--check", "--agent-config", str(agent))
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        # the live XML and the definition name the same file (libvirt's own name for it)
        assert out.count("[nvram]") == 1 and "its next boot (persistent definition): the same" \
            in out, out
        assert "the NVRAM file /var/lib/libvirt/qemu/nvram/efi01_VARS.fd, one per host" in out
        assert "not the NVRAM file nor QEMU's flash copy of it" in out
        # the standby's host takes the definition (its firmware comes from libvirt there)
        assert "the standby (no --peer given: checked here for what every host refuses): " \
            "can run" in out, out
    finally:
        dom.destroy()
        dom.undefineFlags(4)  # VIR_DOMAIN_UNDEFINE_NVRAM


def test_live_check_tries_the_running_domain_and_changes_nothing(
    libvirt_host: HostFactory, guest_image: Path, tmp_path: Path
) -> None:
    """What virt-install writes, running: `--check` alone refuses it (a restart needed);
    `--check --live` says it can be paired as it runs (its RAM read from QEMU, the log made
    inside QEMU, as the check just tried) and leaves no userfaultfd in QEMU and its
    definition as it was; paused, it is refused with one line; with --prepare, an error."""
    import os

    h = libvirt_host("A")
    conn = h.connect()
    anon = domain_xml("web03", guest_image, nic_port=free_ports(1)[0]).replace(
        "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "")
    dom = conn.defineXML(anon)
    dom.create()
    before = inactive(conn, "web03")
    agent = tmp_path / "agent.toml"
    agent.write_text(agent_toml(tmp_path, "A", "B", h.uri))
    cfg = ("--agent-config", str(agent), "--peer", "hostB", "--connect", h.uri)

    r = mirror("pair", "web03", "--check", *cfg)
    assert r.returncode == 1 and "[ram-private]" in r.stdout, r.stdout + r.stderr
    r = mirror("pair", "web03", "--check", "--live", *cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("web03: can be mirrored"), r.stdout
    assert "paired live: mirror reads its RAM from QEMU's process" in r.stdout
    assert "checkpoints would use the dirty-page log" in r.stdout
    pid = h.qemu_pid("web03")
    assert pid is not None
    held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert "anon_inode:[userfaultfd]" not in held
    assert inactive(conn, "web03") == before and dom.isActive()

    dom.suspend()
    r = mirror("pair", "web03", "--check", "--live", *cfg)
    assert r.returncode == 1 and "web03 is paused: resume it" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    dom.resume()
    r = mirror("pair", "web03", "--live", "--prepare", *cfg)
    assert r.returncode != 0 and "one or the other" in r.stderr + r.stdout
    dom.destroy()


def test_the_standbys_host_refuses_a_guest_cpu_it_cannot_run(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """The standby's host compares the guest's CPU (as its primary's host gives it) with its
    own (virConnectCompareCPU): its own CPU passes; the same with a feature it lacks, or
    text that is no CPU, is refused with one line; a TCG domain's CPU is not compared."""
    from mirror.guests.libvirtdom import Domains

    h = libvirt_host("A")
    conn = h.connect()
    with Domains(h.uri) as lv:
        host = ET.fromstring(conn.getCapabilities()).find("host/cpu")
        assert host is not None
        own = ET.tostring(host, encoding="unicode")
        assert lv.cpu_refusal(own) == ""
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        # (its /proc/cpuinfo flag, libvirt's name): one this machine lacks
        lacking = next(name for flag, name in (
            ("avx512_vp2intersect", "avx512-vp2intersect"), ("amx_tile", "amx-tile"),
            ("avx512_fp16", "avx512-fp16"), ("avx512f", "avx512f"), ("sha_ni", "sha-ni"),
        ) if flag not in flags)  # fmt: skip
        more = ET.fromstring(own)
        ET.SubElement(more, "feature", policy="require", name=lacking)
        why = lv.cpu_refusal(ET.tostring(more, encoding="unicode"))
        assert "lacks features of the guest's CPU" in why, why
        assert lv.cpu_refusal("<cpu><model>") != ""
        dom = conn.defineXML(domain_xml("web04", guest_image, nic_port=free_ports(1)[0]))
        dom.create()
        try:
            assert lv.guest_cpu("web04") == ""  # type 'qemu': emulated on any host
        finally:
            dom.destroy()
