"""Can this libvirt domain be mirrored?  A pure function over the domain's XML.

``check(xml)`` reads a domain definition (what ``virsh dumpxml --inactive`` prints) and
returns every finding: what is wrong (with the value found), why mirror needs it otherwise,
and exactly what to change.  A blocking finding makes ``mirror pair`` refuse; a note is
printed and pairing goes on.  Nothing here talks to libvirt: ``mirror pair --check`` and
``mirror pair`` feed it the XML they read, and the unit tests feed it many.

What mirror needs of a domain, and why:

- RAM mirror can map: ``<memoryBacking><source type='memfd'/><access mode='shared'/>``
  (mapped through QEMU's fd of its memfd; no host-wide setting) or ``<source type='file'/>``
  with shared access (mapped from the file).  Private anonymous RAM (no ``<memoryBacking>``,
  what virt-install writes) is visible to no other process: ``mirror pair --prepare`` writes
  the memfd backing (and the dirty-page log's preload) for the domain's next start.  One RAM
  backend: no NUMA cells beyond one, no memory devices (DIMMs, virtio-mem, virtio-pmem,
  NVDIMM), no hugetlbfs (the dirty-page log and the scans work on 4 KiB pages).
- The dirty-page log's preload (``<qemu:env>`` LD_PRELOAD and MIRROR_UFFD_SOCK): without it
  the checkpoints use the hashed scan (a note; ``--prepare`` adds it).
- A virtio balloon is accepted: QEMU discards the pages it takes behind the dirty-page
  log, so mirror watches its size while paired and compares all of RAM after a change
  (mirror/guests/libvirt.py ``ram_discarded``).  Free page reporting is refused: its
  discards change no size, so nothing would tell mirror.
- Nothing else that changes guest memory behind the dirty-page log, or keeps guest state
  outside QEMU's RAM and device state: no discard of RAM, no vhost-user devices (another
  process writes guest RAM), no passthrough (hostdev, SR-IOV, vDPA: DMA the log cannot
  see, device state QEMU cannot save), no shared memory devices, no emulated TPM (its state
  lives in swtpm), no virtiofs.
- NICs as defined: any number of ``bridge`` and ``network`` NICs (on a bridge), any
  model: mirror holds every frame on the host side of each tap (replication/nicgate.py),
  which takes the tap's ingress hook, so no ``<bandwidth><outbound>``; or one socket
  ``server`` NIC (relayed).  Never user-mode networking (slirp keeps TCP state inside
  QEMU, outside the checkpoint), macvtap (``direct``: frames leave from the kernel, no
  tap), ``ethernet`` (its tap is on no bridge) or passed-through NICs.
- Disks: one writable disk, a raw or qcow2 file (any bus, cache or discard mode), replicated
  through mirror's disk server below QEMU's format layer (mirror/guests/libvirtdisk.py);
  no backing chain, no block or network disks, no shareable disks; a read-only CD-ROM is
  a note.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace

from mirror.guests import uffd

MAX_XML = 4 << 20  # a domain's XML is a few KiB; larger is not a domain definition

# what the libvirt backend (mirror/guests/libvirt.py) holds: bridge and network NICs on
# their taps (replication/nicgate.py), or one socket NIC (relayed to [agent] bridge)
NIC_TYPES = ("bridge", "network", "server")
NIC_FIX = (
    "make it <interface type='bridge'><source bridge='BR'/></interface> or <interface "
    "type='network'> on a bridged network (any model; mirror holds its frames on the host "
    "side of its tap, the XML unchanged)"
)


@dataclass(frozen=True)
class Finding:
    """One thing about the domain: ``code`` names it (stable, for scripts and tests)."""

    code: str
    what: str  # what is there now (with the value)
    why: str  # why mirror cannot work with it
    fix: str  # exactly what to change
    blocking: bool = True


@dataclass(frozen=True)
class Result:
    name: str
    uuid: str
    ram_mib: int
    vcpus: int
    nics: tuple[str, ...]  # each NIC's "type model mac"
    findings: tuple[Finding, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not any(f.blocking for f in self.findings)

    @property
    def blocking(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.blocking)

    @property
    def scan(self) -> str:
        """How its checkpoints find the written pages: "log" (the dirty-page log, where the
        kernel has it: Linux >= 6.7) or "hashed" (no preload in the XML)."""
        return "hashed" if any(f.code == "no-preload" for f in self.findings) else "log"


@dataclass(frozen=True)
class Assessment:
    """A domain as `mirror pair` finds it: its running guest (the live XML; None when it is
    not running) and its next boot (the persistent definition, which the standby is made
    of).  Both must be mirrorable."""

    next_boot: Result
    running: Result | None
    # what the standby's host refuses in the definition it gets (standbycheck), and who
    # checked it ("": not checked)
    standby: tuple[Finding, ...] = ()
    standby_label: str = ""

    @property
    def ok(self) -> bool:
        return (
            self.running is not None
            and self.running.ok
            and self.next_boot.ok
            and not any(f.blocking for f in self.standby)
        )


class DomainXMLError(ValueError):
    """The text is not a domain definition; the message says why."""


_UNITS = {
    "b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
    "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3, "t": 1 << 40, "tib": 1 << 40,
    "tb": 1000**4,
}  # fmt: skip


def _mib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip().isdigit():
        return 0
    unit = _UNITS.get(el.get("unit", "KiB").lower(), 1 << 10)
    return int((el.text or "0").strip()) * unit >> 20


def parse(xml: str) -> ET.Element:
    """The ``<domain>`` element of ``xml``; DomainXMLError if it is not one."""
    if len(xml) > MAX_XML:
        raise DomainXMLError(f"the domain XML is {len(xml)} bytes: not a domain definition")
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise DomainXMLError("the domain XML has a DOCTYPE or entities: libvirt never writes them")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXMLError(f"the domain XML does not parse: {e}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"not a domain definition: its root element is <{root.tag}>")
    if not (root.findtext("name") or "").strip():
        raise DomainXMLError("the domain XML has no <name>")
    return root


def check(xml: str) -> Result:
    """Every finding about the domain in ``xml`` (DomainXMLError if it is not one)."""
    root = parse(xml)
    name = (root.findtext("name") or "").strip()
    out: list[Finding] = []
    out += _hypervisor(root)
    out += _memory(root, name)
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    out += _balloon(devices, name)
    out += _memory_devices(devices)
    nics = devices.findall("interface")
    out += _nics(nics)
    out += _disks(devices)
    out += _other_devices(devices)
    out += _firmware(root, name)
    out += _preload(root, name)
    nic_text = tuple(
        f"{n.get('type')} {_attr(n, 'model', 'type') or 'default'} {_attr(n, 'mac', 'address')}"
        for n in nics
    )
    vcpu = (root.findtext("vcpu") or "1").strip()
    return Result(
        name=name,
        uuid=(root.findtext("uuid") or "").strip(),
        ram_mib=_mib(root.find("memory")),
        vcpus=int(vcpu) if vcpu.isdigit() else 0,
        nics=nic_text,
        findings=tuple(out),
    )


def _attr(el: ET.Element, child: str, attr: str) -> str:
    c = el.find(child)
    return "" if c is None else c.get(attr, "")


def _hypervisor(root: ET.Element) -> list[Finding]:
    kind = root.get("type", "")
    if kind in ("kvm", "qemu"):
        return []
    return [
        Finding(
            "hypervisor",
            f"the domain's type is {kind!r}",
            "mirror drives QEMU (its QMP, its RAM file, its device state)",
            "only <domain type='kvm'> or <domain type='qemu'> domains can be mirrored",
        )
    ]


MEMORY_BACKING = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
RAM_SOURCES = ("file", "memfd")  # shared: mirror maps the file, or QEMU's memfd through its fd
PAGE_REPORTING_WHY = (
    "the guest reports free pages and the host discards them, with no change of the "
    "balloon's size: nothing tells mirror, and the dirty-page log does not see a discard, so "
    "the standby would keep stale contents unseen"
)


def prepare_fix(name: str) -> str:
    """The one step that gives a domain what mirror needs of it at its next start."""
    return (
        f"run `mirror pair {name} --prepare`: it writes {MEMORY_BACKING} (no host-wide "
        f"change) and the dirty-page log's preload into its definition; then restart the domain"
    )


def _memory(root: ET.Element, name: str) -> list[Finding]:
    out: list[Finding] = []
    mb = root.find("memoryBacking")
    source = "" if mb is None else _attr(mb, "source", "type")
    access = "" if mb is None else _attr(mb, "access", "mode")
    numa = root.findall("cpu/numa/cell")
    cell_access = {c.get("memAccess", "") for c in numa}
    shared = (access == "shared" and cell_access <= {"", "shared"}) or (
        bool(numa) and cell_access == {"shared"}
    )
    if mb is not None and mb.find("hugepages") is not None:
        out.append(
            Finding(
                "hugepages",
                f"the guest's RAM is on hugetlbfs (<memoryBacking><hugepages/>"
                f"{', source ' + repr(source) if source else ''})",
                "the dirty-page log and the page scans work on 4 KiB pages",
                "remove <hugepages/> from <memoryBacking> (takes effect at its next start)",
            )
        )
    elif source not in RAM_SOURCES or not shared:
        if source in RAM_SOURCES:
            now = f"a {source} that QEMU maps private (access mode {access or 'private'!r})"
        else:
            now = "private anonymous memory " + (
                "(no <memoryBacking>)" if mb is None
                else f"(<memoryBacking> source {source or 'anonymous (none given)'!r}, access "
                f"{access or 'private (none given)'!r})"
            )  # fmt: skip
        out.append(
            Finding(
                "ram-private",
                f"the guest's RAM is {now}",
                "mirror maps the guest's RAM to copy the pages written in each epoch; memory "
                "QEMU keeps private is visible to no other process",
                prepare_fix(name),
            )
        )
    if mb is not None and mb.find("discard") is not None:
        out.append(
            Finding(
                "ram-discard",
                "<memoryBacking><discard/> is set (QEMU discards the RAM file's pages)",
                "pages dropped behind the guest's back are not in the dirty-page log: the "
                "standby would keep stale contents",
                "remove <discard/> from <memoryBacking>",
            )
        )
    if len(numa) > 1:
        out.append(
            Finding(
                "numa-cells",
                f"the guest has {len(numa)} NUMA cells (<cpu><numa>), one RAM backend each",
                "mirror maps and replicates one RAM backend per guest",
                "remove <numa> from <cpu> (one cell at most)",
            )
        )
    return out


def has_preload(root: ET.Element) -> bool:
    """Whether QEMU gets the dirty-page log's preload library from the XML."""
    cmd = root.find(f"{{{QEMU_NS}}}commandline")
    envs = {} if cmd is None else {e.get("name"): e.get("value", "")
                                   for e in cmd.findall(f"{{{QEMU_NS}}}env")}  # fmt: skip
    return bool(envs.get(uffd.ENV_SOCK)) and "_uffdpreload" in (envs.get("LD_PRELOAD") or "")


