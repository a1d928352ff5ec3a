"""`mirror demo --guest libvirt`: the host-kill demo (mirror/lab/qemudemo.py's flow and
summary) with the guest run by libvirt.

It runs the way an operator does: each host has its own libvirtd and virtlogd in its
network namespace (mirror/lab/libvirtlab.py) and its own `mirror agent`; on A the demo
guest is a persistent domain with autostart on, started before mirror is; then ONE
command on A, `mirror pair web01 --peer hostB` (its output is in the timeline): B's
agent starts the standby (a paused domain of A's XML), A's host agent turns autostart off
and starts the primary, which attaches to the domain.  Killing host A kills its host agent,
its role, its libvirtd, virtlogd and QEMU (by process group and pid).  The report says
how the domain runs on B (active, persistent) and whether A's definition would
autostart.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.config import AgentSection, Config, LibvirtConfig
from mirror.guests import image
from mirror.guests.libvirtxml import preload_env
from mirror.hoststate import read_json
from mirror.lab.demo import Host, wait_for
from mirror.lab.libvirtlab import TARGETS, LibvirtHost, check_capable, domain_xml
from mirror.lab.netlab import GUEST_IP, IC_IP, GuestLan
from mirror.lab.qemudemo import PORT, Mark
from mirror.replication import keys

DOMAIN = "web01"
DISK_MIB = 64  # the demo domain's disk (virtual size)
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


def demo_domain(
    img: Path, base: Config, serial: Path, qmp_sock: Path | None = None, *,
    backing: str = "file", balloon: bool = False, kernel_args: str = "",
    bridges: tuple[str, ...] = (), disk: tuple[str, str, str] | None = None,
) -> str:  # fmt: skip
    """``backing``: the guest RAM's <memoryBacking> source ("file" or "memfd", shared);
    ``balloon``: a virtio balloon instead of none; ``kernel_args``: more for the guest's
    kernel; ``bridges``: its NICs as defined, ``<interface type='bridge'>`` on each of
    these bridges, instead of the socket NIC; ``disk``: (path, format, bus) of its disk."""
    xml = domain_xml(
        DOMAIN,
        img,
        ram_mib=base.guest.ram_mib,
        cmdline=f"console=ttyS0 quiet mirror.ip={GUEST_IP}/24 mirror.port={PORT} {kernel_args}"
        .strip(),
        serial=serial,
        nic_port=None if bridges else NIC_PORT,
        bridges=bridges,
        disk=disk,
    ).replace("<source type='file'/>", f"<source type='{backing}'/>")
    if balloon:
        xml = xml.replace("<memballoon model='none'/>", "<memballoon model='virtio'/>")
    return xml.replace("</domain>", qmp_args(qmp_sock, log=True) + "</domain>")


NETWORK = "lan"  # the libvirt network of each host's LAN bridge (forward mode bridge)


def operator_domain(
    img: Path, base: Config, serial: Path, disk: str, *, prepared: bool = True
) -> str:
    """The demo guest defined as virt-install defines a server (``--os-variant debian12
    --graphics none``), after ``mirror pair --prepare`` (``prepared=False``: as virt-install
    left it, private anonymous RAM and no preload, for ``mirror pair --live``): RAM on a
    shared memfd with the dirty-page log's preload, a virtio balloon, a ``network`` NIC, a
    qcow2 disk on virtio with discard, a virtio RNG, the guest agent's channel, a serial
    console (to a file, which the demo reads), booting the demo image's kernel."""
    mac = "52:54:00:12:34:56"
    backing = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
               if prepared else "")  # fmt: skip
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='KiB'>{base.guest.ram_mib * 1024}</memory>
  <currentMemory unit='KiB'>{base.guest.ram_mib * 1024}</currentMemory>
  {backing}
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel(img)}</kernel>
    <initrd>{img / "initramfs.cpio.gz"}</initrd>
    <cmdline>console=ttyS0 quiet mirror.ip={GUEST_IP}/24 mirror.port={PORT}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/><timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='qemu-xhci' ports='15'/>
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='{NETWORK}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <console type='file'><source path='{serial}'/><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
{qmp_args(None, log=prepared)}</domain>
"""


def agent_toml(
    root: Path, me: str, peer: str, uri: str, base: Config | None = None,
    image_dir: Path | None = None,
) -> str:  # fmt: skip
    """Host ``me``'s host agent configuration (``me``, ``peer``: "A" or "B"): its interconnect
    address in the lab, its libvirtd, the LAN bridge, its key (made in ``root/keys``),
    the shared directory as arbiter, the other host as its peer."""
    for h in (me, peer):
        if not (root / "keys" / f"host{h}.key_secret").exists():
            keys.generate(root / "keys", f"host{h}")
    (root / "shared").mkdir(parents=True, exist_ok=True)
    cp = base.checkpoint if base else None
    # the lab's libvirt directories, and the guest image (kernel, initrd) where it is
    dirs = ":".join([AgentSection().domain_dirs, str(image_dir or image.DEFAULT_DIR), str(root)])
    epoch = f'\n[checkpoint]\nepoch_ms = {cp.epoch_ms}\nscan = "{cp.scan}"\n' if cp else ""
    return f"""[agent]
