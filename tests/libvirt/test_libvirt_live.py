"""`mirror pair --live`: a running domain as virt-install defines it (private anonymous RAM,
no preload, a qcow2 disk, a virtio balloon, a `network` NIC) paired without a restart,
between two simulated hosts (a libvirtd and a `mirror agent` each), with a TCP client
connected to the guest from before the pairing:

- the guest never reboots (one boot on A's console; its counter, read by the client,
  goes on) and the client's connection survives the pairing, then the kill of host A;
  every journal write the guest acknowledged is on B;
- its definitions: A's as the operator gave it (mirror's mark aside); B's standby on a
  shared memfd; B's promoted domain defined as the operator gave it;
- a pairing the peer refuses changes nothing: the domain runs on, its definition byte for
  byte as before, no userfaultfd left in QEMU, autostart as it was."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mirror.lab import libvirtdemo, qemudemo
from mirror.lab.demo import Host, wait_for
from mirror.lab.netlab import GuestLan
from tests.libvirt.conftest import HostFactory
from tests.libvirt.test_libvirt_disk import Lab, check_image, inactive, stop_client, writes

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(500)]


def uffds(pid: int) -> int:
    """How many userfaultfds process ``pid`` holds."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    return n


def boots(serial: Path) -> int:
    return serial.read_text(errors="replace").count("guestd: listening")


def counters(log: Path) -> list[int]:
    """The guest's counter as the client read it (from guest memory: a reboot restarts it)."""
    return [int(e["n"]) for e in qemudemo.client_events(log) if e.get("event") == "counter"]


def connections(log: Path) -> int:
    return sum(e.get("event") == "connected" for e in qemudemo.client_events(log))


@dataclass
class LiveRun:
    """One run of the lab: the operator's domain started on A, the client connected and
    writing its journal before `mirror pair web01 --peer hostB --live` (its ``then``
    called after that, still before the pairing)."""

    root: Path
    lan: GuestLan
    guest: libvirtdemo.LibvirtDemoGuest
    hosts: list[Host] = field(default_factory=list)
    client: subprocess.Popen[bytes] | None = None
    defined: str = ""  # A's definition before pairing

    @property
    def log(self) -> Path:
        return self.root / "client.jsonl"

    def start(self, guest_image: Path) -> tuple[Host, Host]:
        return self.guest.start(self.lan, self.root, libvirtdemo.default_base(), guest_image,
                                "web01", self.hosts, lambda *_a, **_k: None)  # fmt: skip

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)


@contextlib.contextmanager
def live_run(then: Callable[[LiveRun], None] | None = None, **kw: Any) -> Iterator[LiveRun]:
    """A LiveRun (``kw``: LibvirtDemoGuest's), everything stopped after."""
    root = Path(tempfile.mkdtemp(prefix="mirror-lvlive-"))
    run = LiveRun(root, GuestLan(), libvirtdemo.LibvirtDemoGuest(bridges=("br0",), live=True))

    def before_pair() -> None:  # the guest's service up, the client connected and writing
        serial = run.guest.serial(root)
        wait_for("the service", lambda: "guestd: listening" in serial.read_text(), 120,
                 run.hosts)  # fmt: skip
        run.client = qemudemo.start_client(run.lan, run.log, connect_for=60, write_every=0.05)
        wait_for("journal writes before pairing", lambda: writes(run.log) > 10, 60, run.hosts)
        run.defined = inactive(run.guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN))
        if then is not None:
            then(run)

    run.guest = libvirtdemo.LibvirtDemoGuest(bridges=("br0",), live=True,
                                             before_pair=before_pair, **kw)  # fmt: skip
    try:
        yield run
    finally:
        qemudemo.stop_all(run.client, run.hosts, run.guest, run.lan)
        shutil.rmtree(root, ignore_errors=True)


def stopped_client(run: LiveRun) -> dict[str, Any]:
    """The client stopped: its summary (its journal read back); the connection from
    before the pairing intact, every acknowledged write in the journal, no reboot seen."""
    summary = stop_client(run.client, run.log)
    assert summary["repeats"] == 0 and connections(run.log) == 1, summary
    return summary


@contextlib.contextmanager
def live_paired(guest_image: Path) -> Iterator[tuple[Lab, list[Host], GuestLan]]:
    """A LiveRun paired and protected, as a Lab."""
    with live_run() as run:
        a, b = run.start(guest_image)
        assert run.guest.pair_output[-1].startswith("web01 is protected by hostB"), \
            run.guest.pair_output
        wait_for("protected", lambda: (a.status() or {}).get("phase") == "protected", 120,
                 run.hosts)  # fmt: skip
        original = (a.dir / "state" / "pairs" / "web01" / "original.xml").read_text()
        lab = Lab(run.root, run.guest, a, b, original, run.log, run.client)
        yield lab, run.hosts, run.lan


