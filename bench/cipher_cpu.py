"""The transport's CPU per GB, by cipher: zmq over loopback, no standby, two processes.

64 MiB in 1 MiB frames, several rounds, from this process to a forked receiver: plain;
CurveZMQ over 1, 2 and 4 connections (each side's context with as many I/O threads:
"several CURVE streams"); and each frame sealed under AES-256-GCM here and opened in
place there (mirror.replication.pagecrypt, what a pair with keys does with its pages).
Prints the CPU both processes spent per GB (user + system, every thread), each beside
plain's: on a 2-core machine that, not the wall clock, decides what the cipher costs.

    .venv/bin/python -m bench.cipher_cpu [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import zmq

from mirror.lab.demo import free_ports
from mirror.replication import pagecrypt
from mirror.replication.link import tune_malloc

FRAME, FRAMES = 1 << 20, 64
KEY = bytes(32)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(mode: str, streams: int, rounds: int) -> float:
    """CPU ms per GB of both sides (the first round is warm-up)."""
    server_pub, server_sec = zmq.curve_keypair()
    client_pub, client_sec = zmq.curve_keypair()
    (port,) = free_ports(1)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            tune_malloc()
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=streams)
            s = ctx.socket(zmq.PULL)
            if mode == "curve":
                s.curve_server = True
                s.curve_secretkey, s.curve_publickey = server_sec, server_pub
            s.bind(f"tcp://127.0.0.1:{port}")
            start = 0.0
            for r in range(rounds + 1):
                if r == 1:
                    start = _cpu()
                for i in range(FRAMES):
                    m = s.recv_multipart(copy=False)
                    if mode == "sealed":
                        pagecrypt.open_in_place(KEY, r, i, b"", m[0].buffer)
            os.write(wr, str(_cpu() - start).encode())
        finally:
            os._exit(0)
    tune_malloc()
    ctx = zmq.Context(io_threads=streams)
    socks = []
    for _ in range(streams):
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, -1)
        if mode == "curve":
            s.curve_serverkey = server_pub
            s.curve_secretkey, s.curve_publickey = client_sec, client_pub
        s.connect(f"tcp://127.0.0.1:{port}")
        socks.append(s)
    data = memoryview(os.urandom(FRAME * FRAMES))
    time.sleep(0.3)
    start = 0.0
    for r in range(rounds + 1):
        if r == 1:
            start = _cpu()
        for i in range(FRAMES):
            frame = data[i * FRAME : (i + 1) * FRAME]
            if mode == "sealed":
                frame = memoryview(pagecrypt.seal(KEY, r, i, b"", frame))
            socks[i % streams].send(frame, copy=False)
    os.waitpid(pid, 0)
    theirs = float(os.read(rd, 64))
    mine = _cpu() - start
    for s in socks:
        s.close()
    ctx.term()
    return (mine + theirs) * 1e3 / (rounds * FRAME * FRAMES / 1e9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cipher_cpu", description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    ways = [("plain", 1), ("curve", 1), ("curve", 2), ("curve", 4), ("sealed", 1)]
    cpu = {w: measure(*w, args.rounds) for w in ways}
    plain = cpu[("plain", 1)]
    print(f"transport CPU per GB (both sides, 64 MiB in 1 MiB frames, {args.rounds} rounds):")
    for (mode, n), ms in cpu.items():
        label = {"plain": "plain", "curve": f"CURVE, {n} connection(s)",
                 "sealed": "AES-256-GCM sealed (pagecrypt)"}[mode]  # fmt: skip
        print(f"  {label:32} {ms:6.0f} ms/GB  {ms / plain:5.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