node = "host{me}"
state_dir = "{root / f"host{me}" / "state"}"
address = "{IC_IP[me]}"
connect = "{uri}"
bridge = "br0"
domain_dirs = "{dirs}"

[keys]
secret_key = "{root / "keys" / f"host{me}.key_secret"}"

[arbiter]
dir = "{root / "shared"}"
{epoch}
[peers.host{peer}]
address = "{IC_IP[peer]}"
public_key = "{root / "keys" / f"host{peer}.key"}"
"""


class AgentHost(Host):
    """A simulated host's `mirror agent`, in its network namespace and a process group of
    its own; ``status()`` is that of its role of pair ``pair`` (a process group the host agent
    started: killed and stopped along with the host agent)."""

    def __init__(self, name: str, toml: str, root: Path, pair: str, prefix: list[str]) -> None:
        super().__init__(name, "agent", toml, root, prefix=prefix)
        self.role_dir = self.dir / "state" / "pairs" / pair / "role"

    def status(self) -> dict[str, Any] | None:
        try:
            return dict(read_json(self.role_dir / "status.json"))
        except (OSError, ValueError):
            return None

    def role_pid(self) -> int | None:
        pid = (self.status() or {}).get("pid")
        return pid if isinstance(pid, int) and pid > 1 else None

    def signal(self, sig: int) -> None:
        super().signal(sig)
        if (pid := self.role_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def stop(self, timeout: float = 10) -> None:
        """The host agent first (a live agent would start a stopped role again), then the role."""
        pid = self.role_pid()
        super().stop(timeout)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            while time.monotonic() < deadline + 10:  # until no process of the group is left
                os.killpg(pid, signal.SIGKILL if time.monotonic() > deadline else 0)
                time.sleep(0.05)


class LibvirtDemoGuest:
    label = "libvirt"

    def __init__(
        self, *, backing: str = "file", balloon: bool = False, kernel_args: str = "",
        bridges: tuple[str, ...] = (), disk: str = "", disk_bus: str = "virtio",
        operator: bool = False, disk_file: Path | None = None, live: bool = False,
        before_pair: Callable[[], None] | None = None, pair_args: tuple[str, ...] = (),
        must_pair: bool = True,
    ) -> None:
        """``disk``: "raw" or "qcow2": the domain has a disk of that format (DISK_MIB, in
        A's /var/lib/libvirt/images) on ``disk_bus``, which the guest keeps its journal on;
        ``operator``: the domain as virt-install defines it instead (operator_domain(), with
        a qcow2 disk): the demo's; ``disk_file``: A's disk is that file (a file of this
        machine's, e.g. mirror/lab/faultdisk.py's, made before start()), bind-mounted at
        the path the XML names in A's mount namespace; ``live``: the operator's domain as
        virt-install left it (private RAM, no preload), paired with ``mirror pair --live``;
        ``before_pair``: called once the domain runs, before it is paired."""
        self.disk_file = disk_file
        self.live = live
        self.before_pair = before_pair
        self.pair_args, self.must_pair = pair_args, must_pair
        self.pair_code: int | None = None
        if live:
            operator = True
        self.operator = operator
        if operator:
            disk = "qcow2"
        self.disk = disk
        self.xml_before: dict[str, str] = {}
        self.xml_after: dict[str, str] = {}
        self.domain_options = {
            "backing": backing, "balloon": balloon, "kernel_args": kernel_args,
            "bridges": bridges,
            "disk": (f"{TARGETS['lib']}/images/{DOMAIN}.{disk}", disk, disk_bus) if disk else None,
        }  # fmt: skip
        self.hosts: dict[str, LibvirtHost] = {}
        self.serial_path = Path("/nonexistent")
        self.pair_output: list[str] = []

    def check(self, base: Config) -> None:
        check_capable()

    def _libvirtds(self, lan: GuestLan, root: Path) -> None:
        for h in ("A", "B"):
            self.hosts[h] = LibvirtHost(root, h, netns=lan.ns[h])
        self.hosts["B"].connect()

    def start(
        self,
        lan: GuestLan,
        root: Path,
        base: Config,
        img: Path,
        pair: str,
        hosts: list[Host],
        mark: Mark,
    ) -> tuple[Host, Host]:
        """As an operator would: a libvirtd and a `mirror agent` on each host, the domain
        defined (autostart on) and started on A, then ONE command on A: `mirror pair
        web01 --peer hostB` (its output goes into the timeline)."""
        self._libvirtds(lan, root)
        agents = {}
        for h, peer in (("B", "A"), ("A", "B")):
            toml = agent_toml(root, h, peer, self.hosts[h].uri, base, img)
            # in the host's own mount namespace: paths in the domain's XML under
            # /run/libvirt and /var/log/libvirt are then this host's, as on a real host
            agents[h] = AgentHost(f"host{h}", toml, root, DOMAIN, [*self.hosts[h].enter(), "--"])
            hosts.append(agents[h])
        for h in ("A", "B"):
            wait_for(f"host {h}'s agent", (agents[h].dir / "state" / "control.sock").exists,
                     60, hosts)  # fmt: skip
        mark("hosts A and B: each its own libvirtd, virtlogd and `mirror agent`")
        # the serial log and mirror's QMP socket in the host's own /var/log/libvirt and
        # /run/libvirt: the standby gets the same XML, and its paths are B's own there
        self.serial_path = self.hosts["A"].root / "log" / f"{DOMAIN}-serial.log"
        serial = Path(TARGETS["log"]) / f"{DOMAIN}-serial.log"
        sock = Path(TARGETS["run"]) / f"mirror-{DOMAIN}-qmp.sock"
        if self.operator:  # the LAN bridge as a libvirt network on each host
            for h in ("A", "B"):
                net = self.hosts[h].connect().networkDefineXML(
                    f"<network><name>{NETWORK}</name><forward mode='bridge'/>"
                    f"<bridge name='br0'/></network>"
                )
                net.create()
                net.setAutostart(1)
        if self.disk:  # an image as an operator makes one, in A's own images directory
            images = self.hosts["A"].root / "lib" / "images"
            images.mkdir(parents=True, exist_ok=True)
            target = images / f"{DOMAIN}.{self.disk}"
            if self.disk_file is None:
                subprocess.run(["qemu-img", "create", "-q", "-f", self.disk, str(target),
                                f"{DISK_MIB}M"], check=True, capture_output=True)  # fmt: skip
            else:  # (its mount is in A's namespace: made before it, copied into it)
                target.touch()
                subprocess.run([*self.hosts["A"].enter(), "--", "mount", "--bind",
                                str(self.disk_file), f"{TARGETS['lib']}/images/{target.name}"],
                               check=True, capture_output=True)  # fmt: skip
        conn = self.hosts["A"].connect()
        qmp = sock if base.libvirt.qmp == "socket" else None
        if self.operator:
            xml = operator_domain(img, base, serial, f"{TARGETS['lib']}/images/{DOMAIN}.qcow2",
                                  prepared=not self.live)
        else:
            xml = demo_domain(img, base, serial, qmp, **self.domain_options)  # type: ignore[arg-type]
        dom = conn.defineXML(xml)
        dom.setAutostart(1)
        dom.create()
        self.xml_before = {"live": dom.XMLDesc(0), "defined": dom.XMLDesc(2)}
        mark(f"host A: domain {DOMAIN} defined (autostart on) and started by its libvirtd")
        if self.before_pair is not None:
            self.before_pair()
        cmd = ["mirror", "pair", DOMAIN, "--peer", "hostB", *(["--live"] if self.live else []),
               *self.pair_args, "--agent-config", str(agents["A"].config_path)]  # fmt: skip
        mark(f"host A: $ {' '.join(cmd)}")
        proc = subprocess.Popen(
            [*self.hosts["A"].enter(), "--", sys.executable, "-m", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.pair_output.append(line.rstrip())
                mark(f"  | {line.rstrip()}")
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.pair_code = code
        if code != 0 and self.must_pair:
            raise RuntimeError(f"`mirror pair` failed (exit {code}):\n" +
                               "\n".join(self.pair_output[-10:]))  # fmt: skip
        if code == 0:
            dom = self.hosts["A"].connect().lookupByName(DOMAIN)
            self.xml_after = {"live": dom.XMLDesc(0), "defined": dom.XMLDesc(2)}
        return agents["A"], agents["B"]

    def serial(self, root: Path) -> Path:
        return self.serial_path

    def kill_a(self, a: Host) -> str:
        return self.kill_host(a, "A")

    def kill_host(self, h: Host, name: str) -> str:
        """Host ``name`` ("A" or "B") dies whole: its host agent (``h``) and role, its
        QEMU, libvirtd and virtlogd, SIGKILLed."""
        role = h.role_pid() if isinstance(h, AgentHost) else None
        lv = self.hosts[name]
        qemu, daemons = lv.qemu_pid(DOMAIN), lv.group()
        h.signal(signal.SIGKILL)  # the host agent (and, run by a host agent, its role)
        lv.kill()  # its QEMU, libvirtd and virtlogd
        what = f"its host agent's process group {h.proc.pid}"
        if role is not None:
            what += f", its role's {role}"
        return f"SIGKILL to {what}, libvirtd's and virtlogd's {daemons}, QEMU {qemu}"

    def report(self) -> dict[str, Any]:
        b: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            dom = self.hosts["B"].connect().lookupByName(DOMAIN)
            state, _ = dom.state()
            b = {"active": bool(dom.isActive()), "persistent": bool(dom.isPersistent()),
                 "running": state == 1, "autostart": bool(dom.autostart())}  # fmt: skip
        autostart_a = self.hosts["A"].root / "etc" / "qemu" / "autostart" / f"{DOMAIN}.xml"
        before, after = self.xml_before, self.xml_after
        return {
            "libvirt": {
                "domain": DOMAIN,
                # A's XML once paired against before: the running domain's byte for byte;
                # the definition apart from mirror's pair mark (<metadata>, mark_paired)
                "xml_live_unchanged": bool(before) and before.get("live") == after.get("live"),
                "xml_defined_unchanged_but_mark": bool(before)
                and _unmarked(after.get("defined", "")) == _unmarked(before.get("defined", "")),
                "pair_output": self.pair_output,
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


def _unmarked(xml: str) -> str:
    """A definition without mirror's pair mark (the <metadata> element mark_paired adds)."""
    import re

    xml = re.sub(r"\s*<mirror:pair [^>]*/>", "", xml)
    return re.sub(r"\s*<metadata>\s*</metadata>", "", xml)


def print_libvirt(r: dict[str, Any]) -> None:
    lv = r.get("libvirt", {})
    on_b = lv.get("on_b", {})
    if "xml_live_unchanged" in lv:
        print(
            "libvirt: domain XML on host A once paired: running domain "
            f"{'byte for byte as before' if lv['xml_live_unchanged'] else 'CHANGED'}; "
            "definition "
            + ("byte for byte as before apart from mirror's pair mark (<metadata>)"
               if lv["xml_defined_unchanged_but_mark"] else "CHANGED")
        )  # fmt: skip
    print(
        f"libvirt: domain {lv.get('domain')} on host B: "
        f"{'running' if on_b.get('running') else 'NOT running'}, "
        f"{'persistent' if on_b.get('persistent') else 'transient'}, autostart "
        f"{'on' if on_b.get('autostart') else 'off'} (as on A before pairing); host A's definition "
        f"autostarts: {'YES (split-brain risk)' if lv.get('a_autostart') else 'no'}"
    )
