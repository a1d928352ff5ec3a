"""A libvirt domain's XML as the libvirt guest (mirror/guests/libvirt.py) reads and
transforms it, without libvirt: the QMP socket and the NIC it names, why it cannot be
protected as it is (``problems``), what both hosts must agree on (``fingerprint_of``), the
standby's definition (``standby_xml``, with the dirty-page log's preload ``preload_env``)
and the definition a promoted domain gets (``persistent_xml``).
"""

from __future__ import annotations

import contextlib
import itertools
import xml.etree.ElementTree as ET
from typing import Any

from mirror.guests import uffd
from mirror.guests.base import GuestError
from mirror.guests.domaincheck import has_preload

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
MEMORY_FIX = (
    "run `mirror pair DOMAIN --prepare` (it writes <memoryBacking><source type='memfd'/><access "
    "mode='shared'/></memoryBacking>), then restart the domain"
)


def qmp_socket_in(xml: str) -> str:
    """The path of a ``-qmp unix:PATH,...`` in the domain's <qemu:commandline>, or ""."""
    args = [a.get("value", "") for a in ET.fromstring(xml).iter(f"{{{QEMU_NS}}}arg")]
    for flag, value in itertools.pairwise(args):
        if flag == "-qmp" and value.startswith("unix:"):
            return value[5:].split(",")[0]
    return ""


GATED_NIC_TYPES = ("bridge", "network")  # NICs whose tap mirror's gate holds (nicgate.py)


def uses_server_nic(xml: str) -> bool:
    """Whether the domain's NIC is a ``type='server'`` socket (relayed by NetRelay)
    rather than NICs as defined (held by the gate on their taps)."""
    return any(n.get("type") == "server" for n in ET.fromstring(xml).findall("./devices/interface"))


def gated_nics(live_xml: str, name: str) -> list[tuple[str, str, str]]:
    """Every NIC of the running domain, in document order (both hosts list them the same
    way): (its tap, its bridge, its MAC), from the live XML (a ``type='network'`` NIC's
    live ``<source>`` names the network's bridge).  GuestError for a NIC that the gate
    cannot hold, saying why."""
    out = []
    for n in ET.fromstring(live_xml).findall("./devices/interface"):
        kind = n.get("type", "")
        mac = _get(n, "mac", "address")
        if kind not in GATED_NIC_TYPES:
            raise GuestError(
                f"domain {name!r}: its NIC {mac or '?'} is <interface type={kind!r}>: mirror "
                f"holds the frames of bridge and network NICs (or one type='server' NIC)"
            )
        tap, bridge = _get(n, "target", "dev"), _get(n, "source", "bridge")
        if not tap or not bridge:
            raise GuestError(
                f"domain {name!r}: its NIC {mac or '?'} has no tap on a bridge in the live XML "
                f"(target dev {tap!r}, bridge {bridge!r}): a network that is not a bridge "
                f"(macvtap, hostdev) cannot be held"
            )
        out.append((tap, bridge, mac))
    return out


def server_nic(xml: str, name: str) -> tuple[str, int]:
    """Where the domain's ``type='server'`` NIC listens; GuestError saying what to change."""
    nics = ET.fromstring(xml).findall("./devices/interface")
    if len(nics) != 1 or nics[0].get("type") != "server":
        kinds = [n.get("type") for n in nics]
        raise GuestError(
            f"domain {name!r} has NICs {kinds}: mirror needs exactly one "
            f"<interface type='server'><source address='127.0.0.1' port='P'/><model "
            f"type='virtio'/></interface> (its frames pass mirror's output commit)"
        )
    src = nics[0].find("source")
    if src is None or not (src.get("port") or "").isdigit():
        raise GuestError(f"domain {name!r}: its type='server' NIC has no <source port=...>")
    return src.get("address") or "127.0.0.1", int(src.get("port", "0"))


