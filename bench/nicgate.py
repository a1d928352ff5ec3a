"""The NIC gate's own cost: a guest's traffic through the gate, released on every frame
(no epoch hold), beside the same path with no gate, in one run.

    python -m bench.nicgate [--pings N] [--seconds S] [--rounds R] [--json PATH]

Root (network namespaces, mirror/lab/gatelab.py).  A guest namespace behind a veth
standing for libvirt's tap ``vnet`` on bridge br0, a client on the same bridge.  The
gate runs in this process, as the agent runs it: each frame it reads is released at
once (what the output buffer does when the guest is unprotected), so what is measured
is the interception alone; the epoch hold comes on top of it by design.
- latency: UDP ping-pong guest -> client -> guest, one datagram in flight, in its own
  processes; p50 and p99 of the round trip.  Only the guest's frames pass the gate
  (inbound is untouched), so the added time is the gate's, once per round trip.
- throughput: one TCP stream guest -> client for S seconds (the guest's veth does TSO:
  GSO frames of up to 64 KiB pass the gate whole).
Rounds alternate without and with the gate; medians over rounds.  Target (issue 21):
the gate adds <= 1 ms p50.

Beside them, in the same run (``--no-socket`` leaves them out), today's socket-NIC path
against the gate with the same guest stack and a QEMU in the path: a QEMU with no guest
(``-machine none``) whose hub joins a tap in a guest namespace Q (the guest's NIC
backend) to either a tap ``qvnet`` on br0 (as libvirt's ``bridge`` NIC: no gate, or the
gate on it) or a ``-netdev socket,listen=`` (what ``<interface type='server'>`` gives),
which mirror's own relay (mirror/guests/qemu.py NetRelay, as the libvirt guest uses it)
dials and releases into a tap of its own on br0, each frame at once.  QEMU's hub passes
no virtio-net header, so the guest's tap has no offloads on these paths (as on the
socket NIC, which has none): their throughput is not comparable with the veth rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from mirror.guests.base import GuestOutput
from mirror.guests.qemu import NetRelay
from mirror.hoststate import percentile
from mirror.lab.gatelab import CLIENT_IP, GUEST_MAC, QGUEST_IP, QGUEST_MAC, GateLab
from mirror.replication.nicgate import NicGate

QEMU = "qemu-system-x86_64"
SOCKET_PORT = 47123  # QEMU's -netdev socket,listen= in the host namespace (a fresh one)
KINDS = ("direct", "gate")
QEMU_KINDS = ("qemu-direct", "qemu-gate", "qemu-socket")

_SERVER = r"""
import socket, sys, threading
ip = sys.argv[1]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 0))
t = socket.create_server((ip, 0))
print(u.getsockname()[1], t.getsockname()[1], flush=True)
def sink():
    while True:
        c, _ = t.accept()
        n = 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            n += len(b)
        c.sendall(str(n).encode()); c.close()
threading.Thread(target=sink, daemon=True).start()
while True:
    d, a = u.recvfrom(2048)
    u.sendto(d, a)
"""

_CLIENT = r"""
import json, socket, sys, time
ip, (uport, tport, pings), seconds = sys.argv[1], map(int, sys.argv[2:5]), float(sys.argv[5])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
rtt = []
for i in range(pings + 20):
    t0 = time.perf_counter()
    u.sendto(b"x" * 64, (ip, uport))
    u.recvfrom(2048)
    if i >= 20:
        rtt.append(time.perf_counter() - t0)
