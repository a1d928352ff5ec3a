"""The domain check (mirror/guests/domaincheck.py): a pure function over domain XMLs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mirror.guests.domaincheck import (
    DomainXMLError,
    assess,
    check,
    explain,
    explain_assessment,
    with_agent,
)

GOOD = """<domain type='kvm'>
  <name>web01</name>
  <uuid>0d4c6b9e-6b8f-4a43-9f2e-1d2c3b4a5f60</uuid>
  <memory unit='KiB'>131072</memory>
  <vcpu placement='static'>1</vcpu>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/var/lib/mirror/guest/vmlinuz</kernel><initrd>/var/lib/mirror/guest/initramfs.cpio.gz</initrd>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='server'>
      <mac address='52:54:00:12:34:56'/><source address='127.0.0.1' port='5555'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


PRELOAD = (
    "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    "<qemu:env name='LD_PRELOAD' value='/usr/lib/python3/dist-packages/mirror/_uffdpreload.so'/>"
    "<qemu:env name='MIRROR_UFFD_SOCK' value='@mirror-uffd-web01'/></qemu:commandline>"
)
GOOD_LOG = GOOD.replace("</domain>", PRELOAD + "</domain>")  # with the dirty-page log


def codes(xml: str, **kw: bool) -> list[str]:
    return sorted(f.code for f in check(xml, **kw).blocking)


def test_the_demo_domain_can_be_mirrored() -> None:
    r = check(GOOD_LOG)
    assert r.ok and r.findings == () and r.scan == "log"
    assert (r.name, r.ram_mib, r.vcpus) == ("web01", 128, 1)
    assert r.nics == ("server virtio 52:54:00:12:34:56",)
    assert explain(r) == "web01: can be mirrored"
    # without the preload: mirrored all the same, with the hashed scan, and a note saying so
    r = check(GOOD)
    assert r.ok and [f.code for f in r.findings] == ["no-preload"] and r.scan == "hashed"
    assert "--prepare" in r.findings[0].fix and "hashed scan" in r.findings[0].why


