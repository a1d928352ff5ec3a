"""A libvirt domain with its NICs as operators define them (``<interface type='bridge'>``),
mirrored between two simulated hosts (a libvirtd and a `mirror agent` each): its frames
are held by the gate on its tap (mirror/replication/nicgate.py), its XML is never changed,
libvirtd restarts on both hosts leave the gates in place, a client's TCP connection
survives the kill of host A, and `mirror unpair` on B after
the failover leaves the guest reachable, its definition as the operator gave it and no
gate on its tap."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(400)]


def taps(xml: str) -> list[str]:
    return re.findall(r"<target dev='([^']+)'", xml)


def gated(lan: GuestLan, host: str, tap: str) -> bool:
    """Whether ``tap`` (in ``host``'s namespace) has mirror's hold filter."""
    out = lan.run(host, "tc", "filter", "show", "dev", tap, "ingress") if "clsact" in lan.run(
        host, "tc", "qdisc", "show", "dev", tap) else ""
    return "mirror_hold" in out


def nics(xml: str) -> list[str]:
    return re.findall(r"<interface.*?</interface>", xml, re.S)


def inactive(dom: object) -> str:
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    return str(dom.XMLDesc(flags))  # type: ignore[attr-defined]


def test_bridged_nics_pair_survive_a_host_kill_and_unpair_on_b_gives_them_back(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """Two bridged NICs, each on its own bridge (one bridged NIC through a host kill and
    libvirtd restarts: tests/libvirt/test_libvirt_disk.py and test_libvirt_live.py)."""
    bridges = ("br0", "br1")
    base = libvirtdemo.default_base()
    root = Path(tempfile.mkdtemp(prefix="mirror-lvnic-"))
    lan = GuestLan()
    for h in ("A", "B"):
        for br in bridges[1:]:  # a second bridge on each host (no port: a second network)
            lan.run(h, "ip", "link", "add", br, "type", "bridge")
            lan.run(h, "ip", "link", "set", br, "up")
    guest = libvirtdemo.LibvirtDemoGuest(bridges=bridges)
    hosts: list[Host] = []
    client = None
    try:
        a, b = guest.start(lan, root, base, guest_image, "web01", hosts, lambda *_a, **_k: None)
        assert guest.pair_output[-1].startswith("web01 is protected by hostB"), guest.pair_output
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        conn_a = guest.hosts["A"].connect()
        dom_a = conn_a.lookupByName(libvirtdemo.DOMAIN)
        original = (a.dir / "state" / "pairs" / "web01" / "original.xml").read_text()
        live = dom_a.XMLDesc(0)
        # the NICs as defined: bridge NICs on their bridges, each tap held by the gate
        assert [n.count("type='bridge'") for n in nics(live)] == [1] * len(bridges)
        assert re.findall(r"<source bridge='([^']+)'", live) == list(bridges)
        tap_a = taps(live)
        assert len(tap_a) == len(bridges) and all(gated(lan, "A", t) for t in tap_a)
        # B's standby is held too, before it ever runs
        standby = guest.hosts["B"].connect().lookupByName(libvirtdemo.DOMAIN)
        tap_b = taps(standby.XMLDesc(0))
        assert len(tap_b) == len(bridges) and all(gated(lan, "B", t) for t in tap_b)
        # the definition pairing changes is its mark and autostart only: the NICs are as given
        assert nics(inactive(dom_a)) == nics(original)

        serial = guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120, hosts)
        log = root / "client.jsonl"
        client = qemudemo.start_client(lan, log, connect_for=60)
        connected = lambda: any(e["event"] == "connected" for e in qemudemo.client_events(log))  # noqa: E731
        wait_for("the client", connected, 60, hosts)
        n = len(qemudemo.client_events(log))
        wait_for("the client reading", lambda: len(qemudemo.client_events(log)) > n + 5, 30,
                 hosts)  # fmt: skip

        # libvirtd restarts on both hosts: the gates stay, the checkpoints go on
        for h in ("A", "B"):
            guest.hosts[h].restart_libvirtd()
            tap_h = tap_a if h == "A" else tap_b
            assert all(gated(lan, h, t) for t in tap_h), f"{h}'s libvirtd restart kept the gate"
            acked = (a.status() or {}).get("acked", 0)
            wait_for(f"checkpoints after {h}'s libvirtd restart",
                     lambda acked=acked: (a.status() or {}).get("acked", 0) > acked + 10,
                     30, hosts)  # fmt: skip
        assert (a.status() or {}).get("phase") == "protected"

        guest.kill_a(a)
        a.proc.wait()
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 60, [b])
        n = len(qemudemo.client_events(log))
        wait_for("the client reading from B",
                 lambda: len(qemudemo.client_events(log)) > n + 5, 30, [b])  # fmt: skip
        dom_b = guest.hosts["B"].connect().lookupByName(libvirtdemo.DOMAIN)
        # B's definition is the one the operator gave (none of the standby's own)
        assert dom_b.isPersistent() and inactive(dom_b) == original

        r = subprocess.run(
            [sys.executable, "-m", "mirror", "unpair", "web01", "--agent-config",
             str(b.config_path)], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "the definition as given on hostA): left as it is" in r.stdout, r.stdout
        assert inactive(dom_b) == original
        assert dom_b.isActive()
        assert not any(gated(lan, "B", t) for t in taps(dom_b.XMLDesc(0)))
        # the guest still reaches its client, now directly
        n = len(qemudemo.client_events(log))
        wait_for("the client reading after unpair",
                 lambda: len(qemudemo.client_events(log)) > n + 5, 30, [b])  # fmt: skip
        client.send_signal(signal.SIGTERM)
        client.wait(10)
        summary = next(e for e in qemudemo.client_events(log) if e["event"] == "summary")
        assert summary.get("error") is None and summary["gaps"] == 0, summary
    finally:
        qemudemo.stop_all(client, hosts, guest, lan)
        shutil.rmtree(root, ignore_errors=True)


def test_a_gate_broken_while_paired_is_reported(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """Another tool deletes the hold filter on the paired guest's tap (its frames then
    leave unheld): the primary's status.json and `mirror status DOMAIN` say so, naming
    the tap, while the guest runs."""
    from mirror.replication.nicgate import HOLD_PREF

    base = libvirtdemo.default_base()
    root = Path(tempfile.mkdtemp(prefix="mirror-lvgate-"))
    lan = GuestLan()
    guest = libvirtdemo.LibvirtDemoGuest(bridges=("br0",))
    hosts: list[Host] = []
    try:
        a, b = guest.start(lan, root, base, guest_image, "web01", hosts, lambda *_a, **_k: None)
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        dom_a = guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN)
        (tap,) = taps(dom_a.XMLDesc(0))
        assert gated(lan, "A", tap) and (a.status() or {}).get("output_faults") == []
        assert (b.status() or {}).get("output_faults") == []  # B's standby: held, whole

        def status() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "mirror", "status", "web01", "--agent-config",
                 str(a.config_path)], capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        assert "BROKEN" not in status().stdout
        lan.run("A", "tc", "filter", "del", "dev", tap, "ingress", "pref", str(HOLD_PREF))
        wait_for("the broken gate reported",
                 lambda: (a.status() or {}).get("output_faults"), 30, hosts)  # fmt: skip
        (fault,) = (a.status() or {})["output_faults"]
        assert fault.startswith(f"{tap}: the hold filter on {tap}'s ingress is gone"), fault
        r = status()
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"NIC gate: BROKEN: {tap}: the hold filter" in r.stdout, r.stdout
    finally:
        qemudemo.stop_all(None, hosts, guest, lan)
        shutil.rmtree(root, ignore_errors=True)