def _preload(root: ET.Element, name: str) -> list[Finding]:
    if has_preload(root):
        return []
    return [
        Finding(
            "no-preload",
            "the dirty-page log's preload is not in the domain's <qemu:commandline> "
            f"(<qemu:env name='LD_PRELOAD'/> and {uffd.ENV_SOCK})",
            "without it each checkpoint finds the written pages by hashing all of RAM (the "
            "hashed scan): the pause grows with RAM (p50 23-26 ms against 4 ms with the log "
            "at 128 MiB here)",
            f"`mirror pair {name} --prepare` adds it (takes effect at its next start)",
            blocking=False,
        )
    ]


def _balloon(devices: ET.Element, name: str) -> list[Finding]:
    b = devices.find("memballoon")
    model = "virtio" if b is None else b.get("model", "")
    if model == "none":
        return []
    now = f"a memory balloon <memballoon model={model!r}>" + (
        " (libvirt's default when the element is absent)" if b is None else ""
    )
    if not model.startswith("virtio"):
        return [Finding("balloon", now, "mirror watches the size of a virtio balloon only",
                        "set <memballoon model='none'/> in <devices>")]  # fmt: skip
    if b is not None and b.get("freePageReporting") == "on":
        return [
            Finding(
                "balloon-page-reporting",
                f"{now} with freePageReporting='on'",
                PAGE_REPORTING_WHY,
                f"set freePageReporting='off' on <memballoon> (`mirror pair {name} --prepare` "
                f"does it)",
            )
        ]
    return [
        Finding(
            "balloon",
            now,
            "QEMU discards the pages the balloon takes, unseen by the dirty-page log; mirror "
            "watches the balloon's size while paired and compares all of RAM at the checkpoint "
            "after a change (`virsh setmem`): one long pause per change, nothing lost (the "
            "pages it moves without a change of size are found by the log's safety net)",
            "nothing to change (free page reporting stays off: " + PAGE_REPORTING_WHY + ")",
            blocking=False,
        )
    ]


