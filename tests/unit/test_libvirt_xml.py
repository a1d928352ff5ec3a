"""The libvirt backend's XML work, without libvirt: the standby's definition, the
definition a promoted domain gets, the NIC and the QMP socket read from a domain."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mirror.guests import uffd
from mirror.guests.base import GuestError
from mirror.guests.libvirtxml import (
    QEMU_NS,
    persistent_xml,
    qmp_socket_in,
    server_nic,
    standby_xml,
)
from mirror.lab.libvirtdemo import qmp_args
from mirror.lab.libvirtlab import domain_xml

Q = f"{{{QEMU_NS}}}"


def demo(**kw: object) -> str:
    xml = domain_xml("web01", Path("/img"), nic_port=5600, **kw)  # type: ignore[arg-type]
    return xml.replace("</domain>", qmp_args(Path("/run/q.sock"), log=True) + "</domain>")


def test_the_standby_waits_for_incoming_state_and_the_promoted_definition_does_not() -> None:
    live = demo().replace("<domain type='qemu'>", "<domain type='qemu' id='7'>")
    sb = ET.fromstring(standby_xml(live))
    args = [a.get("value") for a in sb.iter(f"{Q}arg")]
    assert args == ["-qmp", "unix:/run/q.sock,server=on,wait=off", "-incoming", "defer",
                    "-global", "migration.send-configuration=off"]  # fmt: skip
    assert "id" not in sb.attrib
    envs = {e.get("name"): e.get("value") for e in sb.iter(f"{Q}env")}
    if uffd.preload_library() is not None:  # one socket name, not the primary's
        assert len(list(sb.iter(f"{Q}env"))) == 2
        old = {e.get("name"): e.get("value") for e in ET.fromstring(live).iter(f"{Q}env")}
        assert envs[uffd.ENV_SOCK] != old[uffd.ENV_SOCK]
    back = ET.fromstring(persistent_xml(ET.tostring(sb, encoding="unicode")))
    assert [a.get("value") for a in back.iter(f"{Q}arg")] == args[:2]
    assert back.find("name").text == "web01"  # type: ignore[union-attr]


def test_persistent_xml_drops_an_emptied_commandline() -> None:
    plain = domain_xml("web01", Path("/img"), nic_port=5600)
    back = ET.fromstring(persistent_xml(standby_xml(plain)))
    cmd = back.find(f"{Q}commandline")
    assert cmd is None or all(e.tag == f"{Q}env" for e in cmd)


def test_the_nic_and_the_qmp_socket_are_read_from_the_domain() -> None:
    assert server_nic(demo(), "web01") == ("127.0.0.1", 5600)
    assert qmp_socket_in(demo()) == "/run/q.sock"
    assert qmp_socket_in(domain_xml("web01", Path("/img"))) == ""


@pytest.mark.parametrize(
    "nic",
    ["", "<interface type='network'><source network='default'/></interface>",
     "<interface type='server'><source address='127.0.0.1'/></interface>"],
)  # fmt: skip
def test_a_nic_mirror_cannot_relay_is_refused_with_what_to_change(nic: str) -> None:
    xml = domain_xml("web01", Path("/img")).replace("</devices>", nic + "</devices>")
    with pytest.raises(GuestError, match="web01"):
        server_nic(xml, "web01")


def test_problems_lists_what_to_change_and_nothing_for_a_mirrorable_domain() -> None:
    from mirror.guests.libvirtxml import problems

    assert problems(demo()) == []
    assert problems(domain_xml("web01", Path("/img"), nic_port=5600), qmp="libvirt") == []
    memfd = demo().replace("<source type='file'/>", "<source type='memfd'/>")
    balloon = memfd.replace("<memballoon model='none'/>", "<memballoon model='virtio'/>")
    assert problems(balloon) == []
    bad = (
        domain_xml("web01", Path("/img"))
        .replace("<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "")
        .replace("<memballoon model='none'/>", "<memballoon model='virtio' freePageReporting="
                 "'on'/><disk type='file' device='disk'><target dev='vda' bus='virtio'/></disk>")
    )  # fmt: skip
    found = problems(bad)
    assert len(found) == 4, found  # (no NIC: nothing to hold, nothing to change)
    for words in (
        "--prepare",
        "-qmp",
        "disks",
        "freePageReporting='off'",
    ):
        assert any(words in f for f in found), (words, found)
    assert problems("<domain>")[0].startswith("the domain XML does not parse")


def _without(xml: str, *tags: str) -> str:
    """``xml`` canonical, without the elements ``tags`` (and the qemu namespace's)."""
    root = ET.fromstring(xml)
    for parent in list(root.iter()):
        for child in list(parent):
            if child.tag in tags:
                parent.remove(child)
    return ET.canonicalize(ET.tostring(root, encoding="unicode"), strip_text=True)


def test_prepare_writes_the_memory_backing_and_the_preload_and_nothing_else() -> None:
    from mirror.guests.domaincheck import check
    from mirror.guests.libvirtxml import prepared_xml

    anon = domain_xml("web01", Path("/img"), nic_port=5600).replace(
        "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", ""
    ).replace("<memballoon model='none'/>", "<memballoon model='virtio'><stats period='5'/>"
              "</memballoon>")  # fmt: skip
    assert [f.code for f in check(anon).blocking] == ["ram-private"]
    xml, changes = prepared_xml(anon)
    assert len(changes) == 2, changes
    assert changes[0].startswith("<memoryBacking><source type='memfd'/><access mode='shared'/>")
    assert "LD_PRELOAD=" in changes[1] and "_uffdpreload" in changes[1]
    root = ET.fromstring(xml)
    assert root.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert root.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    envs = {e.get("name"): e.get("value") for e in root.iter(f"{Q}env")}
    assert set(envs) == {"LD_PRELOAD", uffd.ENV_SOCK} and envs[uffd.ENV_SOCK].startswith("@")
    r = check(xml)
    assert r.ok and r.scan == "log" and [f.code for f in r.findings] == ["balloon"]
    # everything else as it was
    assert _without(xml, "memoryBacking", f"{Q}commandline") == _without(anon)
    # a second time: nothing to do, the text unchanged
    assert prepared_xml(xml) == (xml, [])


def test_prepare_keeps_what_the_operator_has_and_fixes_only_what_is_wrong() -> None:
    from mirror.guests.base import GuestError
    from mirror.guests.libvirtxml import prepared_xml

    base = domain_xml("web01", Path("/img"), nic_port=5600)
    # a shared file stays a file; locked RAM stays locked; free page reporting goes off
    xml = base.replace("<access mode='shared'/>", "<access mode='private'/><locked/>").replace(
        "<memballoon model='none'/>", "<memballoon model='virtio' freePageReporting='on'/>")
    out, changes = prepared_xml(xml)
    root = ET.fromstring(out)
    mb = root.find("memoryBacking")
    assert mb is not None and mb.find("locked") is not None
    assert mb.find("source").get("type") == "file"  # type: ignore[union-attr]
    assert mb.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    assert root.find("devices/memballoon").get("freePageReporting") == "off"  # type: ignore[union-attr]
    assert len(changes) == 3 and "freePageReporting='off'" in changes[2]
    # the operator's own preload library is kept, after mirror's
    theirs = base.replace("</domain>", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:env "
                          "name='LD_PRELOAD' value='/opt/x.so'/></qemu:commandline></domain>")
    out, _ = prepared_xml(theirs)
    (pre,) = [e.get("value", "") for e in ET.fromstring(out).iter(f"{Q}env")
              if e.get("name") == "LD_PRELOAD"]  # fmt: skip
    assert "_uffdpreload" in pre and pre.endswith(" /opt/x.so")
    # hugetlbfs: not something to rewrite behind the operator's back
    with pytest.raises(GuestError, match="hugetlbfs"):
        prepared_xml(base.replace("<source type='file'/>", "<hugepages/>"))