def problems(xml: str, qmp: str = "socket") -> list[str]:
    """Why mirror cannot protect the domain of ``xml`` as it is, each with what to
    change (empty: it can).  What ``mirror pair --check`` explains; the primary checks
    the same on the running domain (the RAM file through QMP) when it attaches."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        return [f"the domain XML does not parse: {e}"]
    name = root.findtext("name") or "?"
    found = []
    mb = root.find("memoryBacking")
    if (
        mb is None
        or _get(mb, "source", "type") not in ("file", "memfd")
        or _get(mb, "access", "mode") != "shared"
        or mb.find("hugepages") is not None
    ):
        found.append(f"its RAM is not a shared memfd or file (mirror maps it): {MEMORY_FIX}")
    nics = root.findall("./devices/interface")
    if any(n.get("type") == "server" for n in nics):
        try:
            server_nic(xml, name)
        except GuestError as e:
            found.append(str(e).replace(f"domain {name!r} has", "it has", 1))
    for n in nics:
        if n.get("type") not in (*GATED_NIC_TYPES, "server"):
            found.append(
                f"its NIC {_get(n, 'mac', 'address') or '?'} is <interface type="
                f"{n.get('type')!r}>: mirror holds the frames of bridge and network NICs"
            )
    if qmp == "socket" and not qmp_socket_in(xml):
        found.append(
            "no QMP socket of mirror's own: add <qemu:commandline><qemu:arg value='-qmp'/>"
            "<qemu:arg value='unix:PATH,server=on,wait=off'/></qemu:commandline>, or set "
            '[libvirt] qmp = "libvirt" (slower checkpoints)'
        )
    if root.findall("./devices/disk"):
        found.append(
            "it has disks: their writes are not replicated by this backend yet; remove "
            "them or wait for the disk support"
        )
    for b in root.findall("./devices/memballoon"):
        if b.get("freePageReporting") == "on":
            found.append(
                "a balloon's free page reporting discards RAM behind mirror's dirty-page log: "
                "<memballoon freePageReporting='off'>"
            )
    if root.find("./devices/memory") is not None:
        found.append("memory devices (virtio-mem, DIMMs) plug RAM behind mirror's back")
    if root.find("./devices/hostdev") is not None:
        found.append("a passed-through host device has state mirror cannot copy: remove it")
    return found


def fingerprint_of(xml: str, conn: Any) -> str:
    """What both hosts must agree on: QEMU's version, the canonical machine type, RAM,
    vCPUs and the devices whose state moves (NIC models, disks, balloon, video)."""
    root = ET.fromstring(xml)
    os_type = root.find("./os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    arch = os_type.get("arch", "x86_64") if os_type is not None else "x86_64"
    emulator = root.findtext("./devices/emulator") or None
    with contextlib.suppress(Exception):  # "q35" and "pc-q35-7.2" are the same machine
        caps = ET.fromstring(conn.getDomainCapabilities(emulator, arch, machine, None))
        machine = caps.findtext("machine") or machine
    mem = root.find("memory")
    kib = (
        int(mem.text or 0)
        << {"KiB": 0, "k": 0, "MiB": 10, "M": 10, "GiB": 20, "G": 20}.get(mem.get("unit", "KiB"), 0)
        if mem is not None
        else 0
    )
    devs = []
    for nic in root.findall("./devices/interface"):
        model = nic.find("model")
        # a network NIC on a bridge is a bridge NIC in the live XML: both a tap (the virtio
        # features QEMU offers depend on the backend: tap, socket, ...)
        kind = "tap" if nic.get("type") in ("bridge", "network") else nic.get("type")
        devs.append(f"nic:{kind}:{model.get('type') if model is not None else ''}")
    for disk in root.findall("./devices/disk"):
        t = disk.find("target")
        devs.append(f"disk:{t.get('bus') if t is not None else ''}:{disk.get('device')}")
    for tag in ("memballoon", "video", "tpm", "rng", "watchdog"):
        for d in root.findall(f"./devices/{tag}"):
            devs.append(f"{tag}:{d.get('model') or ''}")
    ver = conn.getVersion()
    return (
        f"libvirt qemu {ver // 1000000}.{ver // 1000 % 1000}.{ver % 1000} machine={machine} "
        f"vcpus={root.findtext('vcpu')} ram={kib >> 10}M {' '.join(sorted(devs))}"
    )


def standby_xml(xml: str) -> str:
    """The standby's definition: the domain's, waiting for incoming state (``-incoming
    defer``, no configuration section: ``xen-save-devices-state`` writes none), on RAM
    mirror maps (a shared memfd if the domain's is private: paired live), and with
    the preload library that lets mirror log its dirty pages once it is promoted (this
    host's, first in LD_PRELOAD; the operator's own libraries after it, as they were)."""
    root = ET.fromstring(xml)
    for attr in ("id",):
        root.attrib.pop(attr, None)
    _share_ram(root)  # a domain paired live has private RAM: its standby's is a memfd
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is None:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in ("-incoming", "defer", "-global", "migration.send-configuration=off"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=value)
    theirs = ""  # the operator's own preload libraries (standbycheck: this host's, found)
    for env in cmd.findall(f"{{{QEMU_NS}}}env"):  # a socket name of its own, below
        if env.get("name") in ("LD_PRELOAD", uffd.ENV_SOCK):
            if env.get("name") == "LD_PRELOAD":
                theirs = env.get("value", "")
            cmd.remove(env)
    ours = preload_env()
    kept = " ".join(e for e in uffd.preload_entries(theirs) if not uffd.is_mirror_preload(e))
    if ours:
        ours["LD_PRELOAD"] = uffd.join_preload(ours["LD_PRELOAD"], theirs)
    elif kept:  # (a build without mirror's library: the operator's alone)
        ours = {"LD_PRELOAD": kept}
    for name, value in ours.items():
        ET.SubElement(cmd, f"{{{QEMU_NS}}}env", name=name, value=value)
    return ET.tostring(root, encoding="unicode")


def preload_env() -> dict[str, str]:
    """The <qemu:env> a domain needs for mirror's dirty-page log (QEMU then hands out
    userfaultfds of its memory at an abstract socket); empty without the library."""
    lib = uffd.preload_library()
    if lib is None:
        return {}
    return {"LD_PRELOAD": str(lib), uffd.ENV_SOCK: uffd.unique_name("lv")}


def persistent_xml(xml: str) -> str:
    """The definition a promoted domain gets: the standby's, without what made it one."""
    root = ET.fromstring(xml)
    root.attrib.pop("id", None)
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    if cmd is not None:
        args = cmd.findall(f"{{{QEMU_NS}}}arg")
        values = [a.get("value") for a in args]
        drop: set[int] = set()
        for i, v in enumerate(values):
            if (
                v in ("-incoming", "-global")
                and i + 1 < len(values)
                and (v == "-incoming" or values[i + 1] == "migration.send-configuration=off")
            ):
                drop |= {i, i + 1}
        for i in sorted(drop, reverse=True):
            cmd.remove(args[i])
        if not list(cmd):
            root.remove(cmd)
    return ET.tostring(root, encoding="unicode")