c = socket.create_connection((ip, tport), timeout=10)
buf = b"\0" * (1 << 18)
sent, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    c.sendall(buf); sent += len(buf)
c.shutdown(socket.SHUT_WR)
got = int(c.recv(64)); dt = time.perf_counter() - t0
print(json.dumps({"rtt": rtt, "bytes": got, "sent": sent, "seconds": dt}))
"""


class QemuHop:
    """A QEMU with no guest joining a tap in namespace Q (the guest's NIC backend: the
    guest stack is Q's) to the netdev ``other`` (id ``o``) through a hub, run in H."""

    def __init__(self, lab: GateLab, other: str) -> None:
        self.lab = lab
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns["H"], QEMU, "-machine", "none", "-nodefaults",
             "-display", "none",
             "-netdev", "tap,id=g,ifname=qgtap,script=no,downscript=no",
             "-netdev", "hubport,id=hg,hubid=0,netdev=g",
             "-netdev", other, "-netdev", "hubport,id=ho,hubid=0,netdev=o"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while subprocess.run(["ip", "-n", lab.ns["H"], "link", "show", "qgtap"],
                                 capture_output=True).returncode:  # fmt: skip
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"QEMU did not make its tap: {err.strip()}")
                time.sleep(0.05)
            subprocess.run(["ip", "-n", lab.ns["H"], "link", "set", "qgtap", "netns",
                            lab.ns["Q"]], check=True)  # fmt: skip
            for args in (("address", QGUEST_MAC), ("up",)):
                lab.run("Q", "ip", "link", "set", "qgtap", *args)
            lab.run("Q", "ip", "addr", "add", f"{QGUEST_IP}/24", "dev", "qgtap")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class FramePath:
    """One round's path for the guest's frames; ``close()`` takes it down."""

    def __init__(self, lab: GateLab, kind: str) -> None:
        self.lab, self.kind = lab, kind
        self.gate: NicGate | None = None
        self.relay: NetRelay | None = None
        self.hop: QemuHop | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        lab, kind = self.lab, self.kind
        if kind == "qemu-socket":
            self.hop = QemuHop(lab, f"socket,id=o,listen=127.0.0.1:{SOCKET_PORT}")
            with lab.inside("H"):  # the relay's socket, tap and threads in H
                relay = NetRelay(Path("/nonexistent"), "qrelay", "br0",
                                 connect=("127.0.0.1", SOCKET_PORT))  # fmt: skip
                self.relay = relay

                def relay_at_once(out: GuestOutput, r: NetRelay = relay) -> None:
                    r.release([out])

                relay.on_output = relay_at_once
                relay.dial(timeout=20)
            return
        tap, mac = "vnet", GUEST_MAC
        if kind.startswith("qemu-"):
            self.hop = QemuHop(lab, "tap,id=o,ifname=qvnet,script=no,downscript=no")
            lab.run("H", "ip", "link", "set", "qvnet", "master", "br0", "up")
            tap, mac = "qvnet", QGUEST_MAC
        if kind.endswith("gate"):
            with lab.inside("H"):
                gate = NicGate(tap, "br0", mac)

                def at_once(out: GuestOutput, g: NicGate = gate) -> None:
                    g.release([out])

                gate.on_output = at_once
                self.gate = gate.install()

    def close(self) -> None:
        with self.lab.inside("H"):
            if self.gate is not None:
                self.gate.remove()
            if self.relay is not None:
                self.relay.close()
        if self.hop is not None:
            self.hop.close()


def _round(
    lab: GateLab, ports: tuple[int, int], pings: int, seconds: float, guest: str = "G"
) -> dict[str, Any]:
    out = lab.run(guest, sys.executable, "-c", _CLIENT, CLIENT_IP, str(ports[0]), str(ports[1]),
                  str(pings), str(seconds))  # fmt: skip
    r: dict[str, Any] = json.loads(out)
    if r["bytes"] != r["sent"]:
        raise RuntimeError(f"the client received {r['bytes']} bytes of {r['sent']} sent")
    return r


