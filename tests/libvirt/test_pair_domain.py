"""`mirror pair` of a real libvirt domain, end to end: two simulated hosts (network
namespaces, a private libvirtd each), a `mirror agent` on each, one command on A, and
`mirror unpair` giving the domain's definition back exactly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mirror.guests import uffd
from mirror.guests.domaincheck import QEMU_NS
from mirror.guests.libvirtdom import META_URI
from mirror.hoststate import read_json
from mirror.lab.libvirtdemo import agent_toml
from mirror.lab.libvirtlab import domain_xml
from mirror.lab.netlab import GUEST_IP, GuestLan
from mirror.lab.qemudemo import PORT
from mirror.replication import keys
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(300)]

DOMAIN = "web01"
LIBZ = "/usr/lib/x86_64-linux-gnu/libz.so.1"  # a library every Debian host has


def mirror(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=timeout)


def agent_config(root: Path, me: str, peer: str, uri: str) -> Path:
    path = root / f"host{me}" / "agent.toml"  # the demo's agent configuration
    path.parent.mkdir()
    path.write_text(agent_toml(root, me, peer, uri))
    return path


def inactive(conn: object) -> str:
    import libvirt

    dom = conn.lookupByName(DOMAIN)  # type: ignore[attr-defined]
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def test_pair_and_unpair_a_libvirt_domain(libvirt_host: HostFactory, guest_image: Path,
                                          tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    for n in ("hostA", "hostB"):
        keys.generate(tmp_path / "keys", n)
    agents: list[subprocess.Popen[bytes]] = []
    role_dirs: list[Path] = []
    with GuestLan() as lan:
        try:
            ha, hb = libvirt_host("A", netns=lan.ns["A"]), libvirt_host("B", netns=lan.ns["B"])
            conn = ha.connect()
            hb.connect()
            xml = domain_xml(DOMAIN, guest_image, nic_port=5600,
                             cmdline=f"console=ttyS0 quiet mirror.ip={GUEST_IP}/24 "
                                     f"mirror.port={PORT}")
            # the operator's own preload library (one both hosts have): kept on B
            xml = xml.replace("</domain>", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:env "
                              f"name='LD_PRELOAD' value='{LIBZ}'/></qemu:commandline></domain>")
            dom = conn.defineXML(xml)
            dom.setAutostart(1)
            dom.create()
            before = inactive(conn)
            cfg = {h: agent_config(tmp_path, h, "B" if h == "A" else "A", x.uri)
                   for h, x in (("A", ha), ("B", hb))}
            for h in ("A", "B"):
                log = open(tmp_path / f"host{h}" / "agent.log", "wb")  # noqa: SIM115
                agents.append(subprocess.Popen(
                    ["ip", "netns", "exec", lan.ns[h], sys.executable, "-m", "mirror", "agent",
                     "--config", str(cfg[h])], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
                role_dirs += [tmp_path / f"host{h}" / "state" / "pairs" / DOMAIN / "role"]
            deadline = time.monotonic() + 30
            while any(mirror("list", "--agent-config", str(c)).returncode for c in cfg.values()):
                assert time.monotonic() < deadline, "the agents did not start"
                time.sleep(0.2)

            t0 = time.monotonic()
            r = mirror("pair", DOMAIN, "--peer", "hostB", "--agent-config", str(cfg["A"]))
            took = time.monotonic() - t0
            logs = "".join((tmp_path / f"host{h}" / "agent.log").read_text() for h in "AB")
            assert r.returncode == 0, r.stdout + r.stderr + logs
            print(r.stdout)
            print(f"mirror pair {DOMAIN}: protected in {took:.1f} s")
            assert f"{DOMAIN} is protected by hostB" in r.stdout
            listed = mirror("list", "--agent-config", str(cfg["B"])).stdout
            assert DOMAIN in listed and "secondary" in listed
            standby = hb.connect().lookupByName(DOMAIN)
            assert standby.isActive() and not standby.isPersistent()  # the paused standby
            envs = {e.get("name"): e.get("value", "") for e in
                    ET.fromstring(standby.XMLDesc(0)).iter(f"{{{QEMU_NS}}}env")}  # fmt: skip
            preload = uffd.preload_entries(envs["LD_PRELOAD"])
            assert preload[-1] == LIBZ and uffd.is_mirror_preload(preload[0]), preload
            marked = inactive(conn)
            assert 'peer="hostB"' in marked and not conn.lookupByName(DOMAIN).autostart()

            r = mirror("unpair", DOMAIN, "--agent-config", str(cfg["A"]))
            assert r.returncode == 0, r.stdout + r.stderr
            assert "standby dropped on hostB" in r.stdout
            assert inactive(conn) == before  # exactly as it was
            assert conn.lookupByName(DOMAIN).autostart() == 1
            assert conn.lookupByName(DOMAIN).isActive()  # unpairing leaves the guest running
            assert DOMAIN not in [d.name() for d in hb.connect().listAllDomains()]
            for c in cfg.values():
                assert DOMAIN not in mirror("list", "--agent-config", str(c)).stdout
        finally:
            for p in agents:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            for d in role_dirs:
                with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
                    os.killpg(int(read_json(d / "status.json")["pid"]), signal.SIGKILL)


def test_a_pair_that_cannot_run_is_refused_up_front_or_undone_whole(
    libvirt_host: HostFactory, guest_image: Path, tmp_path: Path
) -> None:
    """Bugs of issue 21: a shut-off domain, and a running guest whose definition was
    edited but not yet restarted, are refused by `mirror pair` itself (what --check says);
    a primary that cannot hold the guest's frames (its tap taken by another tool) ends,
    and the pairing is undone on both hosts: no standby, the definition and autostart as
    they were, no pair, and nothing claims to wait for a promotion."""
    import libvirt

    (tmp_path / "shared").mkdir()
    for n in ("hostA", "hostB"):
        keys.generate(tmp_path / "keys", n)
    agents: list[subprocess.Popen[bytes]] = []
    with GuestLan() as lan:
        try:
            ha, hb = libvirt_host("A", netns=lan.ns["A"]), libvirt_host("B", netns=lan.ns["B"])
            conn = ha.connect()
            hb.connect()
            cfg = {h: agent_config(tmp_path, h, "B" if h == "A" else "A", x.uri)
                   for h, x in (("A", ha), ("B", hb))}
            for h in ("A", "B"):
                log = open(tmp_path / f"host{h}" / "agent.log", "wb")  # noqa: SIM115
                agents.append(subprocess.Popen(
                    ["ip", "netns", "exec", lan.ns[h], sys.executable, "-m", "mirror", "agent",
                     "--config", str(cfg[h])], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
            deadline = time.monotonic() + 30
            while any(mirror("list", "--agent-config", str(c)).returncode for c in cfg.values()):
                assert time.monotonic() < deadline, "the agents did not start"
                time.sleep(0.2)

            def nothing_left(name: str, before: str) -> None:
                assert inactive_of(conn, name) == before
                assert conn.lookupByName(name).autostart() == 1
                assert name not in [d.name() for d in hb.connect().listAllDomains()]
                for c in cfg.values():
                    listed = mirror("list", "--agent-config", str(c))
                    assert name not in listed.stdout and "promote" not in listed.stdout
                    st = mirror("status", name, "--agent-config", str(c))
                    assert "waiting for it to promote" not in st.stdout + st.stderr

            def pair(name: str) -> subprocess.CompletedProcess[str]:
                return mirror("pair", name, "--peer", "hostB", "--agent-config", str(cfg["A"]))

            def define(name: str, xml: str) -> tuple[object, str]:
                dom = conn.defineXML(xml)
                dom.setAutostart(1)
                return dom, inactive_of(conn, name)

            cmdline = f"console=ttyS0 quiet mirror.ip={GUEST_IP}/24 mirror.port={PORT}"
            # 1. shut off: refused up front, as --check says
            _, before = define("off01", domain_xml("off01", guest_image, bridges=("br0",),
                                                     cmdline=cmdline))
            r = pair("off01")
            assert r.returncode == 1, r.stdout + r.stderr
            assert "not running" in r.stdout + r.stderr
            nothing_left("off01", before)

            # 2. running on anonymous RAM, its definition already edited (memfd): the
            # running guest is what the primary attaches to: refused, with the restart
            anon = domain_xml("edit01", guest_image, bridges=("br0",), cmdline=cmdline).replace(
                "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "")
            dom, _ = define("edit01", anon)
            dom.create()  # type: ignore[attr-defined]
            conn.defineXML(inactive_of(conn, "edit01").replace(
                "<vcpu ", "<memoryBacking><source type='memfd'/><access mode='shared'/>"
                "</memoryBacking><vcpu ", 1))  # fmt: skip
            assert "memfd" in inactive_of(conn, "edit01")
            before = inactive_of(conn, "edit01")
            r = pair("edit01")
            assert r.returncode == 1, r.stdout + r.stderr
            assert "ram-private" in r.stdout + r.stderr and "restart" in r.stdout + r.stderr
            nothing_left("edit01", before)
            dom.destroy()  # type: ignore[attr-defined]

            # 3. fine on paper, but its tap's ingress is another tool's: the primary
            # cannot hold its frames and ends; the whole pairing is undone
            dom, before = define("web01", domain_xml("web01", guest_image, bridges=("br0",),
                                                     cmdline=cmdline))
            dom.create()  # type: ignore[attr-defined]
            tap = dom.XMLDesc(0).split("<target dev='")[1].split("'")[0]  # type: ignore[attr-defined]
            lan.run("A", "tc", "qdisc", "add", "dev", tap, "ingress")
            r = pair("web01")
            assert r.returncode == 1, r.stdout + r.stderr
            assert "ingress qdisc" in r.stdout + r.stderr, r.stdout + r.stderr
            assert "nothing is left of it" in r.stderr
            nothing_left("web01", before)
            assert dom.isActive()  # type: ignore[attr-defined]
            assert "clsact" not in lan.run("A", "tc", "qdisc", "show", "dev", tap)
            flags = libvirt.VIR_DOMAIN_XML_INACTIVE
            assert META_URI not in dom.XMLDesc(flags)  # type: ignore[attr-defined]
            print(r.stdout + r.stderr)

            # 4. a <qemu:commandline> argument the standby's host refuses, and a preload
            # library it lacks: `--check --peer` asks hostB (through this host agent), and
            # says both before pairing, as the standby's; pairing refuses the same
            argv = domain_xml("argv01", guest_image, bridges=("br0",), cmdline=cmdline)
            argv = argv.replace("</domain>", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'>"
                                "<qemu:arg value='-msg'/><qemu:arg value='timestamp=on'/>"
                                "<qemu:env name='LD_PRELOAD' value='libnonexistent-mirror.so'/>"
                                "</qemu:commandline></domain>")  # fmt: skip
            dom, before = define("argv01", argv)
            dom.create()  # type: ignore[attr-defined]
            r = mirror("pair", "argv01", "--check", "--peer", "hostB", "--agent-config",
                       str(cfg["A"]))  # fmt: skip
            assert r.returncode == 1, r.stdout + r.stderr
            out = r.stdout
            assert "the running guest (live XML): can be mirrored" in out, out
            assert "the standby on hostB (as hostB checks its definition): 2 thing(s) to " \
                "change" in out, out
            assert out.count("[standby-refused]") == 2 and "'-msg'" in out, out
            assert "libnonexistent-mirror.so', which this host does not have" in out, out
            r = pair("argv01")
            assert r.returncode == 1 and "'-msg'" in r.stdout + r.stderr, r.stdout + r.stderr
            nothing_left("argv01", before)
            # without a host agent here: what every host refuses, checked here, and a note
            (tmp_path / "alone.toml").write_text(cfg["A"].read_text().replace(
                str(tmp_path / "hostA" / "state"), str(tmp_path / "alone")))  # fmt: skip
            r = mirror("pair", "argv01", "--check", "--peer", "hostB", "--agent-config",
                       str(tmp_path / "alone.toml"))  # fmt: skip
            assert r.returncode == 1 and "not asked: no host agent runs here" in r.stdout, \
                r.stdout + r.stderr
            dom.destroy()  # type: ignore[attr-defined]
        finally:
            for p in agents:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def inactive_of(conn: object, name: str) -> str:
    import libvirt

    dom = conn.lookupByName(name)  # type: ignore[attr-defined]
    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
