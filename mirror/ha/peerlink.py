"""The host agents' interconnect: one agent asks another to prepare or drop a standby.

Each ``mirror agent`` serves a zmq ROUTER socket on ``[agent] address:port`` that speaks
CurveZMQ only: its ZAP handler admits the public keys of the peers in its ``[peers]``
table and nobody else (a stranger's handshake fails; it gets no answer at all, and is
logged once by key fingerprint).  The key that completed the handshake names the peer:
a request's sender is the zmq ``User-Id`` the ZAP handler set, never a field of the
request.  A client (DEALER) completes its handshake only with the holder of the peer's
secret key, so it sends nothing to anyone else.

A request is one JSON object ``{"op": ..., "id": N, ...}`` in one frame (at most
MAX_MESSAGE bytes: a domain's XML fits); the answer is ``{"id": N, "ok": true, ...}`` or
``{"id": N, "ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from mirror.replication.keys import fingerprint

log = logging.getLogger("mirror.ha.peerlink")

MAX_MESSAGE = 4 << 20
DOMAIN = b"mirror-agent"


class PeerError(RuntimeError):
    """A peer's host agent could not be asked, or refused; the message says which and why."""


@dataclass(frozen=True)
class PeerAddress:
    name: str
    host: str
    port: int
    public_key: bytes  # z85

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


class _Admit:
    """ZAP: admit the configured peers' keys only (each stranger logged once)."""

    def __init__(self, peers: dict[bytes, str]) -> None:
        self.peers = peers
        self.refused: set[bytes] = set()
        self.refusals = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.peers:
            return True
        self.refusals += 1
        if key not in self.refused and len(self.refused) < 1024:
            self.refused.add(key)
            log.warning(
                "refused a host agent with an unknown CURVE key (fingerprint %s): only the peers "
                "in [peers] may ask this host agent anything",
                fingerprint(key),
            )
        return False


Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class PeerServer(threading.Thread):
    """Serves the peers' requests: ``handler(peer_name, request)`` -> answer fields
    (raise PeerError to refuse with its message)."""

    def __init__(
        self,
        host: str,
        port: int,
        public: bytes,
        secret: bytes,
        peers: dict[str, bytes],
        handler: Handler,
    ) -> None:
        super().__init__(name="peer-server", daemon=True)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.admit = _Admit({k: n for n, k in peers.items()})
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("mirror.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(DOMAIN.decode(), credentials_provider=self.admit)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True
        self.sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
        url = f"tcp://{f'[{host}]' if ':' in host else host}:{port}"
        try:
            self.sock.bind(url)
        except zmq.ZMQError as e:
            self.close()
            raise PeerError(
                f"cannot serve the host agents' interconnect on {host}:{port}: {e.strerror} (set "
                f"[agent] address and port to this host's interconnect address and a free port)"
            ) from None
        self.handler = handler
        self._halt = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._halt.is_set():
            try:
                if not poller.poll(200):
                    continue
                ident, frame = self._recv()
            except zmq.ZMQError:
                if self._halt.is_set():
                    return
                continue
            if frame is None:
                continue
            self._serve(ident, frame)

    def _recv(self) -> tuple[bytes, zmq.Frame | None]:
        parts = self.sock.recv_multipart(copy=False)
        if len(parts) != 2:
            return b"", None
        return bytes(parts[0].bytes), parts[1]

    def _serve(self, ident: bytes, frame: zmq.Frame) -> None:
        key = str(frame.get("User-Id") or "").encode()
        peer = self.admit.peers.get(key)
        if peer is None:  # cannot happen past ZAP; never answer a stranger
            return
        rid: Any = None
        try:
            req = json.loads(bytes(frame.bytes).decode())
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise PeerError("not a request (a JSON object with an op)")
            rid = req.get("id")
            answer = {"ok": True, **self.handler(peer, req)}
        except (ValueError, UnicodeDecodeError):
            answer = {"ok": False, "error": "not a request (not JSON)"}
        except RecursionError:  # json nests without a limit of its own: one line, no trace
            log.warning("refused a request from %s: JSON nested too deeply", peer)
            answer = {"ok": False, "error": "not a request (JSON nested too deeply)"}
        except PeerError as e:
            answer = {"ok": False, "error": str(e)}
        except Exception as e:  # one bad request never ends the server
            log.exception("peer request from %s failed", peer)
            answer = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        answer["id"] = rid
        try:
            self.sock.send_multipart([ident, json.dumps(answer, default=str).encode()])
        except zmq.ZMQError as e:
            log.warning("cannot answer %s: %s", peer, e)

    def close(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(2)
        self.sock.close(0)
        self.auth.stop()
        self.ctx.term()


def ask(
    peer: PeerAddress,
    public: bytes,
    secret: bytes,
    op: str,
    args: dict[str, Any] | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Ask ``peer``'s host agent ``op``; its answer.  PeerError if it does not answer within
    ``timeout`` (it is down, unreachable, or does not know this host's key: the
    handshake then fails and nothing is said) or refuses."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        s.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))  # never blocks for good
        s.curve_secretkey = secret
        s.curve_publickey = public
        s.curve_serverkey = peer.public_key
        s.connect(peer.url())
        rid = int.from_bytes(os.urandom(6), "big")
        try:
            s.send(json.dumps({**(args or {}), "op": op, "id": rid}).encode())
            answered = s.poll(int(timeout * 1000))
        except zmq.Again:
            answered = False
        if not answered:
            raise PeerError(
                f"the host agent of {peer.name} at {peer.host}:{peer.port} did not answer {op!r} "
                f"within {timeout:g} s: is `mirror agent` running there, and is this host in "
                f"its [peers] with this host's public key?"
            )
        try:
            answer = json.loads(s.recv().decode())
        except (ValueError, UnicodeDecodeError, RecursionError):
            answer = None
        if not isinstance(answer, dict) or answer.get("id") != rid:
            raise PeerError(f"the host agent of {peer.name} gave no valid answer to {op!r}")
        if not answer.get("ok"):
            raise PeerError(f"the host agent of {peer.name} refused {op!r}: {answer.get('error')}")
        return answer
    finally:
        s.close(0)
        ctx.term()