@pytest.mark.parametrize(
    "old,new,code",
    [
        # RAM: anonymous, private, no backing at all, hugetlbfs
        ("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "",
         "ram-private"),
        ("<access mode='shared'/>", "<access mode='private'/>", "ram-private"),
        ("<access mode='shared'/>", "", "ram-private"),
        ("<source type='file'/><access mode='shared'/>", "<source type='memfd'/>",
         "ram-private"),
        ("<source type='file'/>", "<source type='anonymous'/>", "ram-private"),
        ("<source type='file'/>", "<source type='file'/><hugepages/>", "hugepages"),
        ("<source type='file'/><access mode='shared'/>", "<hugepages/>", "hugepages"),
        ("<source type='file'/>", "<source type='file'/><discard/>", "ram-discard"),
        # the balloon: free page reporting discards behind the log with no change of size
        ("<memballoon model='none'/>", "<memballoon model='virtio' freePageReporting='on'/>",
         "balloon-page-reporting"),
        ("<memballoon model='none'/>", "<memballoon model='xen'/>", "balloon"),
        # memory devices
        ("<serial", "<memory model='virtio-mem'><target><size unit='MiB'>512</size>"
         "</target></memory><serial", "memory-device"),
        ("<serial", "<memory model='dimm'><target><size unit='MiB'>512</size></target>"
         "</memory><serial", "memory-device"),
        ("<serial", "<memory model='nvdimm'><source><path>/x</path></source></memory><serial",
         "memory-device"),
        # NICs
        ("<interface type='server'>", "<interface type='user'>", "nic-type"),
        ("<interface type='server'>", "<interface type='direct'>", "nic-type"),
        ("<interface type='server'>", "<interface type='vhostuser'>", "nic-type"),
        ("<interface type='server'>", "<interface type='hostdev'>", "nic-type"),
        ("<interface type='server'>", "<interface type='udp'>", "nic-type"),
        ("<interface type='server'>", "<interface type='client'>", "nic-type"),
        ("<interface type='server'>", "<interface type='ethernet'>", "nic-type"),
        ("<model type='virtio'/>", "<model type='virtio'/><bandwidth><outbound average='1000'/>"
         "</bandwidth>", "nic-bandwidth"),
        ("<serial", "<interface type='server'><mac address='52:54:00:00:00:02'/><source "
         "address='127.0.0.1' port='5556'/><model type='virtio'/></interface><serial", "nics"),
        # devices the dirty log cannot see, or state outside QEMU
        ("<serial", "<hostdev mode='subsystem' type='pci'/><serial", "hostdev"),
        ("<serial", "<shmem name='ivshmem'/><serial", "shmem"),
        ("<serial", "<tpm model='tpm-crb'><backend type='emulator'/></tpm><serial", "tpm"),
        ("<serial", "<filesystem type='mount'><driver type='virtiofs'/><source dir='/s'/>"
         "<target dir='s'/></filesystem><serial", "vhost-user"),
        ("<serial", "<disk type='vhostuser' device='disk'><target dev='vda'/></disk><serial",
         "vhost-user"),
        ("<serial", "<redirdev bus='usb' type='spicevmc'/><serial", "redirdev"),
        # disks mirror cannot replicate
        ("<serial", "<disk type='block' device='disk'><source dev='/dev/sdb'/>"
         "<target dev='vda'/></disk><serial", "disk-type"),
        ("<serial", "<disk type='network' device='disk'><source protocol='nbd' name='x'/>"
         "<target dev='vda'/></disk><serial", "disk-type"),
        ("<serial", "<disk type='file' device='disk'><driver name='qemu' type='vmdk'/>"
         "<source file='/img/w.vmdk'/><target dev='vda'/></disk><serial", "disk-format"),
        ("<serial", "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
         "<source file='/img/w.qcow2'/><backingStore type='file'><format type='qcow2'/>"
         "<source file='/img/base.qcow2'/></backingStore><target dev='vda'/></disk><serial",
         "disk-backing"),
        ("<serial", "<disk type='file' device='disk'><source file='/img/w.raw'/>"
         "<target dev='vda'/><shareable/></disk><serial", "disk-shared"),
        ("<serial", "<disk type='file' device='disk'><source file='/img/w.raw'/>"
         "<target dev='vda'/></disk><disk type='file' device='disk'><source file='/img/x.raw'/>"
         "<target dev='vdb'/></disk><serial", "disk-many"),
        # NUMA
        ("<vcpu placement='static'>1</vcpu>", "<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0' "
         "memory='65536' memAccess='shared'/><cell id='1' cpus='1' memory='65536' "
         "memAccess='shared'/></numa></cpu>", "numa-cells"),
        # not QEMU
        ("<domain type='kvm'>", "<domain type='xen'>", "hypervisor"),
    ],
)
def test_what_cannot_be_mirrored_is_named(old: str, new: str, code: str) -> None:
    assert old in GOOD
    xml = GOOD.replace(old, new, 1)
    r = check(xml)
    assert code in codes(xml), explain(r)
    assert not r.ok
    text = explain(r)
    assert "cannot be mirrored" in text and "why: " in text and "change: " in text
    for f in r.blocking:
        assert f.what and f.why and f.fix


def test_ram_fix_is_one_step_and_exact_xml() -> None:
    xml = GOOD.replace("<memoryBacking><source type='file'/><access mode='shared'/>"
                       "</memoryBacking>", "")
    (f,) = check(xml).blocking
    assert f.code == "ram-private" and "private anonymous memory (no <memoryBacking>)" in f.what
    assert "mirror pair web01 --prepare" in f.fix and "restart" in f.fix
    assert "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" in f.fix
    assert "memory_backing_dir" not in f.fix  # no host-wide change


def test_memfd_ram_and_a_virtio_balloon_are_accepted() -> None:
    memfd = GOOD_LOG.replace("<source type='file'/>", "<source type='memfd'/>")
    assert check(memfd).ok and check(memfd).findings == ()
    for balloon in ("<memballoon model='virtio'/>", "",  # absent: libvirt adds a virtio one
                    "<memballoon model='virtio' freePageReporting='off' autodeflate='on'>"
                    "<stats period='10'/></memballoon>"):
        r = check(memfd.replace("<memballoon model='none'/>", balloon))
        assert r.ok and [f.code for f in r.findings] == ["balloon"], explain(r)
        assert not r.findings[0].blocking and "setmem" in r.findings[0].why
        assert "free page reporting stays off" in r.findings[0].fix


