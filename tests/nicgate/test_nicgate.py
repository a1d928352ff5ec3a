"""The NIC gate on real namespaces: a bridge, a guest's tap, a client on the bridge.

Every test builds its own namespaces (mirror/lab/gatelab.py) and runs the gate in
the host's namespace, as the agent runs it beside libvirt's tap.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.guests.base import GuestOutput
from mirror.lab.gatelab import CLIENT_IP, CLIENT_MAC, GUEST_IP, GUEST_MAC, VTAP_MAC, GateLab
from mirror.lab.netlab import NetLabUnavailable
from mirror.replication.nicgate import (
    HOLD_PREF,
    VNET_HDR_LEN,
    GateSet,
    Nic,
    NicGate,
    NicGateError,
    remove_stale,
    stale_gates,
)

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
TEST_ETHERTYPE = 0x88B5  # IEEE "local experimental": frames no stack answers


@pytest.fixture
def lab() -> Iterator[GateLab]:
    try:
        with GateLab(vtap=True) as lab:
            yield lab
    except NetLabUnavailable as e:
        pytest.skip(f"{e} (needs root; CI runs as root)")


class Held:
    """What the gate handed over, as the output buffer would hold it."""

    def __init__(self) -> None:
        self.outputs: list[GuestOutput] = []
        self._lock = threading.Lock()

    def __call__(self, out: GuestOutput) -> None:
        with self._lock:
            self.outputs.append(out)

    def take(self) -> list[GuestOutput]:
        with self._lock:
            out, self.outputs = self.outputs, []
        return out

    def wait(self, pred: object, timeout: float = 5.0) -> list[GuestOutput]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if pred(self.outputs):  # type: ignore[operator]
                    return list(self.outputs)
            time.sleep(0.01)
        raise AssertionError(f"the gate did not hand over what was expected: {self.outputs!r}")


class Sniffer:
    """Every frame the client's interface receives (AF_PACKET in the client's namespace)."""

    def __init__(self, lab: GateLab) -> None:
        with lab.inside("C"):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: keep all
            self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.05)
        self.frames: list[bytes] = []

    def collect(self, seconds: float) -> list[bytes]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                frame, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING:
                self.frames.append(frame)
        return self.frames

    def close(self) -> None:
        self.sock.close()


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def guest_frame(n: int) -> bytes:
    """Frame ``n`` from the socket-driven guest to the client, numbered."""
    body = struct.pack(">I", n) + bytes(60)
    return mac(CLIENT_MAC) + mac(VTAP_MAC) + struct.pack(">H", TEST_ETHERTYPE) + body


def numbered(frames: list[bytes]) -> list[int]:
    return [
        struct.unpack(">I", f[14:18])[0]
        for f in frames
        if f[12:14] == struct.pack(">H", TEST_ETHERTYPE) and f[6:12] == mac(VTAP_MAC)
    ]


def gate_on(lab: GateLab, tap: str, held: Held, mac_: str = GUEST_MAC) -> NicGate:
    with lab.inside("H"):
        return NicGate(tap, "br0", mac_, held).install()


def remove(lab: GateLab, gate: NicGate) -> None:
    with lab.inside("H"):
        gate.remove()


def release(lab: GateLab, gate: NicGate, outputs: list[GuestOutput]) -> None:
    with lab.inside("H"):
        gate.release(outputs)


def tc_state(lab: GateLab, dev: str) -> str:
    return lab.run("H", "tc", "qdisc", "show", "dev", dev) + lab.run(
        "H", "tc", "filter", "show", "dev", dev, "ingress"
    )


def test_frames_held_until_released_then_in_order(lab: GateLab) -> None:
    held, sniff = Held(), Sniffer(lab)
    gate = gate_on(lab, "vtap", held, VTAP_MAC)
    try:
        n = 300
        for i in range(n):
            os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(i))
        outs = held.wait(lambda o: len(o) >= n)
        assert [o.payload for o in outs] == [bytes(VNET_HDR_LEN) + guest_frame(i) for i in range(n)]
        assert [o.seq for o in outs] == list(range(1, n + 1))
        assert numbered(sniff.collect(0.5)) == [], "a held frame reached the client"
        release(lab, gate, held.take())
        got = numbered(sniff.collect(1.0))
        assert got == list(range(n)), "released frames reach the client once each, in order"
        assert gate.stats.release_errors == 0 and gate.dropped == 0
    finally:
        remove(lab, gate)
        sniff.close()


def test_ip_arp_tcp_udp_held_inbound_straight(lab: GateLab) -> None:
    """A guest with a real IP stack: its ARP, UDP and TCP wait for release; the
    client's frames reach it at once while the gate holds everything."""
    held, sniff = Held(), Sniffer(lab)
    gate = gate_on(lab, "vnet", held)
    try:
        with lab.inside("C"):
            listener = socket.create_server((CLIENT_IP, 0))
            client_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        port = listener.getsockname()[1]
        listener.settimeout(0.5)
        with lab.inside("G"):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((GUEST_IP, 0))
            udp.sendto(b"udp-from-guest", (CLIENT_IP, 9))  # no neighbour yet: ARP first
        arp = held.wait(lambda o: any(x.payload[VNET_HDR_LEN + 12 :][:2] == b"\x08\x06" for x in o))
        assert arp, "the guest's ARP request was handed to the gate"
        frames = sniff.collect(0.5)
        leaked = [f[:60].hex() for f in frames if f[6:12] == mac(GUEST_MAC)]
        assert not leaked, f"a frame of the guest leaked: {leaked}"

        # inbound goes straight to the guest while its own frames stay held
        lab.static_neighbours()
        udp.settimeout(2)
        client_udp.sendto(b"to-guest", (GUEST_IP, udp.getsockname()[1]))
        t0 = time.monotonic()
        assert udp.recvfrom(100)[0] == b"to-guest"
        assert time.monotonic() - t0 < 0.5
        assert not any(f[6:12] == mac(GUEST_MAC) for f in sniff.collect(0.2))

        # the guest's TCP SYN is held: no connection until released
        with lab.inside("G"):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setblocking(False)
        err = tcp.connect_ex((CLIENT_IP, port))
        assert err in (115, 0)  # EINPROGRESS
        with pytest.raises(TimeoutError):
            listener.accept()
        release(lab, gate, held.take())  # ARP, the UDP datagram and the SYN, in order
        for _ in range(100):  # the handshake: each frame of the guest waits for a release
            release(lab, gate, held.take())
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("the connection never came up through the gate")
        got = [f for f in sniff.collect(0.3) if f[6:12] == mac(GUEST_MAC)]
        assert any(f[12:14] == b"\x08\x06" for f in got), "the ARP request went out on release"
        assert any(b"udp-from-guest" in f for f in got)
        conn.close()
        tcp.close()
    finally:
        remove(lab, gate)
        sniff.close()


