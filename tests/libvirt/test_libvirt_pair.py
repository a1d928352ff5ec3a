"""A libvirt domain mirrored between two simulated hosts, each with its own libvirtd
(mirror/lab/libvirtlab.py) in its network namespace: the client's TCP connection to the
guest survives the kill of host A (agent, libvirtd, virtlogd, QEMU), the domain then
runs on B as a persistent libvirt domain, and libvirtd restarts while paired change
nothing."""

from __future__ import annotations

import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(300)]


def test_paired_with_one_command_the_connection_survives_the_kill_of_host_a(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """The demo (`mirror demo --guest libvirt`): an agent per host, the domain as
    virt-install defines it (a qcow2 disk holding the guest's journal, a network NIC, a
    balloon, memfd RAM), `mirror pair web01 --peer hostB` on A, a client, host A killed
    (agent, role, libvirtd, virtlogd, QEMU)."""
    # no -qmp socket in the domain's XML: the agent has the roles use QMP through libvirt
    # (the other test uses mirror's own monitor socket)
    base = libvirtdemo.default_base()
    base = replace(base, libvirt=replace(base.libvirt, qmp="libvirt"))
    guest = libvirtdemo.LibvirtDemoGuest(operator=True)
    r = qemudemo.run(base, guest=guest, image_dir=guest_image, kill_after=2, run_on=2,
                     quiet=True)  # fmt: skip
    assert r["libvirt"]["pair_output"][-1].startswith("web01 is protected by hostB")
    c = r["client"]
    assert r["connection_survived"], c
    assert c["gaps"] == 0 and c["echo_bad"] == 0 and c["echo_ok"] > 0, c
    assert r["promoted_status"]["role"] == "primary"
    # autostart as the domain had it on A before pairing (on)
    assert r["libvirt"]["on_b"] == {
        "active": True, "persistent": True, "running": True, "autostart": True
    }
    assert r["libvirt"]["a_autostart"] is False  # A's agent turned it off when pairing
    # every write the guest acknowledged is in the journal B's guest reads back
    assert c["journal_intact"] and c["write_ok"] > 10, c
    # pairing changed nothing of the running domain's XML, and the definition only by the mark
    assert r["libvirt"]["xml_live_unchanged"] and r["libvirt"]["xml_defined_unchanged_but_mark"]
    assert not guest.hosts  # closed by the demo


def test_libvirtd_restarts_on_both_hosts_while_paired_change_nothing(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """Paired the demo's way (agents, `mirror pair`), QMP on the domain's own socket."""
    base = libvirtdemo.default_base()  # qmp = "socket"
    root = Path(tempfile.mkdtemp(prefix="mirror-lvtest-"))
    lan = GuestLan()
    guest = libvirtdemo.LibvirtDemoGuest()
    hosts: list[Host] = []
    client = None
    try:
        a, b = guest.start(lan, root, base, guest_image, "web01", hosts, lambda *_a, **_k: None)
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        serial = guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120, hosts)
        log = root / "client.jsonl"
        client = qemudemo.start_client(lan, log, connect_for=60)
        connected = lambda: any(e["event"] == "connected" for e in qemudemo.client_events(log))  # noqa: E731
        wait_for("the client", connected, 60, hosts)
        for h in ("A", "B"):
            pid = guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN)
            guest.hosts[h].restart_libvirtd()
            assert guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN) == pid
            acked = (a.status() or {}).get("acked", 0)
            wait_for(f"checkpoints after {h}'s libvirtd restart",
                     lambda acked=acked: (a.status() or {}).get("acked", 0) > acked + 10,
                     30, hosts)  # fmt: skip
        assert (a.status() or {}).get("phase") == "protected"
        assert guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN).isActive()
        # B's standby outlived its libvirtd's restart: it still takes over
        guest.kill_a(a)
        a.proc.wait()
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        n = len(qemudemo.client_events(log))
        wait_for("the client reading from B",
                 lambda: len(qemudemo.client_events(log)) > n + 5, 30, [b])  # fmt: skip
        client.send_signal(signal.SIGTERM)
        client.wait(10)
        summary = next(e for e in qemudemo.client_events(log) if e["event"] == "summary")
        assert summary.get("error") is None and summary["gaps"] == 0, summary
        assert guest.hosts["B"].connect().lookupByName(libvirtdemo.DOMAIN).isPersistent()
    finally:
        qemudemo.stop_all(client, hosts, guest, lan)
        shutil.rmtree(root, ignore_errors=True)