def test_hugetlbfs_ram_is_named_as_such() -> None:
    for mb in ("<memoryBacking><hugepages/></memoryBacking>",
               "<memoryBacking><hugepages/><source type='memfd'/><access mode='shared'/>"
               "</memoryBacking>"):
        r = check(GOOD.replace("<memoryBacking><source type='file'/><access mode='shared'/>"
                               "</memoryBacking>", mb))
        assert [f.code for f in r.blocking] == ["hugepages"]
        assert "hugetlbfs" in r.blocking[0].what and "anonymous" not in explain(r)


def test_the_running_guest_and_the_next_boot_are_both_checked() -> None:
    anon = GOOD.replace("<memoryBacking><source type='file'/><access mode='shared'/>"
                        "</memoryBacking>", "")
    memfd = GOOD_LOG.replace("<source type='file'/>", "<source type='memfd'/>")
    # prepared, not restarted yet: the running guest still has anonymous RAM
    a = assess(memfd, anon)
    assert not a.ok and a.next_boot.ok and a.running is not None and not a.running.ok
    text = explain_assessment(a)
    assert "the running guest (live XML): 1 thing(s) to change; checkpoints would use the " \
        "hashed scan" in text, text
    assert "its next boot (persistent definition): can be mirrored; checkpoints would use " \
        "the dirty-page log" in text, text
    assert "restart web01" in text and "[ram-private]" in text
    # restarted: both the same
    a = assess(memfd, memfd)
    assert a.ok and "its next boot (persistent definition): the same" in explain_assessment(a)
    assert explain_assessment(a).startswith("web01: can be mirrored\n")
    # not running: mirror attaches to a running domain
    a = assess(memfd, None)
    assert not a.ok and "not running" in explain_assessment(a)
    # running fine, but the next boot (the standby's definition) is not
    assert not assess(anon, memfd).ok


def test_shared_numa_cell_counts_as_shared() -> None:
    xml = GOOD.replace("<access mode='shared'/>", "").replace(
        "<vcpu placement='static'>1</vcpu>",
        "<vcpu>1</vcpu><cpu><numa><cell id='0' cpus='0' memory='131072' "
        "memAccess='shared'/></numa></cpu>")
    assert check(xml).ok


def test_every_problem_at_once() -> None:
    xml = GOOD.replace("<access mode='shared'/>", "").replace(
        "<memballoon model='none'/>", "<memballoon model='virtio' freePageReporting='on'/>"
    ).replace(
        "<interface type='server'>", "<interface type='direct'>")
    assert codes(xml) == ["balloon-page-reporting", "nic-type", "ram-private"]
    assert "3 thing(s) to change" in explain(check(xml))


def test_notes_do_not_block() -> None:
    GOOD = GOOD_LOG  # (the notes below are its only findings)
    xml = GOOD.replace("<serial", "<disk type='file' device='cdrom'><source file='/iso/x.iso'/>"
                       "<target dev='sda'/><readonly/></disk><serial")
    r = check(xml)
    assert r.ok and [f.code for f in r.findings] == ["readonly-media"]
    assert "note: " in explain(r)
    no_nic = GOOD.split("<interface")[0] + GOOD.split("</interface>")[1]
    r = check(no_nic)
    assert r.ok and [f.code for f in r.findings] == ["no-nic"]
    nv = GOOD.replace("</os>", "<loader readonly='yes' type='pflash'>/c.fd</loader>"
                      "<nvram>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os>")
    r = check(nv)
    assert r.ok and [f.code for f in r.findings] == ["nvram"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("bus", ["virtio", "scsi", "sata"])
def test_one_raw_or_qcow2_file_disk_on_any_bus_is_replicated(fmt: str, bus: str) -> None:
    xml = GOOD_LOG.replace("<serial", f"<disk type='file' device='disk'><driver name='qemu' "
                           f"type='{fmt}' cache='none' discard='unmap'/><source file='/i.img'/>"
                           f"<target dev='vda' bus='{bus}'/></disk><disk type='file' "
                           f"device='cdrom'><source file='/iso/x.iso'/><target dev='sdb'/>"
                           f"<readonly/></disk><serial")
    r = check(xml)
    assert r.ok and [f.code for f in r.findings] == ["readonly-media"], explain(r)  # a note


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "does not parse"),
        ("<domain", "does not parse"),
        ("<network><name>x</name></network>", "root element is <network>"),
        ("<domain type='kvm'><uuid>x</uuid></domain>", "no <name>"),
        ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]><domain><name>&a;</name>'
         "</domain>", "DOCTYPE"),
        ("<domain>" + "<x>" * 10 + "</domain>", "does not parse"),
        ("<domain><name>x</name>" + " " * (5 << 20) + "</domain>", "not a domain definition"),
    ],
)
def test_not_a_domain(text: str, why: str) -> None:
    with pytest.raises(DomainXMLError, match=why):
        check(text)


