"""A peer holding the standby's secret key (an insider) acknowledges a checkpoint the
primary never sent: a real primary releases nothing for it (event ack-refused), its
outputs stay held until a real ack, and the observer sees none of them."""

from __future__ import annotations

import threading
import time

import zmq

from mirror.replication import keys, wire
from tests.integration.conftest import Pair


class FakeStandby(threading.Thread):
    """B's keys, B's ports: WELCOMEs the HELLO, acks the pre-copy parts, answers every
    heartbeat, and acks checkpoint ``forged`` for each checkpoint the primary sends (None:
    the checkpoint itself, as a real standby would)."""

    def __init__(self, pair: Pair, forged: int | None) -> None:
        super().__init__(daemon=True)
        k = keys.load(pair.cfg_b.keys)
        assert k is not None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socks = []
        for port in (pair.cfg_b.link.data_port, pair.cfg_b.link.heartbeat_port):
            s = self.ctx.socket(zmq.ROUTER)
            s.setsockopt(zmq.LINGER, 0)
            s.curve_server = True
            s.curve_secretkey, s.curve_publickey = k.secret, k.public
            s.bind(f"tcp://127.0.0.1:{port}")
            self.socks.append(s)
        self.pair, self.forged = pair.cfg_b.pair.name, forged
        self.checkpoints = 0
        self.halt = threading.Event()

    def run(self) -> None:
        data, hb = self.socks
        poller = zmq.Poller()
        poller.register(data, zmq.POLLIN)
        poller.register(hb, zmq.POLLIN)
        beat = 0
        while not self.halt.is_set():
            for s, _ in poller.poll(50):
                ident, *frames = s.recv_multipart()
                msg = wire.decode(frames)
                if s is hb:
                    beat += 1
                    reply: wire.Message = wire.Heartbeat("hostB", beat, 0, msg.session)  # type: ignore[union-attr]
                elif isinstance(msg, wire.Hello):
                    reply = wire.Welcome(self.pair, msg.generation, "hostB", 0, msg.session)
                elif isinstance(msg, wire.Pages) and msg.epoch == 0:
                    reply = wire.Ack(msg.session, 0, msg.part)
                elif isinstance(msg, wire.Pages):
                    self.checkpoints += 1
                    reply = wire.Ack(msg.session, self.forged or msg.epoch, 0)
                else:
                    continue
                s.send_multipart([ident, *wire.encode(reply)])

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        for s in self.socks:
            s.close()
        self.ctx.term()


def test_an_ack_of_a_checkpoint_never_sent_releases_nothing(pair: Pair) -> None:
    fake = FakeStandby(pair, forged=1_000_000)
    fake.start()
    try:
        a = pair.start_primary()
        pair.wait("checkpoints sent", lambda: fake.checkpoints >= 2, timeout=60)
        time.sleep(1.0)  # the guest makes outputs meanwhile (200 a second)
        assert pair.observer.count() == 0, "outputs released on a forged ack"
        st = a.status() or {}
        assert st.get("acked") == 0 and st.get("phase") == "protected", st
        assert '"event": "ack-refused"' in a.log_path.read_text()
        fake.forged = None  # now as a real standby: the held outputs go out
        pair.wait("outputs released on real acks", lambda: pair.observer.count() > 0, 30)
    finally:
        fake.close()