def test_a_running_domain_with_private_ram_is_paired_live_and_survives_a_host_kill(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    with live_paired(guest_image) as (lab, hosts, _lan):
        a, b = lab.a, lab.b
        dom_a = lab.dom("A")
        live_xml = dom_a.XMLDesc(0)
        assert "<memoryBacking>" not in live_xml  # its RAM private, as it was started
        assert "<memoryBacking>" not in inactive(dom_a)
        # the dirty-page log, made inside QEMU: mirror holds the only userfaultfd
        roles = a.status() or {}
        assert roles["summary"]["scan"] == "log", roles["summary"]
        assert re.fullmatch(r"/proc/\d+/mem", roles["ram"]), roles["ram"]
        qemu = lab.guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN)
        assert qemu is not None and uffds(qemu) == 0  # QEMU's own copy was closed at once
        serial = lab.guest.serial(lab.root)
        assert boots(serial) == 1
        # B's standby: on a shared memfd, waiting
        dom_b = lab.dom("B")
        assert "<source type='memfd'/>" in dom_b.XMLDesc(0)
        lab.more_writes("journal writes while protected", hosts)
        seen = counters(lab.log)
        assert seen and seen == sorted(seen), "the guest's counter went back: a reboot?"

        lab.guest.kill_a(a)
        a.proc.wait()
        wait_for("B promoted", lambda: (b.status() or {}).get("role") == "primary", 60, [b])
        lab.more_writes("journal writes on B", [b], 10)
        # B's definition: the operator's (private RAM at its next boot); it runs on the memfd
        dom_b = lab.dom("B")
        assert "<memoryBacking>" not in inactive(dom_b)
        assert "<source type='memfd'/>" in dom_b.XMLDesc(0)
        summary = lab.journal()  # the connection from before pairing, every write on B
        assert summary["write_ok"] > 40 and summary["repeats"] == 0, summary
        assert connections(lab.log) == 1
        after = counters(lab.log)
        assert after == sorted(after) and len(after) > len(seen)
        check_image(dom_b, lab.guest.hosts["B"].root / "lib" / "images" / "web01.qcow2", "qcow2")


def test_a_live_pairing_the_peer_refuses_changes_nothing(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """B cannot start the standby (its libvirt network is gone): `mirror pair --live`
    fails with the reason, and the domain on A runs on as it was."""

    def no_network_on_b(run: LiveRun) -> None:
        net = run.guest.hosts["B"].connect().networkLookupByName(libvirtdemo.NETWORK)
        net.destroy()
        net.undefine()

    with live_run(no_network_on_b) as run:
        with pytest.raises(RuntimeError, match="pair"):
            run.start(guest_image)
        said = "\n".join(run.guest.pair_output)
        assert "did not start on hostB" in said or "network" in said, said
        assert "Traceback" not in said
        dom = run.guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN)
        assert dom.isActive() and inactive(dom) == run.defined and dom.autostart() == 1
        qemu = run.guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN)
        assert qemu is not None and uffds(qemu) == 0
        assert boots(run.guest.serial(run.root)) == 1
        n = writes(run.log)
        wait_for("journal writes after", lambda: writes(run.log) > n + 10, 60, run.hosts)
        a = run.host("hostA")
        assert isinstance(a, libvirtdemo.AgentHost)
        listed = subprocess.run(
            [*run.guest.hosts["A"].enter(), "--", sys.executable, "-m", "mirror", "list",
             "--agent-config", str(a.config_path)], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "web01" not in listed.stdout, listed.stdout
        stopped_client(run)


@pytest.mark.parametrize("lost", ["the standby's host", "the primary role", "the primary's host"])
def test_a_live_pairing_that_loses_a_side_midway_leaves_the_guest_running(
    libvirt_host: HostFactory, guest_image: Path, lost: str
) -> None:
    """Killed during the pre-copy: host B whole (its agent, the standby, libvirtd), or A's
    primary role alone.  The guest on A runs on, never rebooted, its client's connection
    intact and its journal writes acknowledged again; with the role gone the pairing is
    undone (A's definition byte for byte, autostart on, the disk back on libvirt's own file
    node, no userfaultfd in QEMU); with host B gone the pair stays, unprotected, for B's
    return; with host A gone the guest is gone with it (it was not protected yet) and B
    never runs it (no checkpoint committed there)."""
    import threading

    from tests.libvirt.test_libvirt_disk import nodes

    killed: list[float] = []

    def kill_in_precopy(run: LiveRun) -> None:
        a, b = run.host("hostA"), run.host("hostB")
        assert isinstance(a, libvirtdemo.AgentHost)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = a.status() or {}
            if st.get("phase") == "precopy" and a.role_pid() == st.get("pid"):
                if lost == "the primary role":
                    os.kill(int(st["pid"]), signal.SIGKILL)
                elif lost == "the primary's host":
                    run.guest.kill_host(a, "A")
                else:
                    run.guest.kill_host(b, "B")
                killed.append(time.time())
                return
            time.sleep(0.005)

    killer: list[threading.Thread] = []

    def start_killer(run: LiveRun) -> None:
        killer.append(threading.Thread(target=kill_in_precopy, args=(run,), daemon=True))
        killer[0].start()

    with live_run(start_killer, pair_args=("--timeout", "20"), must_pair=False) as run:
        run.start(guest_image)
        killer[0].join(10)
        assert killed, "the pre-copy was never seen"
        assert run.guest.pair_code != 0, run.guest.pair_output
        said = "\n".join(run.guest.pair_output)
        assert "Traceback" not in said
        if lost == "the primary's host":
            b = run.host("hostB")
            time.sleep(5)  # B judges A gone: nothing committed, nothing to promote
            assert (b.status() or {}).get("role") != "primary", b.status()
            conn_b = run.guest.hosts["B"].connect()
            running = [d.name() for d in conn_b.listAllDomains()
                       if d.isActive() and d.state()[0] == 1]  # VIR_DOMAIN_RUNNING
            assert running == [], running
            return
        dom = run.guest.hosts["A"].connect().lookupByName(libvirtdemo.DOMAIN)
        assert dom.isActive() and boots(run.guest.serial(run.root)) == 1
        n = writes(run.log)
        wait_for("journal writes after the loss", lambda: writes(run.log) > n + 20, 60, [])
        qemu = run.guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN)
        assert qemu is not None
        if lost == "the primary role":  # the pairing undone, the domain as it was
            wait_for("the pairing undone", lambda: inactive(dom) == run.defined, 30, [])
            assert dom.autostart() == 1 and uffds(qemu) == 0
            assert not any(x.startswith("mirror-disk-") for x in nodes(dom))
        stopped_client(run)