def test_memory_units() -> None:
    for mem, mib in (("<memory unit='GiB'>2</memory>", 2048), ("<memory>262144</memory>", 256),
                     ("<memory unit='MiB'>300</memory>", 300)):
        assert check(GOOD.replace("<memory unit='KiB'>131072</memory>", mem)).ram_mib == mib


QMP = ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
       "<qemu:arg value='-qmp'/><qemu:arg value='unix:/run/libvirt/m.sock,server=on,wait=off'/>"
       "</qemu:commandline>")


@pytest.mark.parametrize(
    "old,new,why",
    [
        ("/usr/bin/qemu-system-x86_64", "/bin/sh", "<emulator>"),
        ("</domain>", QMP.replace("-qmp", "-chardev") + "</domain>", "qemu:commandline"),
        ("</domain>", QMP.replace("</qemu:commandline>", "<qemu:arg value='-S'/>"
                                  "</qemu:commandline>") + "</domain>", "qemu:commandline"),
        ("</domain>", QMP.replace("</qemu:commandline>", "<qemu:env name='LD_LIBRARY_PATH' "
                                  "value='/tmp'/></qemu:commandline>") + "</domain>",
         "qemu:commandline"),
        ("<serial type='pty'>", "<serial type='pty'><source type='exec'/>", "program"),
    ],
)
def test_a_peers_standby_xml_runs_nothing_of_its_choosing(old: str, new: str, why: str) -> None:
    from mirror.guests.standbycheck import standby_refusals

    assert standby_refusals(GOOD) == [] and standby_refusals(GOOD.replace(
        "</domain>", QMP + "</domain>")) == []
    refused = standby_refusals(GOOD.replace(old, new))
    assert refused and why in " ".join(refused)


def test_a_peers_preload_library_is_replaced_and_the_operators_own_are_kept() -> None:
    # the dirty-page log's <qemu:env>: accepted, because the standby never runs the
    # peer's copy of mirror's library (this host's own comes first, with a socket of its
    # own); the operator's own libraries are kept after it, if this host has them in its
    # system library directories
    from mirror.guests import uffd
    from mirror.guests.libvirtxml import QEMU_NS, standby_xml
    from mirror.guests.standbycheck import standby_refusals

    libz = "/usr/lib/x86_64-linux-gnu/libz.so.1"  # (a library every Debian host has)
    env = (f"<qemu:env name='LD_PRELOAD' value='/tmp/_uffdpreload.so:{libz} libm.so.6'/>"
           f"<qemu:env name='{uffd.ENV_SOCK}' value='@peer'/>")
    xml = GOOD.replace("</domain>", QMP.replace("</qemu:commandline>", env +
                                                "</qemu:commandline>") + "</domain>")
    assert standby_refusals(xml) == []
    ours = ET.fromstring(standby_xml(xml))
    values = {e.get("name"): e.get("value", "") for e in ours.iter(f"{{{QEMU_NS}}}env")}
    entries = uffd.preload_entries(values["LD_PRELOAD"])
    assert "/tmp/_uffdpreload.so" not in entries and values[uffd.ENV_SOCK] != "@peer"
    lib = uffd.preload_library()
    assert entries == ([str(lib)] if lib else []) + [libz, "libm.so.6"]
    # a library of the peer's choosing, or one this host lacks: refused, each named
    for bad, why in (("/tmp/x.so", "outside this host's system library directories"),
                     ("/usr/lib/nonexistent-mirror-test.so", "which this host does not have"),
                     ("libnonexistent-mirror-test.so", "which this host does not have"),
                     ("$ORIGIN/x.so", "no ld.so tokens"),
                     ("/usr/lib/../../tmp/x.so", "outside this host's system library")):
        refused = standby_refusals(xml.replace("libm.so.6", bad))
        assert len(refused) == 1 and why in refused[0] and "LD_PRELOAD" in refused[0], refused