def _memory_devices(devices: ET.Element) -> list[Finding]:
    out = []
    for m in devices.findall("memory"):
        model = m.get("model", "")
        why = (
            "virtio-mem plugs and unplugs guest memory behind the dirty-page log"
            if model == "virtio-mem"
            else "a memory device is a RAM backend of its own, outside the one mirror maps"
        )
        out.append(
            Finding(
                "memory-device",
                f"a memory device <memory model={model!r}>",
                why,
                f"remove <memory model='{model}'> from <devices> (give the guest that memory "
                f"in <memory> instead)",
            )
        )
    return out


def _nics(nics: list[ET.Element]) -> list[Finding]:
    out = []
    why_type = {
        "user": "user-mode networking (slirp) keeps the guest's connections inside QEMU, "
        "outside any checkpoint: they would be lost on failover",
        "direct": "macvtap sends the guest's frames to the wire from the kernel, with no tap "
        "on a bridge where mirror could hold them until their checkpoint is acknowledged",
        "ethernet": "its tap is on no bridge (routed or scripted by the host): mirror holds "
        "and releases the frames of a tap on a bridge",
        "hostdev": "a passed-through NIC writes guest RAM by DMA (unseen by the dirty-page log) "
        "and its state cannot be saved",
        "vdpa": "a vDPA NIC writes guest RAM by DMA (unseen by the dirty-page log)",
        "vhostuser": "another process (the vhost-user backend) writes guest RAM, unseen by the "
        "dirty-page log",
        "client": "a socket client NIC never reconnects",
        "udp": "a UDP socket NIC drops frames without back-pressure",
        "mcast": "a multicast socket NIC cannot be put under output commit",
    }
    # one finding per NIC at most, each naming that NIC and its one change
    mixed = len(nics) > 1
    for n in nics:
        kind = n.get("type", "")
        mac = _attr(n, "mac", "address") or "?"
        if kind not in NIC_TYPES:
            why = why_type.get(kind, "mirror cannot put this kind of NIC under output commit")
            out.append(Finding("nic-type", f"the NIC {mac} is <interface type={kind!r}>", why,
                               NIC_FIX))
        elif "vhostuser" in (_attr(n, "driver", "name"), _attr(n, "backend", "type")):
            out.append(Finding("vhost-user", f"the NIC {mac} uses a vhost-user backend",
                               why_type["vhostuser"],
                               "use the kernel's vhost-net (<driver name='vhost'/>) or "
                               "QEMU's"))  # fmt: skip
        elif kind == "server" and mixed:
            out.append(
                Finding(
                    "nics",
                    f"the NIC {mac} is a socket NIC <interface type='server'>, one of "
                    f"{len(nics)} NICs",
                    "a socket NIC is relayed alone: mirror holds NICs as defined on their "
                    "taps, or one socket NIC, not both",
                    f"make the NIC {mac} " + NIC_FIX.removeprefix("make it "),
                )
            )
        elif n.find("bandwidth/outbound") is not None:
            out.append(
                Finding(
                    "nic-bandwidth",
                    f"the NIC {mac} has <bandwidth><outbound> (libvirt polices it on the "
                    f"tap's ingress)",
                    "mirror holds the guest's frames on that same ingress hook of the tap "
                    "(a gate per NIC), which the limit's qdisc takes",
                    f"remove <outbound> from the NIC {mac}'s <bandwidth> (<inbound> may stay)",
                )
            )
    if not nics:
        out.append(
            Finding(
                "no-nic",
                "the domain has no NIC",
                "nothing it does reaches a client, so there is no output to commit",
                "nothing to change (it is mirrored all the same)",
                blocking=False,
            )
        )
    return out