def run(pings: int, seconds: float, rounds: int, socket_nic: bool = True) -> dict[str, Any]:
    kinds = KINDS + (QEMU_KINDS if socket_nic else ())
    with GateLab(qemu_guest=socket_nic) as lab:
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns["C"], sys.executable, "-c", _SERVER, CLIENT_IP],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            uport, tport = map(int, server.stdout.readline().split())
            res: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            gates: list[NicGate] = []
            for _ in range(rounds):
                for kind in kinds:
                    path = FramePath(lab, kind)
                    try:
                        guest = "Q" if kind.startswith("qemu-") else "G"
                        res[kind].append(_round(lab, (uport, tport), pings, seconds, guest))
                    finally:
                        path.close()
                        if path.gate is not None:
                            gates.append(path.gate)
        finally:
            server.kill()
            server.wait(5)
    summary: dict[str, Any] = {"pings": pings, "seconds": seconds, "rounds": rounds}
    for kind, rs in res.items():
        summary[kind] = {
            "p50_us": median(percentile(r["rtt"], 50) for r in rs) * 1e6,
            "p99_us": median(percentile(r["rtt"], 99) for r in rs) * 1e6,
            "mbit_s": median(r["bytes"] * 8 / r["seconds"] / 1e6 for r in rs),
        }
    d, g = summary["direct"], summary["gate"]
    summary["added_p50_us"] = g["p50_us"] - d["p50_us"]
    summary["ratio_p50"] = g["p50_us"] / d["p50_us"]
    summary["ratio_p99"] = g["p99_us"] / d["p99_us"]
    summary["ratio_throughput"] = g["mbit_s"] / d["mbit_s"]
    summary["gate_errors"] = sum(x.stats.release_errors + x.dropped for x in gates)
    if socket_nic:
        qd = summary["qemu-direct"]
        for kind in ("qemu-gate", "qemu-socket"):
            x = summary[kind]
            summary[f"{kind}_vs_direct"] = {
                "added_p50_us": x["p50_us"] - qd["p50_us"],
                "ratio_p50": x["p50_us"] / qd["p50_us"],
                "ratio_p99": x["p99_us"] / qd["p99_us"],
                "ratio_throughput": x["mbit_s"] / qd["mbit_s"],
            }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.nicgate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pings", type=int, default=2000, help="round trips a round (2000)")
    ap.add_argument("--seconds", type=float, default=3.0, help="TCP stream a round (3 s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each (3)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--no-socket", action="store_true",
                    help="leave out the QEMU paths (the socket NIC's relay beside the gate)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    r = run(args.pings, args.seconds, args.rounds, socket_nic=not args.no_socket)
    took = time.monotonic() - t0
    print(f"guest traffic through the NIC gate, released on every frame, vs no gate; "
          f"medians of {args.rounds} rounds, same run ({took:.0f} s):")  # fmt: skip
    print(f"  {'':34} {'p50 us':>9} {'p99 us':>9} {'TCP Mbit/s':>11}")
    rows = [("veth, no gate (baseline)", "direct"), ("veth, through the gate", "gate")]
    if not args.no_socket:
        rows += [("QEMU tap, no gate (baseline)", "qemu-direct"),
                 ("QEMU tap, through the gate", "qemu-gate"),
                 ("QEMU socket NIC, mirror's relay", "qemu-socket")]  # fmt: skip
    for name, key in rows:
        x = r[key]
        print(f"  {name:34} {x['p50_us']:9.1f} {x['p99_us']:9.1f} {x['mbit_s']:11.0f}")
    print(f"  gate / baseline: p50 x{r['ratio_p50']:.2f}, p99 x{r['ratio_p99']:.2f}, "
          f"throughput x{r['ratio_throughput']:.2f}")  # fmt: skip
    verdict = "met" if r["added_p50_us"] <= 1000 else "MISSED"
    print(f"  added p50: {r['added_p50_us']:.0f} us (target <= 1000 us: {verdict}); "
          f"frames dropped or refused by the gate: {r['gate_errors']}")  # fmt: skip
    for kind, name in (("qemu-gate", "QEMU: gate / no gate"),
                       ("qemu-socket", "QEMU: socket relay / no gate")):  # fmt: skip
        if f"{kind}_vs_direct" in r:
            v = r[f"{kind}_vs_direct"]
            print(f"  {name}: p50 x{v['ratio_p50']:.2f} (+{v['added_p50_us']:.0f} us), "
                  f"p99 x{v['ratio_p99']:.2f}, throughput x{v['ratio_throughput']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