def test_prepare_keeps_the_operators_preload_and_one_copy_of_mirrors() -> None:
    from mirror.guests import uffd
    from mirror.guests.libvirtxml import QEMU_NS, prepared_xml

    lib = uffd.preload_library()
    if lib is None:
        pytest.skip("mirror's preload library is not built")
    # an older installation's library, no socket: replaced by this one's, once
    xml = GOOD.replace("</domain>", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:env "
                       "name='LD_PRELOAD' value='/opt/a.so:/old/mirror/_uffdpreload.so "
                       "/opt/b.so'/></qemu:commandline></domain>")
    out, changes = prepared_xml(xml)
    (pre,) = [e.get("value", "") for e in ET.fromstring(out).iter(f"{{{QEMU_NS}}}env")
              if e.get("name") == "LD_PRELOAD"]  # fmt: skip
    assert uffd.preload_entries(pre) == [str(lib), "/opt/a.so", "/opt/b.so"], pre
    assert any("LD_PRELOAD=" in c for c in changes)


@pytest.mark.parametrize(
    "old,new,what",
    [
        ("<serial type='pty'><target port='0'/></serial>",
         "<serial type='file'><source path='/etc/shadow'/></serial>", "<serial>"),
        ("<serial type='pty'><target port='0'/></serial>",
         "<serial type='pty'><log file='/etc/shadow'/></serial>", "<log file>"),
        ("<serial type='pty'><target port='0'/></serial>",
         "<serial type='unix'><source mode='bind' path='/etc/cron.d/x'/></serial>", "<serial>"),
        ("<kernel>/var/lib/mirror/guest/vmlinuz</kernel>", "<kernel>/etc/shadow</kernel>",
         "<kernel>"),
        ("<initrd>/var/lib/mirror/guest/initramfs.cpio.gz</initrd>",
         "<initrd>/var/lib/mirror/../../../etc/shadow</initrd>", "<initrd>"),
        ("<serial type='pty'>", "<disk type='file' device='cdrom'><source file='/etc/shadow'/>"
         "<target dev='sdb' bus='sata'/><readonly/></disk><serial type='pty'>", "<disk>"),
        ("<serial type='pty'>", "<disk type='block' device='disk'><source dev='/dev/sda'/>"
         "<target dev='vdb' bus='virtio'/></disk><serial type='pty'>", "<source dev>"),
        ("<serial type='pty'>", "<channel type='unix'><source mode='bind' path='/root/x'/>"
         "<target type='virtio'/></channel><serial type='pty'>", "<channel>"),
        ("</os>", "<loader readonly='yes'>/etc/shadow</loader></os>", "<loader>"),
        ("</os>", "<nvram template='/etc/shadow'>/var/lib/libvirt/qemu/nvram/x.fd</nvram></os>",
         "<nvram template>"),
        ("<kernel>/var/lib/mirror/guest/vmlinuz</kernel>", "<kernel>vmlinuz</kernel>",
         "<kernel>"),  # relative: where it lands is not known
        ("</domain>", QMP.replace("/run/libvirt/m.sock", "/etc/cron.d/x") + "</domain>", "-qmp"),
    ],
)
def test_a_peers_standby_xml_names_files_only_where_a_domains_files_belong(
    old: str, new: str, what: str
) -> None:
    from mirror.guests.standbycheck import standby_refusals

    assert standby_refusals(GOOD.replace("</domain>", QMP + "</domain>")) == []
    xml = GOOD.replace(old, new)
    assert xml != GOOD
    refused = standby_refusals(xml)
    assert refused, f"{new} was accepted"
    assert any(what in r and "outside the places a domain's files belong" in r
               for r in refused), refused


