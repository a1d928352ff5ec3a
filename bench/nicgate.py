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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from statistics import median
from typing import Any

from mirror.guests.base import GuestOutput
from mirror.hoststate import percentile
from mirror.lab.gatelab import CLIENT_IP, GUEST_MAC, GateLab
from mirror.replication.nicgate import NicGate

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


def _round(lab: GateLab, ports: tuple[int, int], pings: int, seconds: float) -> dict[str, Any]:
    out = lab.run("G", sys.executable, "-c", _CLIENT, CLIENT_IP, str(ports[0]), str(ports[1]),
                  str(pings), str(seconds))  # fmt: skip
    r: dict[str, Any] = json.loads(out)
    if r["bytes"] != r["sent"]:
        raise RuntimeError(f"the client received {r['bytes']} bytes of {r['sent']} sent")
    return r


def run(pings: int, seconds: float, rounds: int) -> dict[str, Any]:
    with GateLab() as lab:
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns["C"], sys.executable, "-c", _SERVER, CLIENT_IP],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            uport, tport = map(int, server.stdout.readline().split())
            res: dict[str, list[dict[str, Any]]] = {"direct": [], "gate": []}
            gates: list[NicGate] = []
            for i in range(2 * rounds):
                kind = "direct" if i % 2 == 0 else "gate"
                gate = None
                if kind == "gate":
                    with lab.inside("H"):
                        gate = NicGate("vnet", "br0", GUEST_MAC)

                        def at_once(out: GuestOutput, g: NicGate = gate) -> None:
                            g.release([out])

                        gate.on_output = at_once
                        gate.install()
                try:
                    res[kind].append(_round(lab, (uport, tport), pings, seconds))
                finally:
                    if gate is not None:
                        with lab.inside("H"):
                            gate.remove()
                        gates.append(gate)
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
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    r = run(args.pings, args.seconds, args.rounds)
    took = time.monotonic() - t0
    print(f"guest traffic through the NIC gate, released on every frame, vs no gate; "
          f"medians of {args.rounds} rounds, same run ({took:.0f} s):")  # fmt: skip
    print(f"  {'':28} {'p50 us':>9} {'p99 us':>9} {'TCP Mbit/s':>11}")
    for name, key in (("no gate (baseline)", "direct"), ("through the gate", "gate")):
        x = r[key]
        print(f"  {name:28} {x['p50_us']:9.1f} {x['p99_us']:9.1f} {x['mbit_s']:11.0f}")
    print(f"  gate / baseline: p50 x{r['ratio_p50']:.2f}, p99 x{r['ratio_p99']:.2f}, "
          f"throughput x{r['ratio_throughput']:.2f}")  # fmt: skip
    verdict = "met" if r["added_p50_us"] <= 1000 else "MISSED"
    print(f"  added p50: {r['added_p50_us']:.0f} us (target <= 1000 us: {verdict}); "
          f"frames dropped or refused by the gate: {r['gate_errors']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