def test_bulk_tcp_through_the_gate(lab: GateLab) -> None:
    """GSO frames with partial checksums (a veth's TSO) are released whole and intact:
    4 MiB from the guest arrive byte for byte."""
    held = Held()
    gate = gate_on(lab, "vnet", held)
    stop = threading.Event()

    def releaser() -> None:
        with lab.inside("H"):
            while not stop.is_set():
                gate.release(held.take())
                time.sleep(0.002)

    rt = threading.Thread(target=releaser, daemon=True)
    rt.start()
    try:
        data = os.urandom(4 << 20)
        with lab.inside("C"):
            listener = socket.create_server((CLIENT_IP, 0))
        listener.settimeout(10)
        with lab.inside("G"):
            sender = socket.create_connection((CLIENT_IP, listener.getsockname()[1]), timeout=10)
        conn, _ = listener.accept()
        conn.settimeout(10)
        t = threading.Thread(target=sender.sendall, args=(data,), daemon=True)
        t.start()
        got = bytearray()
        while len(got) < len(data):
            chunk = conn.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert gate.stats.release_errors == 0 and gate.stats.truncated == 0
        assert gate.dropped == 0
        sender.close()
        conn.close()
    finally:
        stop.set()
        rt.join(2)
        remove(lab, gate)


def test_remove_restores_the_tap(lab: GateLab) -> None:
    before = tc_state(lab, "vnet")
    held, sniff = Held(), Sniffer(lab)
    gate = gate_on(lab, "vnet", held)
    assert tc_state(lab, "vnet") != before
    remove(lab, gate)
    held.take()  # what the guest sent while the gate was on
    assert tc_state(lab, "vnet") == before
    links = json.loads(lab.run("H", "ip", "-j", "link", "show"))
    assert not [x["ifname"] for x in links if x["ifname"].startswith("mgate")]
    lab.static_neighbours()
    with lab.inside("G"):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.sendto(b"direct-again", (CLIENT_IP, 9))
    assert any(b"direct-again" in f for f in sniff.collect(0.5)), "direct forwarding is back"
    assert held.outputs == []
    sniff.close()


