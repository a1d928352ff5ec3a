"""`mirror demo --guest libvirt`: the host-kill demo (mirror/lab/qemudemo.py's flow and
summary) with the guest run by libvirt.

Each host has its own libvirtd and virtlogd in its network namespace
(mirror/lab/libvirtlab.py).  On A the demo guest is a persistent domain with autostart
on, started before mirror is; mirror's primary attaches to it (and turns autostart
off).  B's secondary keeps a paused standby domain from the XML in ``standby.xml``.
Killing host A kills its agent, its libvirtd, virtlogd and QEMU.  The report says how
the domain runs on B (active, persistent) and whether A's definition would autostart.
"""

from __future__ import annotations

import contextlib
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.config import Config, LibvirtConfig
from mirror.guests.libvirt import preload_env
from mirror.lab.demo import Host, with_keys
from mirror.lab.libvirtlab import LibvirtHost, check_capable, domain_xml
from mirror.lab.netlab import GUEST_IP, IC_IP, GuestLan
from mirror.lab.qemudemo import PORT

DOMAIN = "web01"
NIC_PORT = 5600  # in each host's own network namespace (nothing else listens there)


def qmp_args(sock: Path | None, *, log: bool = False) -> str:
    """The <qemu:commandline> that gives mirror a QMP socket of its own (``sock``) and,
    with ``log``, the preload library of the dirty-page log."""
    args = (
        f"<qemu:arg value='-qmp'/><qemu:arg value='unix:{sock},server=on,wait=off'/>"
        if sock
        else ""
    )
    envs = "".join(
        f"<qemu:env name='{k}' value='{v}'/>" for k, v in (preload_env() if log else {}).items()
    )
    if not args and not envs:
        return ""
    return (
        f"<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>{args}"
        f"{envs}</qemu:commandline>"
    )


def demo_domain(root: Path, host: str, img: Path, base: Config) -> str:
    xml = domain_xml(
        DOMAIN,
        img,
        ram_mib=base.guest.ram_mib,
        cmdline=f"console=ttyS0 quiet mirror.ip={GUEST_IP}/24 mirror.port={PORT}",
        serial=root / f"{host}-serial.log",
        nic_port=NIC_PORT,
    )
    sock = root / f"{host}-qmp.sock" if base.libvirt.qmp == "socket" else None
    log = base.checkpoint.scan in ("auto", "log")
    return xml.replace("</domain>", qmp_args(sock, log=log) + "</domain>")


class LibvirtDemoGuest:
    label = "libvirt"

    def __init__(self) -> None:
        self.hosts: dict[str, LibvirtHost] = {}

    def check(self, base: Config) -> None:
        check_capable()

    def configs(
        self, lan: GuestLan, root: Path, base: Config, img: Path, pair: str
    ) -> tuple[Config, Config]:
        (root / "shared").mkdir(parents=True, exist_ok=True)
        for h in ("A", "B"):
            self.hosts[h] = LibvirtHost(root, h, netns=lan.ns[h])
        conn = self.hosts["A"].connect()
        dom = conn.defineXML(demo_domain(root, "hostA", img, base))
        dom.setAutostart(1)
        dom.create()
        standby = root / "standby.xml"  # what the host agent writes on B when pairing
        standby.write_text(demo_domain(root, "hostB", img, base))
        lv = replace(base.libvirt, domain=DOMAIN, tap="mtap0", bridge="br0")
        common = replace(
            base,
            pair=replace(base.pair, name=pair),
            guest=replace(base.guest, kind="libvirt"),
            link=replace(base.link, host=IC_IP["B"], data_port=7400, heartbeat_port=7401),
            arbiter=replace(base.arbiter, dir=str(root / "shared")),
        )
        a = replace(
            common,
            node=replace(base.node, name="hostA", state_dir=str(root / "hostA")),
            libvirt=replace(lv, connect=self.hosts["A"].uri),
        )
        b = replace(
            common,
            node=replace(base.node, name="hostB", state_dir=str(root / "hostB")),
            link=replace(common.link, peer_host=IC_IP["A"]),
            libvirt=replace(lv, connect=self.hosts["B"].uri, standby_xml=str(standby)),
        )
        self.root = root
        return with_keys(root / "keys", a, b)

    def serial(self, root: Path) -> Path:
        return root / "hostA-serial.log"

    def kill_a(self, a: Host) -> None:
        a.signal(signal.SIGKILL)  # the agent
        self.hosts["A"].kill()  # its QEMU, libvirtd and virtlogd

    def report(self) -> dict[str, Any]:
        b: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            dom = self.hosts["B"].connect().lookupByName(DOMAIN)
            state, _ = dom.state()
            b = {"active": bool(dom.isActive()), "persistent": bool(dom.isPersistent()),
                 "running": state == 1}  # fmt: skip
        autostart_a = self.hosts["A"].root / "etc" / "qemu" / "autostart" / f"{DOMAIN}.xml"
        return {
            "libvirt": {
                "domain": DOMAIN,
                "on_b": b,
                "a_autostart": autostart_a.exists() or autostart_a.is_symlink(),
            }
        }

    def close(self) -> None:
        for h in self.hosts.values():
            h.close()
        self.hosts.clear()


def default_base(ram_mib: int = 128, epoch_ms: int = 50) -> Config:
    base = Config()
    return replace(
        base,
        guest=replace(base.guest, kind="libvirt", ram_mib=ram_mib),
        libvirt=LibvirtConfig(domain=DOMAIN),
        checkpoint=replace(base.checkpoint, epoch_ms=epoch_ms),
    )


def print_libvirt(r: dict[str, Any]) -> None:
    lv = r.get("libvirt", {})
    on_b = lv.get("on_b", {})
    print(
        f"libvirt: domain {lv.get('domain')} on host B: "
        f"{'running' if on_b.get('running') else 'NOT running'}, "
        f"{'persistent' if on_b.get('persistent') else 'transient'}; host A's definition "
        f"autostarts: {'YES (split-brain risk)' if lv.get('a_autostart') else 'no'}"
    )