def _disks(devices: ET.Element) -> list[Finding]:
    out: list[Finding] = []
    writable: list[str] = []
    for d in devices.findall("disk"):
        dev = d.get("device", "disk")
        target = _attr(d, "target", "dev") or "?"
        src = d.find("source")
        path = "" if src is None else (src.get("file") or src.get("dev") or src.get("name") or "")
        if d.get("type") == "vhostuser":
            out.append(
                Finding(
                    "vhost-user",
                    f"the disk {target} uses a vhost-user backend",
                    "another process writes guest RAM, unseen by the dirty-page log",
                    f"remove the disk {target}, or serve it from QEMU",
                )
            )
            continue
        readonly = d.find("readonly") is not None or dev in ("cdrom", "floppy")
        if readonly:
            if path:
                out.append(
                    Finding(
                        "readonly-media",
                        f"read-only media {target} ({path})",
                        "it is not replicated: the standby's host needs the same file at the "
                        "same path",
                        f"copy {path} to the peer (same path), or eject it",
                        blocking=False,
                    )
                )
            continue
        writable.append(target)
        kind = d.get("type", "file")
        fmt = _attr(d, "driver", "type") or "raw"
        if kind != "file":
            out.append(
                Finding(
                    "disk-type",
                    f"the disk {target} is a <disk type='{kind}'> ({path or 'no source'})",
                    "mirror replicates a disk's file through its own disk server, below "
                    "QEMU's format layer: block devices, volumes and network disks are not "
                    "files it can open on both hosts",
                    f"make the disk {target} a file (raw or qcow2), e.g. qemu-img convert "
                    f"it to a file and point <source file=...> at it",
                )
            )
        elif fmt not in ("raw", "qcow2"):
            out.append(
                Finding(
                    "disk-format",
                    f"the disk {target} is in the {fmt} format",
                    "mirror replicates raw and qcow2 images",
                    f"convert the disk {target} to qcow2 (qemu-img convert -O qcow2)",
                )
            )
        backing = d.find("backingStore/source")
        if backing is not None:
            out.append(
                Finding(
                    "disk-backing",
                    f"the disk {target} has a backing chain "
                    f"({backing.get('file') or backing.get('dev') or '?'})",
                    "mirror replicates one file per disk: a backing file would be missing "
                    "or stale on the peer",
                    f"flatten the disk {target} (virsh blockpull {d.get('name') or ''}"
                    f"{target}, or qemu-img convert) and define it without <backingStore>",
                )
            )
        if d.find("shareable") is not None:
            out.append(
                Finding(
                    "disk-shared",
                    f"the disk {target} is shareable",
                    "another guest writes it too: its writes would not be in this pair's "
                    "checkpoints",
                    f"remove <shareable/> from the disk {target}, or the disk",
                )
            )
    if len(writable) > 1:
        out.append(
            Finding(
                "disk-many",
                f"{len(writable)} writable disks ({', '.join(writable)})",
                "mirror replicates one writable disk per domain (one disk server and "
                "one epoch barrier per checkpoint)",
                f"keep one writable disk (e.g. {writable[0]}); make the others read-only or "
                f"remove them",
            )
        )
    return out