def test_second_install_and_bad_taps_refused(lab: GateLab) -> None:
    held = Held()
    gate = gate_on(lab, "vnet", held)
    try:
        with pytest.raises(NicGateError, match="already under mirror's output commit"):
            gate_on(lab, "vnet", held)
        with pytest.raises(NicGateError, match="no network device 'vnet9'"):
            gate_on(lab, "vnet9", held)
        with lab.inside("H"), pytest.raises(NicGateError, match="not on bridge 'br1'"):
            NicGate("vtap", "br1", VTAP_MAC).install()
        lab.run("H", "tc", "qdisc", "add", "dev", "vtap", "ingress")
        with pytest.raises(NicGateError, match="already has an ingress qdisc"):
            gate_on(lab, "vtap", held, VTAP_MAC)
        assert "ingress" in tc_state(lab, "vtap")  # left as it was
    finally:
        remove(lab, gate)


_DEAD_RUN = """
import sys, time
from mirror.replication.nicgate import NicGate
NicGate(sys.argv[1], "br0", sys.argv[2]).install()
print("installed", flush=True)
time.sleep(600)
"""


def test_dead_run_fails_closed_and_is_cleaned(lab: GateLab) -> None:
    """A run killed with its gate on: the guest's frames stay held (dropped at the tap,
    none reach the network); cleanup finds and removes only that gate; a new run can
    also take a dead run's gate over directly."""
    before = tc_state(lab, "vtap")
    other = gate_on(lab, "vnet", Held())  # a live gate of another run: never touched
    try:
        for _ in range(2):
            cmd = ["ip", "netns", "exec", lab.ns["H"], sys.executable, "-c", _DEAD_RUN]
            proc = subprocess.Popen(
                [*cmd, "vtap", VTAP_MAC],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            try:
                assert proc.stdout is not None and proc.stdout.readline() == "installed\n"
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            sniff = Sniffer(lab)
            for i in range(20):
                os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(i))
            assert numbered(sniff.collect(0.5)) == [], "a dead run's guest leaked frames"
            with lab.inside("H"):
                assert stale_gates() == ["vtap"]
                assert stale_gates(["vnet"]) == []
            if _ == 0:  # first round: removed by cleanup
                with lab.inside("H"):
                    assert remove_stale() == ["vtap"]
                assert tc_state(lab, "vtap") == before
                os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(99))
                assert numbered(sniff.collect(0.5)) == [99], "after cleanup: direct again"
            else:  # second round: a new run takes the dead gate over
                held = Held()
                gate = gate_on(lab, "vtap", held, VTAP_MAC)
                os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(7))
                held.wait(lambda o: len(o) == 1)
                assert numbered(sniff.collect(0.3)) == []
                release(lab, gate, held.take())
                assert numbered(sniff.collect(0.5)) == [7]
                remove(lab, gate)
                assert tc_state(lab, "vtap") == before
            sniff.close()
        with lab.inside("H"):
            assert stale_gates() == []
    finally:
        remove(lab, other)


def test_the_guest_s_tap_gone_under_the_gate(lab: GateLab) -> None:
    """The guest is destroyed (its tap goes, our filter with it): remove() still cleans
    up mirror's own tap, and leaves a new tap of the same name alone."""
    gate = gate_on(lab, "vtap", Held(), VTAP_MAC)
    os.close(lab.vtap_fd)
    lab.vtap_fd = -1
    lab.vtap_fd = lab._make_vtap()
    fresh = tc_state(lab, "vtap")
    remove(lab, gate)
    assert tc_state(lab, "vtap") == fresh
    links = json.loads(lab.run("H", "ip", "-j", "link", "show"))
    assert not [x["ifname"] for x in links if x["ifname"].startswith("mgate")]


def fdb_port(lab: GateLab, mac_: str) -> str:
    """The bridge port br0 learned ``mac_`` on ('' if none)."""
    for e in json.loads(lab.run("H", "bridge", "-j", "fdb", "show", "br", "br0")):
        if e.get("mac") == mac_ and "self" not in e.get("flags", []):
            return str(e.get("ifname", ""))
    return ""