def prepared_xml(xml: str) -> tuple[str, list[str]]:
    """The domain's definition with what mirror needs of it at its next start, and each
    change made (none: nothing to do); everything else as it was.  RAM: private anonymous
    RAM becomes a shared memfd (a file or memfd mapped private becomes shared); the
    dirty-page log's preload library in ``<qemu:env>``; a balloon's free page reporting off.
    GuestError for what it cannot change (hugetlbfs)."""
    root = ET.fromstring(xml)
    changes = []
    mb = root.find("memoryBacking")
    if mb is not None and mb.find("hugepages") is not None:
        raise GuestError(
            "its RAM is on hugetlbfs (<memoryBacking><hugepages/>): the dirty-page log and the "
            "page scans work on 4 KiB pages; remove <hugepages/> first (`virsh edit`)"
        )
    shared = _share_ram(root)
    if shared:
        changes.append(shared)
    env = preload_env()
    if env and not has_preload(root):
        cmd = root.find(f"{{{QEMU_NS}}}commandline")
        if cmd is None:
            cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
        theirs = ""
        for e in cmd.findall(f"{{{QEMU_NS}}}env"):
            if e.get("name") in ("LD_PRELOAD", uffd.ENV_SOCK):
                if e.get("name") == "LD_PRELOAD":
                    theirs = e.get("value", "")
                cmd.remove(e)
        env["LD_PRELOAD"] = uffd.join_preload(env["LD_PRELOAD"], theirs)
        for k, v in env.items():
            ET.SubElement(cmd, f"{{{QEMU_NS}}}env", name=k, value=v)
        changes.append(
            f"<qemu:env> LD_PRELOAD={env['LD_PRELOAD']} and {uffd.ENV_SOCK}: the dirty-page "
            f"log's preload (checkpoints scan only the pages written)"
        )
    for b in root.findall("devices/memballoon"):
        if b.get("freePageReporting") == "on":
            b.set("freePageReporting", "off")
            changes.append(
                "<memballoon freePageReporting='off'>: the host would discard reported pages "
                "behind the dirty-page log, with no change of the balloon's size"
            )
    return (ET.tostring(root, encoding="unicode") if changes else xml), changes


def _share_ram(root: ET.Element) -> str:
    """RAM mirror can map, in ``root`` (changed in place): private anonymous RAM becomes a
    shared memfd, a file or memfd mapped private becomes shared; the change made, or ""."""
    mb = root.find("memoryBacking")
    source = "" if mb is None else _get(mb, "source", "type")
    access = "" if mb is None else _get(mb, "access", "mode")
    cells = [c for c in root.findall("cpu/numa/cell") if c.get("memAccess", "shared") != "shared"]
    if source not in ("file", "memfd") or access != "shared" or cells:
        if mb is None:
            mb = ET.SubElement(root, "memoryBacking")
        src = mb.find("source")
        if src is None:
            src = ET.SubElement(mb, "source")
        if source not in ("file", "memfd"):
            src.attrib.clear()
            src.set("type", "memfd")
        acc = mb.find("access")
        if acc is None:
            acc = ET.SubElement(mb, "access")
        acc.set("mode", "shared")
        for c in cells:
            c.set("memAccess", "shared")
        return (
            f"<memoryBacking><source type='{src.get('type')}'/><access mode='shared'/>"
            f"</memoryBacking>: guest RAM mirror can map (through QEMU's fd of it; no "
            f"host-wide setting)"
        )
    return ""


def _get(el: ET.Element, child: str, attr: str) -> str:
    c = el.find(child)
    return "" if c is None else c.get(attr, "")
