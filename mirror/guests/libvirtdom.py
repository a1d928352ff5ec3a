"""A libvirt domain's definition as `mirror pair` and `mirror unpair` change it, and nothing
more: read its XML, mark it as paired (autostart off, a metadata element) and put it back
exactly as it was.  libvirt-python is imported here, when a command needs it.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any

from mirror.guests.base import GuestError
from mirror.guests.domaincheck import Assessment, Finding, assess, check
from mirror.guests.libvirtxml import prepared_xml

META_URI = "https://github.com/mirror/pair"  # the namespace of mirror's <metadata> element
META_KEY = "mirror"


class LibvirtError(RuntimeError):
    """libvirt could not be used for this; the message says what and why."""


def _libvirt() -> Any:
    try:
        import libvirt  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        raise LibvirtError(
            "libvirt-python is not installed: run scripts/setup (it installs libvirt-python "
            "with mirror), or `pip install libvirt-python`"
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stderr noise
    return libvirt


class Domains:
    """A connection to libvirt at ``uri``."""

    def __init__(self, uri: str) -> None:
        self.lv = _libvirt()
        self.uri = uri
        try:
            self.conn = self.lv.open(uri)
        except self.lv.libvirtError as e:
            raise LibvirtError(
                f"cannot connect to libvirt at {uri}: {e.get_error_message()} (is libvirtd "
                f"running? give another URI with --connect)"
            ) from None

    def close(self) -> None:
        with contextlib.suppress(self.lv.libvirtError):
            self.conn.close()

    def __enter__(self) -> Domains:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dom(self, name: str) -> Any:
        try:
            return self.conn.lookupByName(name)
        except self.lv.libvirtError:
            names = sorted(d.name() for d in self.conn.listAllDomains())
            raise LibvirtError(
                f"no domain {name!r} at {self.uri} (its domains: {', '.join(names) or 'none'})"
            ) from None

    def inactive_xml(self, name: str) -> str:
        """The domain's persistent definition (as `virsh dumpxml --inactive --security-info`)."""
        d = self._dom(name)
        return str(
            d.XMLDesc(self.lv.VIR_DOMAIN_XML_INACTIVE | self.lv.VIR_DOMAIN_XML_SECURE)
        )

    def live_xml(self, name: str) -> str:
        d = self._dom(name)
        return str(d.XMLDesc(self.lv.VIR_DOMAIN_XML_SECURE))

    def facts(self, name: str) -> dict[str, Any]:
        d = self._dom(name)
        return {
            "persistent": bool(d.isPersistent()),
            "active": bool(d.isActive()),
            "autostart": bool(d.autostart()) if d.isPersistent() else False,
        }

    def assess(self, name: str) -> Assessment:
        """`mirror pair --check`: the running guest (live XML) and the next boot (the
        persistent definition; a transient domain has none: a blocking finding)."""
        d = self._dom(name)
        live = self.live_xml(name) if d.isActive() else None
        if not d.isPersistent():
            assert live is not None  # a transient domain exists only while it runs
            r = check(live)
            transient = Finding(
                "transient",
                f"{name} is a transient domain (no persistent definition)",
                "the standby's host gets the domain's persistent definition, and this host's "
                "is marked so that it never boots the guest behind the pair's back",
                f"define it: virsh dumpxml {name} > {name}.xml; virsh define {name}.xml",
            )
            return Assessment(replace(r, findings=(transient, *r.findings)), r)
        return assess(self.inactive_xml(name), live)

    def prepare(self, name: str) -> list[str]:
        """`mirror pair --prepare`: write what mirror needs into the domain's persistent
        definition, for its next start (libvirtxml.prepared_xml); each change made."""
        d = self._dom(name)
        if not d.isPersistent():
            raise LibvirtError(f"{name} is a transient domain: define it first (virsh define)")
        try:
            xml, changes = prepared_xml(self.inactive_xml(name))
        except GuestError as e:
            raise LibvirtError(f"{name}: {e}") from None
        if changes:
            try:
                self.conn.defineXML(xml)
            except self.lv.libvirtError as e:
                raise LibvirtError(
                    f"cannot define {name}'s prepared definition: {e.get_error_message()}"
                ) from None
        return changes

    def guest_cpu(self, name: str) -> str:
        """The CPU the running guest ``name`` has, as a ``<cpu>`` the standby's host must
        be able to run (virConnectCompareCPU): this host's CPU for host-passthrough,
        host-model and maximum (what the guest sees follows the host); the guest's own
        ``<cpu>`` for a named model with features.  "" for a TCG domain (type 'qemu':
        QEMU emulates its CPU on any host) or one without ``<cpu>``."""
        root = ET.fromstring(self.live_xml(name))
        cpu = root.find("cpu")
        if root.get("type") != "kvm" or cpu is None:
            return ""
        if cpu.get("mode", "custom") == "custom":
            return ET.tostring(cpu, encoding="unicode") if cpu.find("model") is not None else ""
        host = ET.fromstring(self.conn.getCapabilities()).find("host/cpu")
        return "" if host is None else ET.tostring(host, encoding="unicode")

    def cpu_refusal(self, cpu: str) -> str:
        """Why this host cannot run a guest whose CPU is ``cpu`` (guest_cpu() of its
        primary's host; untrusted input); "" if it can."""
        if not cpu:
            return ""
        try:
            ET.fromstring(cpu)
            r = self.conn.compareCPU(cpu, 0)
        except ET.ParseError as e:
            return f"the guest's CPU description is not XML ({e})"
        except self.lv.libvirtError as e:
            return f"this host cannot compare its CPU with the guest's: {e.get_error_message()}"
        if r == self.lv.VIR_CPU_COMPARE_INCOMPATIBLE:
            root = ET.fromstring(cpu)
            model = (root.findtext("model") or "?").strip()
            return (
                f"this host's CPU lacks features of the guest's CPU ({model}, as the primary's "
                f"host gives it): the guest could not go on here after a failover"
            )
        return ""

    def require_running(self, name: str) -> None:
        """LibvirtError unless the domain runs (not paused, not shut off): what pairing it
        live (``--live``) protects is a guest that runs."""
        d = self._dom(name)
        state = d.state()[0]
        if state == self.lv.VIR_DOMAIN_RUNNING:
            return
        if state == self.lv.VIR_DOMAIN_PAUSED:
            raise LibvirtError(f"{name} is paused: resume it (virsh resume {name}) first")
        raise LibvirtError(f"{name} is not running: start it (virsh start {name}) first")

    def destroy(self, name: str) -> bool:
        """Stop the domain now if it runs (True if it did)."""
        d = self._dom(name)
        try:
            if not d.isActive():
                return False
            d.destroy()
        except self.lv.libvirtError as e:
            raise LibvirtError(f"cannot stop {name}: {e.get_error_message()}") from None
        return True

    def mark_paired(self, name: str, peer: str) -> None:
        """Autostart off and a ``<mirror:pair peer=...>`` metadata element in the persistent
        definition: this host's libvirt must not boot the guest behind the pair's back."""
        d = self._dom(name)
        try:
            d.setAutostart(0)
            d.setMetadata(
                self.lv.VIR_DOMAIN_METADATA_ELEMENT,
                f'<pair peer="{_xml_attr(peer)}"/>',
                META_KEY,
                META_URI,
                self.lv.VIR_DOMAIN_AFFECT_CONFIG,
            )
        except self.lv.libvirtError as e:
            raise LibvirtError(f"cannot mark {name} as paired: {e.get_error_message()}") from None

    def restore(self, name: str, xml: str, autostart: bool) -> None:
        """Define ``xml`` (the definition before pairing) again and set autostart as it was."""
        try:
            d = self.conn.defineXML(xml)
            d.setAutostart(1 if autostart else 0)
        except self.lv.libvirtError as e:
            raise LibvirtError(
                f"cannot restore {name}'s definition: {e.get_error_message()}"
            ) from None


def _xml_attr(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )
