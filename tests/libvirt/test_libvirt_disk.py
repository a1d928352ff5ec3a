"""A libvirt domain's own disk (a qcow2 or raw file on virtio, as virt-install writes it),
replicated between two simulated hosts (a libvirtd and a `mirror agent` each) through
mirror's disk server below QEMU's format layer (mirror/guests/libvirtdisk.py):

- its XML never changes (the disk's source stays the operator's file);
- the guest keeps a journal on the disk, written by a client over TCP: through libvirtd
  restarts on both hosts and the kill of host A, every write the guest acknowledged is in
  the journal B's guest reads back;
- A's storage fails (real EIO) and returns while the guest writes: no write fails;
- B's replica is a sound image (``qemu-img check``);
- `mirror unpair` gives the disk back to libvirt's own file node, with the guest running
  and still writing it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(500)]

IMAGE = "/var/lib/libvirt/images/web01"


def inactive(dom: Any) -> str:
    import libvirt

    return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def disks(xml: str) -> list[str]:
    return re.findall(r"<disk .*?</disk>", xml, re.S)


def nodes(dom: Any) -> list[str]:
    import libvirt_qemu

    out = libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-named-block-nodes"}', 0)
    return [n["node-name"] for n in json.loads(out)["return"]]


def check_image(dom: Any, path: Path, fmt: str) -> None:
    """The domain shut down (QEMU flushes its qcow2 caches as it quits), then its image
    checked: no corruption, no leak."""
    import libvirt

    dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
    if fmt != "qcow2":
        return
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "No errors were found" in r.stdout, (
        f"qemu-img check {path}: exit {r.returncode}: {r.stdout} {r.stderr}"
    )


def writes(log: Path) -> int:
    """How far the client has got (its events; the journal writes are among them)."""
    return len(qemudemo.client_events(log))


def stop_client(client: subprocess.Popen[bytes] | None, log: Path) -> dict[str, Any]:
    """The client stopped: its summary (its journal read back from the guest), its
    connection unbroken and every write the guest acknowledged in the journal."""
    assert client is not None
    client.send_signal(signal.SIGTERM)
    client.wait(30)
    summary: dict[str, Any] = next(
        e for e in qemudemo.client_events(log) if e["event"] == "summary"
    )
    assert summary.get("error") is None and summary["journal_intact"], summary
    return summary


@dataclass
class Lab:
    """A pair running the demo domain with a disk, the client writing its journal."""

    root: Path
    guest: libvirtdemo.LibvirtDemoGuest
    a: Host
    b: Host
    original: str  # A's definition before pairing
    log: Path  # the client's events
    client: subprocess.Popen[bytes] | None = None

    def dom(self, host: str) -> Any:
        return self.guest.hosts[host].connect().lookupByName(libvirtdemo.DOMAIN)

    def more_writes(self, what: str, hosts: list[Host], k: int = 20) -> None:
        n = writes(self.log)
        wait_for(what, lambda: writes(self.log) > n + k, 60, hosts)

    def journal(self) -> dict[str, Any]:
        """The client stopped: its summary (the journal read back from the guest)."""
        return stop_client(self.client, self.log)


@contextlib.contextmanager
def paired(guest_image: Path, **kw: Any) -> Iterator[tuple[Lab, list[Host]]]:
    """The demo domain (``kw``: LibvirtDemoGuest's) paired with one `mirror pair`, its disk
    synced, the guest's service up and the client writing its journal every 50 ms;
    everything stopped after."""
    root = Path(tempfile.mkdtemp(prefix="mirror-lvdisk-"))
    lan = GuestLan()
    hosts: list[Host] = []
    guest = libvirtdemo.LibvirtDemoGuest(bridges=("br0",), **kw)
    lab = None
    try:
        base = libvirtdemo.default_base()
        a, b = guest.start(lan, root, base, guest_image, "web01", hosts, lambda *_a, **_k: None)
        assert guest.pair_output[-1].startswith("web01 is protected by hostB"), guest.pair_output
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120, hosts)
        st = a.status() or {}
        assert st["disk"]["synced"] and st["disk"]["peer"], st.get("disk")
        original = (a.dir / "state" / "pairs" / "web01" / "original.xml").read_text()
        lab = Lab(root, guest, a, b, original, root / "client.jsonl")
        serial = guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120, hosts)
        lab.client = qemudemo.start_client(lan, lab.log, connect_for=60, write_every=0.05)
        wait_for("the guest's journal writes", lambda: writes(lab.log) > 20, 60, hosts)
        yield lab, hosts
    finally:
        qemudemo.stop_all(lab.client if lab else None, hosts, guest, lan)
        shutil.rmtree(root, ignore_errors=True)


def test_qcow2_disk_is_replicated_and_every_acknowledged_write_survives_a_host_kill(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    with paired(guest_image, disk="qcow2") as (lab, hosts):
        a, b = lab.a, lab.b
        dom_a = lab.dom("A")
        # the XML as defined: the disk is the operator's file; QEMU has mirror's node below
        assert disks(inactive(dom_a)) == disks(lab.original)
        assert f"<source file='{IMAGE}.qcow2'" in dom_a.XMLDesc(0)
        assert any(n.startswith("mirror-disk-") for n in nodes(dom_a))
        # libvirtd restarts on A and B: QEMU keeps its disk on mirror's server (A) and the
        # standby its replica (B), checkpoints go on
        for h in ("A", "B"):
            lab.guest.hosts[h].restart_libvirtd()
            acked = (a.status() or {}).get("acked", 0)
            wait_for(f"checkpoints after {h}'s libvirtd restart",
                     lambda acked=acked: (a.status() or {}).get("acked", 0) > acked + 10, 30,
                     hosts)  # fmt: skip
        lab.more_writes("more journal writes", hosts)

        lab.guest.kill_a(a)
        a.proc.wait()
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 60, [b])
        lab.more_writes("journal writes on B", [b], 10)
        dom_b = lab.dom("B")
        assert disks(inactive(dom_b)) == disks(lab.original)
        # B's disk server serves the promoted guest
        assert any(n.startswith("mirror-disk-") for n in nodes(dom_b))
        summary = lab.journal()  # every acknowledged write is on B
        assert summary["write_ok"] > 40, summary
        check_image(dom_b, lab.guest.hosts["B"].root / "lib" / "images" / "web01.qcow2", "qcow2")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_unpair_gives_the_disk_back_to_libvirt_with_the_guest_writing(
    libvirt_host: HostFactory, guest_image: Path, fmt: str
) -> None:
    with paired(guest_image, disk=fmt) as (lab, hosts):
        r = subprocess.run(
            [sys.executable, "-m", "mirror", "unpair", "web01", "--agent-config",
             str(lab.a.config_path)], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        dom_a = lab.dom("A")
        assert dom_a.isActive() and inactive(dom_a) == lab.original
        # the format node on libvirt's file again
        assert not any(n.startswith("mirror-disk-") for n in nodes(dom_a))
        lab.more_writes("journal writes after unpair", hosts)
        lab.journal()
        check_image(dom_a, lab.guest.hosts["A"].root / "lib" / "images" / f"web01.{fmt}", fmt)


def test_a_storage_failure_on_a_leaves_the_guest_writing_on_bs_storage(
    libvirt_host: HostFactory, guest_image: Path, tmp_path: Path
) -> None:
    """A's image (raw, on nbdkit behind its error filter, through FUSE: real EIO in the
    kernel) starts failing while the guest writes its journal: A's disk server serves the
    guest from B's replica, no write fails; the image returns, the server goes back to it
    (resync); then host A is killed and B's guest has every acknowledged write."""
    from mirror.lab.faultdisk import FaultyImage, missing_tools

    if missing_tools():
        pytest.skip(f"{missing_tools()}")
    faulty = FaultyImage(tmp_path, libvirtdemo.DISK_MIB << 20)  # before the hosts' namespaces
    try:
        with paired(guest_image, disk="raw", disk_file=faulty.path) as (lab, hosts):
            a, b = lab.a, lab.b

            def disk() -> dict[str, Any]:
                return dict((a.status() or {}).get("disk") or {})

            assert disk()["storage"] == "local"
            faulty.fail()  # every read, write and flush of A's image: EIO
            wait_for("A's disk on B's storage", lambda: disk().get("storage") == "remote", 30,
                     hosts)  # fmt: skip
            st = disk()
            assert st["failovers"] == 1 and "Input/output error" in st["storage_error"], st
            lab.more_writes("journal writes on B's storage", hosts)
            assert (a.status() or {}).get("phase") == "protected"

            faulty.heal()
            wait_for("A's disk back on its own storage", lambda: disk().get("storage") == "local",
                     60, hosts)  # fmt: skip
            wait_for("the resync", lambda: disk()["dirty_local"] == 0, 60, hosts)
            assert disk()["switchbacks"] == 1
            lab.more_writes("journal writes after", hosts)

            lab.guest.kill_a(a)
            a.proc.wait()
            wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 60, [b])
            lab.more_writes("journal writes on B", [b], 10)
            lab.journal()
    finally:
        faulty.close()


def test_a_primary_role_killed_alone_fails_over_and_its_host_becomes_the_standby(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """The primary role (not its host) is SIGKILLed while the guest writes: its disk server
    stops streaming (no role: nothing more commits on B; its NICs' gates hold every frame), B
    promotes from its replica, A's host agent stops A's fenced guest and starts the
    standby there, B protects the guest again onto A (the disk resynced the other way),
    and no write the guest acknowledged is lost."""
    with paired(guest_image, disk="qcow2") as (lab, hosts):
        a, b = lab.a, lab.b
        assert isinstance(a, libvirtdemo.AgentHost)
        old = a.role_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 60, hosts)
        wait_for("B protected again, A its standby",
                 lambda: (b.status() or {}).get("phase") == "protected"
                 and (a.status() or {}).get("role") == "secondary", 180, hosts)  # fmt: skip
        assert any(n.startswith("mirror-disk-") for n in nodes(lab.dom("B")))
        assert (b.status() or {})["disk"]["synced"]
        lab.more_writes("journal writes on B", hosts)
        lab.journal()