def test_the_allowed_places_are_the_agents_and_the_files_there_pass(tmp_path) -> None:
    from mirror.guests.standbycheck import standby_refusals

    xml = GOOD.replace(
        "<serial type='pty'><target port='0'/></serial>",
        f"<serial type='file'><source path='{tmp_path}/log/web01.log'/></serial>",
    )
    assert standby_refusals(xml) != []  # not in the default places
    assert standby_refusals(xml, ["/var/lib/mirror", str(tmp_path)]) == []
    # a symlink inside an allowed place that leads out of it is judged by its target
    (tmp_path / "log").symlink_to("/etc")
    refused = standby_refusals(xml, ["/var/lib/mirror", str(tmp_path)])
    assert refused and "<serial>" in refused[0]


NIC = ("<interface type='server'>\n      <mac address='52:54:00:12:34:56'/><source "
       "address='127.0.0.1' port='5555'/>\n      <model type='virtio'/>\n    </interface>")


def test_nics_as_defined_are_held_any_number_and_any_model() -> None:
    assert NIC in GOOD_LOG
    nics = (
        "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/>"
        "<model type='e1000e'/></interface>"
        "<interface type='network'><mac address='52:54:00:00:00:02'/><source network='default'/>"
        "<model type='rtl8139'/><bandwidth><inbound average='1000'/></bandwidth></interface>"
        "<interface type='bridge'><mac address='52:54:00:00:00:03'/><source bridge='br1'/>"
        "</interface>"
    )
    xml = GOOD_LOG.replace(NIC, nics)
    r = check(xml)
    assert r.ok and r.findings == (), explain(r)
    assert len(r.nics) == 3
    # no setting of the agent's is needed for them
    assert with_agent(assess(xml, xml), "").ok
    # one <outbound> limit takes the tap's ingress hook: that NIC's finding alone
    limited = xml.replace("<inbound average='1000'/>", "<outbound average='1000'/>")
    assert codes(limited) == ["nic-bandwidth"]


def test_a_socket_nic_with_no_agent_bridge_would_reach_nobody() -> None:
    a = assess(GOOD_LOG, GOOD_LOG)
    assert a.ok and with_agent(a, "br0").ok
    nowhere = with_agent(a, "")
    assert not nowhere.ok
    assert [f.code for f in nowhere.next_boot.findings] == ["nic-nowhere"]
    assert "reach nobody" in explain_assessment(nowhere)
    assert explain_assessment(nowhere).count("[nic-nowhere]") == 1  # (the same: said once)


def test_uefi_firmware_gets_the_nvram_note_with_its_file() -> None:
    # what virt-install writes for UEFI: <os firmware='efi'>, no <nvram> in the definition
    # (libvirt picks the file, <nvram> shows up in the live XML)
    efi = GOOD_LOG.replace("<os>", "<os firmware='efi'>")
    r = check(efi)
    assert r.ok and [f.code for f in r.findings] == ["nvram"]
    (f,) = r.findings
    assert "/var/lib/libvirt/qemu/nvram/web01_VARS.fd" in f.what and "one per host" in f.what
    assert "not the NVRAM file" in f.why and "peer's variables" in f.why
    assert f.fix.startswith("copy /var/lib/libvirt/qemu/nvram/web01_VARS.fd to the peer")
    live = efi.replace("</os>", "<loader readonly='yes' type='pflash'>/usr/share/OVMF/"
                       "OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M"
                       ".fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os>")
    assert [f.code for f in check(live).findings] == ["nvram"]
    pflash = GOOD_LOG.replace("</os>", "<loader type='pflash'>/usr/share/OVMF/OVMF_CODE.fd"
                              "</loader></os>")
    assert [f.code for f in check(pflash).findings] == ["nvram"]
    # the firmware's own files are taken by the standby's host (its packages installed
    # them), the NVRAM file where a domain's files belong
    from mirror.guests.standbycheck import standby_refusals

    assert standby_refusals(live) == []
    assert "<nvram template>" in " ".join(standby_refusals(live.replace(
        "/usr/share/OVMF/OVMF_VARS_4M.fd", "/etc/shadow")))  # fmt: skip
    assert "<nvram>" in " ".join(standby_refusals(live.replace(
        "/var/lib/libvirt/qemu/nvram/web01_VARS.fd", "/usr/share/OVMF/x.fd")))  # fmt: skip


