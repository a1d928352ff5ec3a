"""A network fuzz of a running pair's ports: random and mutated frames, at least 1,000 a
second for MIRROR_NETFUZZ_SECONDS (default 30), while the pair checkpoints.  Mutated
messages come over CURVE with the primary's key (so that they get past the transport
and reach the standby's decoder and session checks) and without any key; random bytes
come over plain TCP too.  Nothing may crash and the pair must stay protected: the
primary's acks keep coming all along."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time
from array import array

import zmq

from mirror.replication import keys, wire
from mirror.replication import pagediff as pd
from tests.integration.conftest import Pair

SECONDS = float(os.environ.get("MIRROR_NETFUZZ_SECONDS", "30"))


def seed_messages(pair_name: str, ram: int) -> list[list[bytes]]:
    page = os.urandom(pd.PAGE_SIZE)
    pages = wire.Pages(
        5, 0, True, array("I", [1, 2]), bytes([1, 0]), array("I", [pd.PAGE_SIZE, 0]),
        array("Q", [pd.checksum_bytes(page), 0]), [page], [2], b"st", pd.checksum_bytes(b"st"),
        [(9, b"o")], session=1, seq=1,
    )  # fmt: skip
    msgs: list[wire.Message] = [
        pages,
        wire.Hello(pair_name, 1, "fuzzer", ram, 7),
        wire.Hello(pair_name, 2, "fuzzer", ram, 8),
        wire.Bye(1, "fuzzer", "x"),
        wire.Handover(1, "fuzzer", 3),
        wire.Ack(1, 3, 0),
        wire.Heartbeat("hostA", 1, 3, 1),
    ]
    return [[bytes(f) for f in wire.encode(m)] for m in msgs]


def mutate(rnd: random.Random, frames: list[bytes]) -> list[bytes]:
    out = [bytearray(f) for f in frames]
    for _ in range(rnd.randint(1, 3)):
        i = rnd.randrange(len(out))
        f = out[i]
        op = rnd.randrange(6)
        if op == 0 and f:
            f[rnd.randrange(len(f))] ^= 1 << rnd.randrange(8)
        elif op == 1:
            del f[rnd.randrange(len(f) + 1) :]
        elif op == 2:
            f += rnd.randbytes(rnd.randint(1, 16))
        elif op == 3 and len(out) > 1:
            del out[i]
        elif op == 4:
            out.insert(i, bytearray(f))
        else:
            out[i] = bytearray(rnd.randbytes(rnd.randint(0, 64)))
    return [bytes(f) for f in out] or [b""]


class Fuzzer(threading.Thread):
    def __init__(self, ports: tuple[int, int], seeds: list[list[bytes]],
                 link_keys: keys.LinkKeys | None, seed: int) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.ports, self.seeds, self.keys, self.rnd = ports, seeds, link_keys, random.Random(seed)
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        socks = []
        for port in self.ports:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 1000)
            if self.keys is not None:
                s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
                s.curve_serverkey = self.keys.peer
            s.connect(f"tcp://127.0.0.1:{port}")
            socks.append(s)
        try:
            while not self.halt.is_set():
                for _ in range(100):
                    s = self.rnd.choice(socks)
                    if self.rnd.random() < 0.2:
                        frames = [self.rnd.randbytes(self.rnd.randint(0, 200))
                                  for _ in range(self.rnd.randint(1, 8))]  # fmt: skip
                    else:
                        frames = mutate(self.rnd, self.rnd.choice(self.seeds))
                    with contextlib.suppress(zmq.Again):
                        s.send_multipart(frames, zmq.NOBLOCK)
                        self.sent += 1
                    for s in socks:  # the standby may answer (a REJECT): read it
                        while s.poll(0):
                            s.recv_multipart()
                time.sleep(0.005)
        finally:
            for s in socks:
                s.close()
            ctx.term()


class TcpGarbage(threading.Thread):
    """Plain TCP connections that write random bytes (no ZMTP at all)."""

    def __init__(self, ports: tuple[int, int]) -> None:
        super().__init__(daemon=True)
        self.ports, self.rnd = ports, random.Random(3)
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for port in self.ports:
                with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=1
                ) as c:
                    c.sendall(self.rnd.randbytes(self.rnd.randint(1, 4096)))
                    self.sent += 1
            time.sleep(0.01)


def test_fuzzing_the_ports_of_a_running_pair(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("protected", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    link = pair.cfg_b.link
    ports = (link.data_port, link.heartbeat_port)
    right, standby = keys.load(pair.cfg_a.keys), keys.load(pair.cfg_b.keys)
    assert right is not None and standby is not None
    stranger_public, stranger_secret = zmq.curve_keypair()
    ram = pair.cfg_b.guest.ram_mib << 20
    seeds = seed_messages(pair.cfg_b.pair.name, ram)
    fuzzers = [
        Fuzzer(ports, seeds, right, 1),  # past CURVE: the decoder and the sessions
        Fuzzer(ports, seeds, None, 2),  # no key
        Fuzzer(ports, seeds, keys.LinkKeys(stranger_public, stranger_secret, standby.public), 3),
    ]
    garbage = TcpGarbage(ports)
    for t in (*fuzzers, garbage):
        t.start()
    acked: list[int] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < SECONDS:
            time.sleep(2)
            st = pair.wait("status", a.status)
            assert st["phase"] == "protected", st
            acked.append(st["acked"])
            assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        for t in (*fuzzers, garbage):
            t.halt.set()
        for t in (*fuzzers, garbage):
            t.join(5)
    elapsed = time.monotonic() - t0
    sent = sum(f.sent for f in fuzzers)
    print(f"netfuzz: {sent} frames ({sent / elapsed:.0f}/s) and {garbage.sent} raw TCP "
          f"connections in {elapsed:.0f} s; acked {acked[0]} -> {acked[-1]}")  # fmt: skip
    assert sent / elapsed >= 1000
    # protected all along: acks kept coming in every 2 s window
    assert all(y > x for x, y in itertools.pairwise(acked)), acked
    st_b = b.status() or {}
    assert st_b["primary"] == "hostA" and st_b["dropped"] > 100, st_b
    assert st_b["refused_keys"] > 0 and st_b["failed_handshakes"] > 0, st_b
    a.stop()  # a clean stop: the standby stands down, nothing crashed
    assert a.proc.returncode == 0, a.log_tail()