def _other_devices(devices: ET.Element) -> list[Finding]:
    out = []
    for tag, code, why in (
        ("hostdev", "hostdev", "a passed-through device writes guest RAM by DMA, unseen by the "
         "dirty-page log, and its state cannot be saved"),
        ("shmem", "shmem", "shared memory outside the guest's RAM backend is not replicated"),
        ("tpm", "tpm", "an emulated TPM keeps its state in swtpm, outside QEMU's device state"),
        ("redirdev", "redirdev", "a redirected USB device cannot be saved or moved"),
        ("smartcard", "smartcard", "a passed-through smartcard cannot be saved or moved"),
    ):
        # one finding per kind: virt-install's SPICE gives two <redirdev type='spicevmc'>
        kinds: dict[str, int] = {}
        for el in devices.findall(tag):
            kind = f" type={el.get('type')!r}" if el.get("type") else ""
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            out.append(
                Finding(
                    code,
                    f"a <{tag}{kind}> device" if n == 1 else f"{n} <{tag}{kind}> devices",
                    why,
                    f"remove the <{tag}>{' elements' if n > 1 else ''} from <devices>",
                )
            )
    for fs in devices.findall("filesystem"):
        if _attr(fs, "driver", "type") == "virtiofs":
            out.append(
                Finding(
                    "vhost-user",
                    f"a virtiofs filesystem ({_attr(fs, 'target', 'dir') or '?'})",
                    "virtiofsd is a vhost-user backend: another process writes guest RAM, "
                    "unseen by the dirty-page log",
                    "remove the <filesystem> from <devices>",
                )
            )
    return out