def test_every_nic_of_a_domain(lab: GateLab) -> None:
    """Two NICs, one output stream: each frame tagged with its NIC, released through
    that NIC's own port (the bridge learns each guest MAC on its own tap); installing
    is all or none."""
    held, sniff = Held(), Sniffer(lab)
    nics = [Nic("vtap", "br0", VTAP_MAC), Nic("vnet", "br0", GUEST_MAC)]
    with lab.inside("H"):
        gates = GateSet(nics, held).install()
    try:
        lab.static_neighbours()
        with lab.inside("G"):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(5):
            os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(i))
            udp.sendto(b"nic1-%d" % i, (CLIENT_IP, 9))
        outs = held.wait(lambda o: sum(b"nic1-" in x.payload for x in o) == 5
                         and sum(x.payload[:2] == b"\0\0" for x in o) == 5)  # fmt: skip
        assert [o.seq for o in outs] == list(range(1, len(outs) + 1))
        assert all(o.payload[:2] == b"\0\1" for o in outs if b"nic1-" in o.payload)
        assert [o.payload[2:] for o in outs if o.payload[:2] == b"\0\0"] == [
            bytes(VNET_HDR_LEN) + guest_frame(i) for i in range(5)
        ]
        assert numbered(sniff.collect(0.3)) == []
        with lab.inside("H"):
            gates.release(held.take())
        frames = sniff.collect(0.5)
        assert numbered(frames) == list(range(5))
        assert sum(b"nic1-" in f for f in frames) == 5
        assert fdb_port(lab, VTAP_MAC) == "vtap" and fdb_port(lab, GUEST_MAC) == "vnet"
    finally:
        with lab.inside("H"):
            gates.remove()
        sniff.close()
    before = tc_state(lab, "vtap")
    with lab.inside("H"), pytest.raises(NicGateError, match="no network device 'gone0'"):
        GateSet([Nic("vtap", "br0", VTAP_MAC), Nic("gone0", "br0", GUEST_MAC)]).install()
    assert tc_state(lab, "vtap") == before, "the first NIC's gate was taken off again"


def test_mirror_s_tap_deleted_under_a_live_gate(lab: GateLab) -> None:
    """Someone deletes mirror's tap: the gate says why it stopped, and the guest's
    frames stay held (none reach the client)."""
    held, sniff = Held(), Sniffer(lab)
    gate = gate_on(lab, "vtap", held, VTAP_MAC)
    try:
        lab.run("H", "ip", "link", "del", gate.gate)
        deadline = time.monotonic() + 3
        while not gate.error:
            assert time.monotonic() < deadline, "the gate did not notice"
            time.sleep(0.02)
        assert gate.gate in gate.error
        for i in range(10):
            os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(i))
        assert numbered(sniff.collect(0.5)) == []
        with lab.inside("H"):
            assert stale_gates() == ["vtap"]
    finally:
        remove(lab, gate)
        sniff.close()
    assert "clsact" not in tc_state(lab, "vtap")


def test_a_gate_broken_while_the_guest_runs_is_reported(lab: GateLab) -> None:
    """Another tool deletes the hold filter on one NIC's tap (that NIC's frames then leave
    unheld), then mirror's own tap of the other NIC (its frames are dropped): the GateSet
    reports each, naming the tap and what it means, within a few watch periods; a role
    puts that in its status and metrics."""
    held, sniff = Held(), Sniffer(lab)
    nics = [Nic("vtap", "br0", VTAP_MAC), Nic("vnet", "br0", GUEST_MAC)]
    with lab.inside("H"):
        gates = GateSet(nics, held, watch_s=0.1).install()

    def faults_until(pred: object) -> list[str]:
        deadline = time.monotonic() + 5
        while not pred(gates.faults()):  # type: ignore[operator]
            assert time.monotonic() < deadline, f"not reported: {gates.faults()}"
            time.sleep(0.05)
        return gates.faults()

    try:
        time.sleep(0.3)
        assert gates.faults() == [] and gates.check() == []
        # the hold filter goes: reported, and the guest's frames really pass unheld
        lab.run("H", "tc", "filter", "del", "dev", "vtap", "ingress", "pref", str(HOLD_PREF))
        (fault,) = faults_until(lambda f: len(f) == 1)
        assert fault.startswith("vtap: the hold filter on vtap's ingress is gone")
        assert "unheld" in fault
        for i in range(3):
            os.write(lab.vtap_fd, bytes(VNET_HDR_LEN) + guest_frame(i))
        assert numbered(sniff.collect(0.5)) == [0, 1, 2], "the broken gate did not pass them"
        # mirror's tap of the second NIC goes: reported as well (its frames dropped)
        lab.run("H", "ip", "link", "del", gates.gates[1].gate)
        faults = faults_until(lambda f: len(f) == 2)
        assert faults[0] == fault and faults[1].startswith("vnet: ")
        assert "dropped (fail closed)" in faults[1]
    finally:
        with lab.inside("H"):
            gates.remove()
        sniff.close()
    assert gates.faults() == []
    assert "clsact" not in tc_state(lab, "vtap") and "clsact" not in tc_state(lab, "vnet")
