"""Strangers on the interconnect: processes that reach a pair's ports and try everything a
primary or a standby could say, without the pair's keys (none, or keys of their own), or
with the right key but frames of another session."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from array import array
from dataclasses import replace
from pathlib import Path

import zmq

from mirror.replication import keys, wire
from mirror.replication.link import Endpoint

PS = 4096


def stranger_keys(tmp: Path, standby_public: bytes, name: str = "stranger") -> keys.LinkKeys:
    """A key pair of the stranger's own, and the standby's public key (public: anyone may
    know it)."""
    keys.generate(tmp, name)
    public, secret = keys.load_secret(tmp / f"{name}.key_secret")
    return keys.LinkKeys(public, secret, standby_public)


def everything(
    pair_name: str, ram_bytes: int, session: int, epoch: int, hellos: bool = True
) -> list[wire.Message]:
    """One of each message a primary sends, aimed to do harm: a HELLO of a newer
    generation under the real primary's name, an empty pre-copy part (it once made the
    standby drop its committed checkpoint), a checkpoint of the stranger's making,
    BYE, HANDOVER."""
    empty = wire.Pages(0, 0, True, array("I"), b"", array("I"), array("Q"), [], [], b"", 0, [])
    page = bytes(PS)
    forged = wire.Pages(
        epoch, 0, True, array("I", [0]), bytes([1]), array("I", [PS]), array("Q", [0]),
        [page], [1], b"forged-state", 0, [(1, b"forged output")],
    )  # fmt: skip
    out: list[wire.Message] = [
        wire.Hello(pair_name, 99, "hostA", ram_bytes, session or 1),
        wire.Hello(pair_name, 1, "hostA", ram_bytes, (session or 1) + 1),
    ] if hellos else []
    for s in {session, 0, 12345}:
        out += [
            replace(empty, session=s, seq=1),
            replace(forged, session=s, seq=2),
            replace(forged, epoch=epoch + 1, session=s, seq=3),
            wire.Bye(s, "hostA", "stopped by its operator"),
            wire.Handover(s, "hostA", epoch),
        ]
    return out


class Stranger:
    """Sends every message of :func:`everything` and heartbeats under the primary's name
    to a pair's standby ports, over and over, from a thread; counts what comes back."""

    def __init__(
        self,
        endpoint: Endpoint,
        pair_name: str,
        ram_bytes: int,
        link_keys: keys.LinkKeys | None,
        *,
        session: int = 0,
        hellos: bool = True,
    ) -> None:
        self.endpoint, self.pair, self.ram = endpoint, pair_name, ram_bytes
        self.keys, self.session, self.hellos = link_keys, session, hellos
        self.sent = 0
        self.rounds = 0
        self.replies: list[object] = []
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> Stranger:
        self.thread.start()
        return self

    def run(self) -> None:
        """Rounds of: connect afresh (a new handshake), send everything, read answers."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        rnd = random.Random(7)
        seq = 0
        try:
            while not self.halt.is_set():
                socks = []
                for port in (self.endpoint.data_port, self.endpoint.heartbeat_port):
                    s = ctx.socket(zmq.DEALER)
                    s.setsockopt(zmq.LINGER, 0)
                    if self.keys is not None:
                        s.curve_secretkey = self.keys.secret
                        s.curve_publickey = self.keys.public
                        s.curve_serverkey = self.keys.peer
                    s.connect(self.endpoint.url(port))
                    socks.append(s)
                data, hb = socks
                epoch = rnd.randrange(1, 500)
                for msg in everything(self.pair, self.ram, self.session, epoch, self.hellos):
                    seq += 1
                    beat = wire.Heartbeat("hostA", seq, 10**6, self.session)
                    with contextlib.suppress(zmq.Again):
                        data.send_multipart([bytes(f) for f in wire.encode(msg)], zmq.NOBLOCK)
                        hb.send_multipart([bytes(f) for f in wire.encode(beat)], zmq.NOBLOCK)
                        self.sent += 2
                deadline = time.monotonic() + 0.05
                while (left := deadline - time.monotonic()) > 0:
                    for s in socks:
                        if s.poll(max(1, int(left * 500))):
                            self.replies.append(s.recv_multipart())
                for s in socks:
                    s.close()
                self.rounds += 1
        finally:
            ctx.term()

    def stop(self) -> None:
        self.halt.set()
        self.thread.join(5)