NVRAM_DIR = "/var/lib/libvirt/qemu/nvram"  # where libvirt keeps a domain's UEFI variables


def _firmware(root: ET.Element, name: str) -> list[Finding]:
    """UEFI: its variables live in a file of each host's, outside what mirror copies."""
    os_el = root.find("os")
    if os_el is None:
        return []
    nv = os_el.find("nvram")
    loader = os_el.find("loader")
    efi = (
        os_el.get("firmware") == "efi"
        or nv is not None
        or (loader is not None and loader.get("type") == "pflash")
    )
    if not efi:
        return []
    path = (nv.text or "").strip() if nv is not None else ""
    path = path or f"{NVRAM_DIR}/{name}_VARS.fd"  # libvirt's own name for it
    return [
        Finding(
            "nvram",
            f"UEFI firmware (<os firmware='efi'> or a pflash <loader>): its variables are in "
            f"the NVRAM file {path}, one per host",
            "mirror replicates the guest's RAM and its devices' state, not the "
            "NVRAM file nor QEMU's flash copy of it (a RAM block of its own, system.flash1, "
            "beside the guest's RAM backend): the standby's QEMU loads the peer's own "
            "file when the standby starts (libvirt makes it from the firmware's template if "
            "it is absent), so after a failover the firmware sees the peer's variables: "
            "boot entries, BootOrder and Secure Boot keys written on this host are not there "
            "(the guest runs on; they matter at its next boot)",
            f"copy {path} to the peer, at the same path, before `mirror pair` (and again, "
            f"with a new pairing, after the guest changes UEFI variables); nothing to change "
            f"if its variables are the template's. Keep the same firmware package (ovmf) on "
            f"both hosts: the firmware's code is a flash of QEMU's too, read from each "
            f"host's own file",
            blocking=False,
        )
    ]


