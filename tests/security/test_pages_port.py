"""A stranger on the standby's pages port (the sealed pages, off CURVE: pagecrypt) while a
real pair checkpoints: garbage, forged heads and forged data parts of every shape are
refused and counted, none is answered, and the pair's checkpoints go on and end equal."""

from __future__ import annotations

import os
import struct
import threading
import time

import zmq

from mirror.replication import pagecrypt
from tests.integration.conftest import Pair
from tests.security.test_strangers import N, frozen_and_equal, kill_primary_and_promote


def flood(port: int, halt: threading.Event, sent: list[int]) -> None:
    """Connect afresh each round and send what a stranger can make of the pages port's
    format: garbage, heads and data parts with a right-looking prefix and no key."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        seq = 1 << 40
        while not halt.is_set():
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
            for kind, part in ((pagecrypt.HEAD, 0), (pagecrypt.DATA, 1), (pagecrypt.DATA, 2)):
                seq += 1
                prefix = pagecrypt.PREFIX.pack(pagecrypt.MAGIC, kind, seq, part, 2)
                for msg in ([prefix, os.urandom(4096)], [b"garbage"], [prefix],
                            [struct.pack("<Q", seq), os.urandom(64)]):  # fmt: skip
                    try:
                        s.send_multipart(msg, zmq.NOBLOCK)
                        sent[0] += 1
                    except zmq.Again:
                        pass
            if s.poll(20):  # the pages port never answers anyone
                sent[1] += 1
            s.close()
    finally:
        ctx.term()


def test_a_stranger_on_the_pages_port_changes_nothing(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(N))
    st = pair.wait("protected", lambda: (s := a.status()) and s.get("acked", 0) >= 5 and s)
    st_b = b.status()
    assert st_b is not None and st_b["pages_port"] and st["acked"] >= 5
    halt, sent = threading.Event(), [0, 0]
    t = threading.Thread(target=flood, args=(st_b["pages_port"], halt, sent), daemon=True)
    t.start()
    try:
        st_b = frozen_and_equal(pair, a, b)
        assert sent[0] > 100 and sent[1] == 0 and st_b["dropped"] > 50, (sent, st_b["dropped"])
        assert st_b["rejected"] == 0  # nothing a stranger sent was answered with a REJECT
        assert "sealed part" in b.log_path.read_text()
        time.sleep(0.2)
    finally:
        halt.set()
        t.join(10)
    kill_primary_and_promote(pair, a, b)
