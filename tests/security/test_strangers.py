"""A real pair (two `mirror` processes) while strangers reach its ports (item 7 of issue 11).

Without the pair's keys (no CURVE at all, or a key pair of their own) a stranger
is refused at the transport: whatever it sends (HELLO of a newer generation, pages,
commits, BYE, HANDOVER, heartbeats under the primary's name) never reaches the
standby, and it never gets an answer.  With the right key but frames of another
session (a stale sender) nothing reaches the live session either.  Meanwhile the
pair keeps checkpointing, the standby's image and committed state end equal to the
primary's checkpoint byte for byte, and a kill of the primary still fails over
while the stranger goes on sending heartbeats.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from mirror.guests.synthetic import unpack_state
from mirror.replication import keys
from mirror.replication.link import Endpoint
from tests.integration.conftest import Pair
from tests.security.strangers import Stranger, stranger_keys

N = 150  # checkpoints of 30 ms: the strangers have about 4 s


def endpoint(pair: Pair) -> Endpoint:
    link = pair.cfg_b.link
    return Endpoint("127.0.0.1", link.data_port, link.heartbeat_port)


def frozen_and_equal(pair: Pair, a: object, b: object) -> dict[str, object]:
    """Wait for the primary frozen at checkpoint N; the standby holds exactly it."""
    st_a = pair.wait("A frozen", lambda: (s := a.status()) and s["phase"] == "frozen" and s)  # type: ignore[attr-defined]
    st_b = pair.wait("B at N", lambda: (s := b.status()) and s["committed"] == N and s)  # type: ignore[attr-defined]
    assert st_b["primary"] == "hostA" and st_b["generation"] == 1
    assert st_a["acked"] == N and st_a["summary"]["rejects"] == 0, st_a["summary"]
    assert Path(st_a["ram"]).read_bytes() == Path(st_b["image"]).read_bytes()
    state = (pair.root / "hostB" / "committed.state").read_bytes()
    assert b"forged" not in state
    _, regs = unpack_state(state)  # the synthetic guest's own state, not a stranger's
    seqs = pair.observer.seen.seqs
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 20
    assert seqs[-1] == regs[0]  # every output of the checkpoint released, none beyond
    assert not any(b"forged" in p for _, p, _ in pair.observer.seen.outputs)
    return st_b


def kill_primary_and_promote(pair: Pair, a: object, b: object) -> None:
    os.killpg(a.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    a.proc.wait()  # type: ignore[attr-defined]
    pair.wait(
        "B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b]  # type: ignore[attr-defined, list-item]
    )


@pytest.mark.parametrize("kind", ["no-key", "wrong-key"])
def test_a_stranger_is_refused_and_the_pair_goes_on(pair: Pair, kind: str, tmp_path: Path) -> None:
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(N))
    pair.wait("protected", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    standby_key = keys.load(pair.cfg_b.keys)
    assert standby_key is not None
    link_keys = None if kind == "no-key" else stranger_keys(tmp_path, standby_key.public)
    ram = pair.cfg_b.guest.ram_mib << 20
    s = Stranger(endpoint(pair), pair.cfg_b.pair.name, ram, link_keys).start()
    try:
        st_b = frozen_and_equal(pair, a, b)
        assert s.rounds > 20 and s.replies == []  # not one answer, not even a REJECT
        log = b.log_path.read_text()
        if kind == "wrong-key":
            fp = keys.fingerprint(link_keys.public)  # type: ignore[union-attr]
            assert st_b["refused_keys"] > 10
            assert log.count(f"unknown CURVE key (fingerprint {fp})") == 1  # once per key
        else:
            assert st_b["failed_handshakes"] > 10
            assert log.count("did not complete a CURVE handshake") == 1
        assert "refused" not in log.replace("refused a peer", "")  # no HELLO got as far
        assert st_b["dropped"] == 0 and st_b["rejected"] == 0  # nothing reached the standby
        # the stranger's heartbeats (under the primary's name) do not hold failover off
        kill_primary_and_promote(pair, a, b)
    finally:
        s.stop()


def test_the_right_key_with_another_session_changes_nothing(pair: Pair) -> None:
    """A stale sender: the primary's own key, frames of other sessions (and of none)."""
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", str(N))
    pair.wait("protected", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    right = keys.load(pair.cfg_a.keys)
    ram = pair.cfg_b.guest.ram_mib << 20
    s = Stranger(endpoint(pair), pair.cfg_b.pair.name, ram, right, session=987654321,
                 hellos=False).start()  # fmt: skip
    try:
        st_b = frozen_and_equal(pair, a, b)
        assert st_b["dropped"] > 50  # they arrived (authenticated) and were dropped
        # the standby answered none of it (it answers heartbeats of its session only)
        assert s.rounds > 20 and s.replies == []
    finally:
        s.stop()
    # a stale sender's heartbeats do not hold failover off either
    s = Stranger(endpoint(pair), pair.cfg_b.pair.name, ram, right, session=987654321,
                 hellos=False).start()  # fmt: skip
    try:
        kill_primary_and_promote(pair, a, b)
    finally:
        s.stop()


def test_a_fake_standby_receives_nothing(pair: Pair, tmp_path: Path) -> None:
    """A process that takes the standby's address first (with a key of its own, or with
    none) gets not one byte of the guest's RAM; the real standby then pairs."""
    ep = endpoint(pair)
    standby = keys.load(pair.cfg_b.keys)
    assert standby is not None
    own = stranger_keys(tmp_path, standby.peer, "fake-standby")
    for fake_keys in (own, None):
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        socks = []
        for port in (ep.data_port, ep.heartbeat_port):
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            if fake_keys is not None:
                sock.curve_server = True
                sock.curve_secretkey, sock.curve_publickey = fake_keys.secret, fake_keys.public
            sock.bind(ep.url(port))
            socks.append(sock)
        a = pair.start_primary("--checkpoints", "20")
        got = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for sock in socks:
                while sock.poll(50):
                    got += len(b"".join(sock.recv_multipart()))
        for sock in socks:
            sock.close()
        ctx.term()
        assert got == 0, f"the fake standby received {got} bytes"
        st = a.status() or {}
        assert st.get("phase") == "pairing" and st.get("acked", 0) == 0
        a.stop()
        pair.hosts.remove(a)
    # the real standby pairs with a primary on the same ports
    b = pair.start_secondary()
    a = pair.start_primary("--checkpoints", "20")
    pair.wait("B at 20", lambda: (s := b.status()) and s["committed"] == 20)