SCANS = {
    "log": "the dirty-page log (the preload in its XML, or made inside QEMU when paired "
    "live; Linux >= 6.7, else hashed)",
    "hashed": "the hashed scan (no preload in its XML: the pause grows with RAM)",
}


def assess(inactive: str, live: str | None) -> Assessment:
    """Both XMLs checked (DomainXMLError if either is not a domain definition)."""
    return Assessment(check(inactive), None if live is None else check(live))


PRIVATE_RAM = "the guest's RAM is private anonymous memory"


def live_result(r: Result) -> Result:
    """A domain's findings when it is paired live (``mirror pair --live``): its private
    anonymous RAM is read from QEMU's process and its dirty-page log made inside QEMU
    (mirror/guests/procram.py), so neither blocks; the standby runs on a shared memfd."""
    out = []
    for f in r.findings:
        if f.code == "no-preload":
            continue  # the log comes from a userfaultfd made inside QEMU
        if f.code == "ram-private" and f.what.startswith(PRIVATE_RAM):
            f = Finding(
                "ram-private",
                f.what,
                "paired live: mirror reads its RAM from QEMU's process (process_vm_readv) "
                "and makes its dirty-page log inside QEMU; the standby runs on a shared memfd "
                "(and so does the guest after a failover, until its next boot)",
                f"nothing for --live; {prepare_fix(r.name)} to have it mapped instead",
                blocking=False,
            )
        out.append(f)
    return replace(r, findings=tuple(out))


def live(a: Assessment) -> Assessment:
    """:func:`live_result` of both of the assessment's XMLs."""
    return replace(
        a,
        next_boot=live_result(a.next_boot),
        running=None if a.running is None else live_result(a.running),
    )


def with_agent(a: Assessment, bridge: str) -> Assessment:
    """What this host agent configuration adds: a socket NIC's frames are released to
    ``[agent] bridge``; with none, the guest would reach nobody (NICs as defined need no
    setting: their frames go on into their own bridge)."""
    if bridge:
        return a

    def add(r: Result | None) -> Result | None:
        if r is None or not any(n.startswith("server ") for n in r.nics):
            return r
        nowhere = Finding(
            "nic-nowhere",
            "its socket NIC (<interface type='server'>) would be released to [agent] bridge, "
            "which is empty in the host agent's configuration",
            "mirror releases a socket NIC's frames to a tap of its own on that bridge: the "
            "guest would say it is protected and reach nobody",
            "set [agent] bridge = \"BR\" in the host agent configuration, or give the domain a "
            "bridge or network NIC (held on its own tap, no setting needed)",
        )
        return replace(r, findings=(*r.findings, nowhere))

    nb = add(a.next_boot)
    assert nb is not None
    return Assessment(nb, add(a.running))


STANDBY_WHY = (
    "the standby's host runs nothing of its peer's choosing and reads or writes no file "
    "outside the places a domain's files belong there: it refuses the standby's definition "
    "(the persistent one, as sent) and the pairing with it"
)


def _standby_fix(refusal: str, peer: str) -> str:
    if "CPU" in refusal:
        return ("give the domain a CPU model both hosts run (<cpu mode='custom'><model>: "
                "`virsh domcapabilities` on each host lists them), or pair it with a host of "
                "the same CPU")  # fmt: skip
    if "qemu:commandline" in refusal:
        return ("remove those <qemu:arg>/<qemu:env> from the definition (`virsh edit`): "
                "only -qmp unix:PATH and mirror's own preload are taken")  # fmt: skip
    if "LD_PRELOAD" in refusal:
        return ("install the library in the system library directories of both hosts (or "
                "remove it from <qemu:env name='LD_PRELOAD'>)")  # fmt: skip
    if "outside the places" in refusal:
        return (f"put the file in one of those places on both hosts (and change the XML), or "
                f"add its directory to [agent] domain_dirs on {peer or 'the peer'}")  # fmt: skip
    return "remove it from the definition (`virsh edit`)"