def test_two_redirected_usb_devices_are_one_finding() -> None:
    # virt-install's SPICE graphics come with two <redirdev type='spicevmc'>
    two = GOOD_LOG.replace("<serial", "<redirdev bus='usb' type='spicevmc'/>"
                           "<redirdev bus='usb' type='spicevmc'/><serial")
    r = check(two)
    assert [f.code for f in r.findings] == ["redirdev"]
    assert r.findings[0].what == "2 <redirdev type='spicevmc'> devices"
    assert explain_assessment(assess(two, two)).count("[redirdev]") == 1


def test_nic_findings_do_not_overlap() -> None:
    direct = ("<interface type='direct'><mac address='52:54:00:00:00:07'/><source dev='eth0' "
              "mode='bridge'/></interface>")
    both = GOOD_LOG.replace("<serial", direct + "<serial")
    r = check(both)
    # one finding per NIC, each naming its own MAC and its own change
    assert sorted(f.code for f in r.findings) == ["nic-type", "nics"]
    by_code = {f.code: f for f in r.findings}
    assert "52:54:00:00:00:07" in by_code["nic-type"].what
    assert "52:54:00:12:34:56" in by_code["nics"].what
    assert "52:54:00:00:00:07" not in by_code["nics"].what
    # a bridge NIC on a vhost-user backend: the backend's finding alone
    vu = GOOD_LOG.replace(NIC, "<interface type='bridge'><mac address='52:54:00:00:00:08'/>"
                          "<source bridge='br0'/><backend type='vhostuser'/></interface>")
    assert [f.code for f in check(vu).findings] == ["vhost-user"]
    # two socket NICs: each its own finding
    two = GOOD_LOG.replace("<serial", NIC.replace("12:34:56", "12:34:57") + "<serial")
    assert [f.code for f in check(two).findings] == ["nics", "nics"]


def test_check_says_what_the_standbys_host_refuses_before_pairing() -> None:
    from mirror.guests.domaincheck import parse, with_standby
    from mirror.guests.standbycheck import program_refusals

    argv = GOOD_LOG.replace("</qemu:commandline>", "<qemu:arg value='-msg'/><qemu:arg "
                            "value='timestamp=on'/></qemu:commandline>")
    a = assess(argv, argv)
    assert a.ok  # this host runs it as it is
    refused = program_refusals(parse(argv))
    assert refused and "-msg" in refused[0]
    # asked of the peer (or not asked: what every host refuses, checked here)
    for peer, not_asked in (("hostB", ""), ("hostB", "no host agent runs here"),
                            ("", "no --peer given")):
        b = with_standby(a, refused, peer, not_asked)
        assert not b.ok
        text = explain_assessment(b)
        assert text.startswith("web01: cannot be mirrored") and "[standby-refused]" in text
        assert "the standby" in text and "1 thing(s) to change" in text
        assert "remove those <qemu:arg>" in text
        if not_asked:
            assert not_asked in text
    ok = with_standby(a, [], "hostB")
    assert ok.ok and "the standby on hostB (as hostB checks its definition): can run" in \
        explain_assessment(ok)
    # a peer that does not answer fails the check, as it would fail the pairing
    gone = with_standby(a, [], "hostB", "did not answer 'check' within 20 s", blocking=True)
    assert not gone.ok and "[standby-unasked]" in explain_assessment(gone)


def test_a_virt_install_debian12_server_needs_one_change_which_prepare_makes() -> None:
    """What `virt-install --os-variant debian12 --graphics none --disk size=10 --network
    network=default` defines (qcow2 disk with discard, network NIC, balloon, RNG, agent
    channel, empty CD-ROM, host-passthrough CPU): one change, the memory backing, which
    `mirror pair --prepare` writes (with the preload); after it, none."""
    from mirror.guests.libvirtxml import prepared_xml

    xml = (Path(__file__).parent / "data" / "virt-install-debian12.xml").read_text()
    assert codes(xml) == ["ram-private"]
    r = check(prepared_xml(xml)[0])
    assert r.ok and not r.blocking, explain(r)
