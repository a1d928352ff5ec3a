"""The host agents' interconnect on real local sockets: a peer's malformed request is
one clear refusal and one log line, never a traceback."""

from __future__ import annotations

import json
import logging

import pytest
import zmq

from mirror.ha import peerlink
from mirror.lab.demo import free_ports


def _raw_ask(port: int, server_pub: bytes, pub: bytes, sec: bytes, body: bytes) -> dict:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.curve_secretkey, s.curve_publickey, s.curve_serverkey = sec, pub, server_pub
        s.connect(f"tcp://127.0.0.1:{port}")
        s.send(body)
        assert s.poll(10_000), "no answer"
        return json.loads(s.recv())  # type: ignore[no-any-return]
    finally:
        s.close(0)
        ctx.term()


def test_a_deeply_nested_request_is_refused_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    server_pub, server_sec = zmq.curve_keypair()
    peer_pub, peer_sec = zmq.curve_keypair()
    (port,) = free_ports(1)
    server = peerlink.PeerServer(
        "127.0.0.1", port, server_pub, server_sec, {"hostB": peer_pub},
        lambda peer, req: {"node": "hostA", "peer": peer},
    )  # fmt: skip
    server.start()
    try:
        target = peerlink.PeerAddress("hostA", "127.0.0.1", port, server_pub)
        assert peerlink.ask(target, peer_pub, peer_sec, "ping")["peer"] == "hostB"
        depth = 200_000  # far past Python's recursion limit, well under MAX_MESSAGE
        body = b'{"op": "ping", "id": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
        with caplog.at_level(logging.WARNING, logger="mirror.ha.peerlink"):
            answer = _raw_ask(port, server_pub, peer_pub, peer_sec, body)
        assert answer["ok"] is False and "nested too deeply" in answer["error"], answer
        assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
        assert "JSON nested too deeply" in caplog.text
        assert all(r.exc_info is None for r in caplog.records)
        assert peerlink.ask(target, peer_pub, peer_sec, "ping")["node"] == "hostA"  # serves on
    finally:
        server.close()