def with_standby(
    a: Assessment, refusals: list[str], peer: str, not_asked: str = "", *,
    blocking: bool = False,
) -> Assessment:  # fmt: skip
    """``a`` with what the standby's host refuses in the definition it would get
    (mirror/guests/standbycheck.py): asked of ``peer`` itself, or when it was not asked
    (``not_asked`` says why) checked here for what every host refuses.  ``blocking``: the
    peer was to be asked and did not answer (pairing would fail the same way)."""
    found = [
        Finding("standby-refused", r, STANDBY_WHY, _standby_fix(r, peer))
        for r in dict.fromkeys(refusals)
    ]
    if blocking:
        found.append(
            Finding(
                "standby-unasked",
                f"{peer} did not answer: {not_asked}",
                "pairing asks the peer's host agent to check and prepare the standby",
                f"start `mirror agent` on {peer}, and check its address and key in [peers]",
            )
        )
    if not peer:
        label = f"the standby ({not_asked}: checked here for what every host refuses)"
    elif not not_asked:
        label = f"the standby on {peer} (as {peer} checks its definition)"
    elif blocking:
        label = f"the standby on {peer}"
    else:
        label = (
            f"the standby on {peer} (not asked: {not_asked}; checked here for what every "
            "host refuses)"
        )
    return replace(a, standby=tuple(found), standby_label=label)


def explain_assessment(a: Assessment) -> str:
    """What `mirror pair --check` prints: the running guest and the next boot, each with
    its findings and the scan its checkpoints would use."""
    name = a.next_boot.name
    if a.ok:
        notes = len({(f.code, f.what) for r in (a.running, a.next_boot) if r for f in r.findings})
        head = f"{name}: can be mirrored" + (f" (with {notes} note(s))" if notes else "")
    else:
        head = f"{name}: cannot be mirrored"
    lines = [head]
    parts: list[tuple[str, Result | None]] = [
        ("the running guest (live XML)", a.running), ("its next boot (persistent definition)",
                                                     a.next_boot),
    ]  # fmt: skip
    for label, r in parts:
        if r is None:
            lines.append(f"  {label}: not running: mirror protects a running domain; start it "
                         f"(virsh start {name})")  # fmt: skip
            continue
        if r is a.next_boot and a.running is not None and r.findings == a.running.findings:
            lines.append(f"  {label}: the same")
            continue
        state = "can be mirrored" if r.ok else f"{len(r.blocking)} thing(s) to change"
        lines.append(f"  {label}: {state}; checkpoints would use {SCANS[r.scan]}")
        lines += ["  " + line for line in explain(r).splitlines()[1:]]
    if a.standby_label:
        label = a.standby_label
        if not a.standby:
            lines.append(f"  {label}: can run")
        else:
            lines.append(f"  {label}: {len(a.standby)} thing(s) to change")
            for i, f in enumerate(a.standby, 1):
                lines += [f"    {i}. {f.what} [{f.code}]", f"       why: {f.why}",
                          f"       change: {f.fix}"]  # fmt: skip
    if a.running is not None and not a.running.ok and a.next_boot.ok:
        lines.append(f"  its definition is ready: restart {name} (virsh shutdown {name}, then "
                     f"virsh start {name}) for the running guest to have it")  # fmt: skip
    return "\n".join(lines)


def explain(r: Result) -> str:
    """The findings as an operator reads them."""
    if not r.findings:
        return f"{r.name}: can be mirrored"
    block = r.blocking
    head = (
        f"{r.name}: cannot be mirrored: {len(block)} thing(s) to change"
        if block
        else f"{r.name}: can be mirrored (with {len(r.findings)} note(s))"
    )
    lines = [head]
    for i, f in enumerate(sorted(r.findings, key=lambda f: not f.blocking), 1):
        mark = "" if f.blocking else "note: "
        lines.append(f"  {i}. {mark}{f.what} [{f.code}]")
        lines.append(f"     why: {f.why}")
        lines.append(f"     change: {f.fix}")
    return "\n".join(lines)


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