def test_unpair_after_a_live_pairing_leaves_the_domain_as_the_operator_gave_it(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """`mirror unpair` of a domain paired live: it runs on with its private RAM, its
    definition byte for byte as before pairing, its disk on libvirt's own file node, no
    userfaultfd in QEMU, the client's connection and journal writes going on."""
    from tests.libvirt.test_libvirt_disk import nodes

    with live_paired(guest_image) as (lab, hosts, _lan):
        assert isinstance(lab.a, libvirtdemo.AgentHost)
        r = subprocess.run(
            [*lab.guest.hosts["A"].enter(), "--", sys.executable, "-m", "mirror", "unpair",
             "web01", "--agent-config", str(lab.a.config_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        dom = lab.dom("A")
        assert dom.isActive() and inactive(dom) == lab.guest.xml_before["defined"]
        assert "<memoryBacking>" not in dom.XMLDesc(0)
        assert not any(x.startswith("mirror-disk-") for x in nodes(dom))
        qemu = lab.guest.hosts["A"].qemu_pid(libvirtdemo.DOMAIN)
        assert qemu is not None and uffds(qemu) == 0
        lab.more_writes("journal writes after unpair", hosts)
        summary = lab.journal()
        assert summary["repeats"] == 0 and connections(lab.log) == 1
        assert boots(lab.guest.serial(lab.root)) == 1


def test_a_domain_paired_live_goes_to_b_and_back_by_switchover(
    libvirt_host: HostFactory, guest_image: Path
) -> None:
    """`mirror switchover` of a domain paired live: the guest moves to B (its memfd
    standby) and A holds the standby; a second switchover, from B, brings it back to A, its
    original host (now on a memfd of mirror's standby); the client's connection from before
    the pairing goes on throughout and every acknowledged journal write is there."""

    def switchover(lab: Lab, host: str, agent: Host) -> None:
        assert isinstance(agent, libvirtdemo.AgentHost)
        r = subprocess.run(
            [*lab.guest.hosts[host].enter(), "--", sys.executable, "-m", "mirror",
             "switchover", "web01", "--agent-config", str(agent.config_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0 and "switched over" in r.stdout, r.stdout + r.stderr

    with live_paired(guest_image) as (lab, hosts, _lan):
        a, b = lab.a, lab.b
        switchover(lab, "A", a)
        wait_for("B primary and protected, A its standby",
                 lambda: (b.status() or {}).get("phase") == "protected"
                 and (a.status() or {}).get("role") == "secondary", 180, hosts)  # fmt: skip
        assert "<source type='memfd'/>" in lab.dom("B").XMLDesc(0)
        lab.more_writes("journal writes on B", hosts)
        switchover(lab, "B", b)
        wait_for("A primary and protected again",
                 lambda: (a.status() or {}).get("phase") == "protected"
                 and (b.status() or {}).get("role") == "secondary", 180, hosts)  # fmt: skip
        dom_a = lab.dom("A")
        assert "<source type='memfd'/>" in dom_a.XMLDesc(0)
        assert "<memoryBacking>" not in inactive(dom_a)  # its definition: the operator's
        lab.more_writes("journal writes back on A", hosts)
        summary = lab.journal()
        assert summary["repeats"] == 0 and connections(lab.log) == 1, summary
