"""The interconnect on pyzmq: the checkpoint stream with its acks, and heartbeats.

Two sockets per side: data (checkpoints one way, acks back) and heartbeat,
each on its own port, and the heartbeat one served by its own thread, so a
large checkpoint in flight never delays a heartbeat.  The secondary binds
(ROUTER), the primary connects (DEALER); zmq reconnects by itself when a
peer comes back.  Page data is sent without copying (``copy=False``).

Every socket speaks CurveZMQ (docs/security.md) unless the pair is configured
insecure: the secondary's sockets are CURVE servers whose ZAP handler admits
only the configured peer's public key; the primary's are CURVE clients that
complete a handshake only with the holder of the standby's secret key, so it
sends nothing to anyone else.  A refused key is logged once, by fingerprint;
so is a peer that tried without CURVE.  Every socket has a maximum message
size: a larger frame drops the connection before zmq buffers it.

With keys, the PAGES messages (the bulk of what a pair sends) leave CURVE: the
secondary binds a third socket for them (``bulk``, on ``[link] bulk_port``, or a port
the system picks, named in its WELCOME), and the primary sends each PAGES message there
sealed part by part under AES-256-GCM with the session's key
(mirror.replication.pagecrypt); the secondary opens each part as it arrives.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from mirror.replication import pagecrypt, wire
from mirror.replication.keys import LinkKeys, fingerprint
from mirror.replication.pagediff import PAGE_SIZE

log = logging.getLogger("mirror.replication.link")


def tune_malloc() -> None:
    """Keep zmq's per-frame receive buffers on the heap.

    zmq allocates a buffer for each frame it receives; with glibc's defaults
    each 1 MiB page-data frame is a fresh mmap (page faults, then munmap).
    Raising the mmap and trim thresholds lets the heap reuse that memory:
    measured here, 2.8 GB/s for 64 MiB in 1 MiB frames on loopback instead
    of 0.9.  A no-op where the C library has no mallopt.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest glibc allows
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]  # fmt: skip


def _malloc_in_use() -> int | None:
    """Bytes this process has allocated with malloc and not freed (every arena; what zmq
    holds of received messages is there), or None where glibc's mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL(None)
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    f.restype = _MallInfo2
    m = f()
    return int(m.uordblks + m.hblkhd)


MEMORY_CHECK_S = 0.02  # how often the standby compares what zmq holds with its bound
MEMORY_SLACK = 64 << 20


@dataclass(frozen=True)
class Endpoint:
    host: str
    data_port: int
    heartbeat_port: int

    def url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"


class PeerSeen:
    """When the peer's heartbeat was last seen, and what it said."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.committed = 0
        self.node = ""
        self.session = 0

    def saw(self, hb: wire.Heartbeat) -> None:
        self.session = hb.session
        self.last = time.monotonic()
        self.committed = hb.committed
        self.node = hb.node

    def age(self) -> float | None:
        return None if self.last is None else time.monotonic() - self.last


HEARTBEAT_MAX_MSG = 4096  # a heartbeat is under 200 bytes
SEND_TIMEOUT_S = 1.0  # a data send that zmq cannot queue for this long fails (LinkDown)


class LinkDown(ConnectionError):
    """A message could not be handed to zmq: no connection to the peer completed its
    CURVE handshake (zmq gives a failed one up for good; :meth:`Link.reconnect`)."""


class Guard:
    """What the transport refused: keys the ZAP handler turned away (each logged once,
    by fingerprint) and handshakes that failed (a peer without CURVE, or garbage)."""

    MAX_KEYS = 1024  # distinct refused keys remembered (so each is logged once)

    def __init__(self, peer: bytes) -> None:
        self.peer = peer
        self.refused_keys: set[bytes] = set()
        self.refused = 0  # ZAP refusals
        self.failed_handshakes = 0  # handshakes that failed before ZAP (no CURVE, garbage)
        self._logged_no_key = False
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit the configured peer's key only."""
        if key == self.peer:
            return True
        with self._lock:
            self.refused += 1
            if key not in self.refused_keys and len(self.refused_keys) < self.MAX_KEYS:
                self.refused_keys.add(key)
                log.warning(
                    "refused a peer with an unknown CURVE key (fingerprint %s): only the "
                    "configured peer (fingerprint %s) may use the interconnect",
                    fingerprint(key),
                    fingerprint(self.peer),
                )
        return False

    def handshake_failed(self, port: str, event: int) -> None:
        with self._lock:
            self.failed_handshakes += 1
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return  # the callback logged it
            if not self._logged_no_key:
                self._logged_no_key = True
                log.warning(
                    "refused a peer on %s that did not complete a CURVE handshake (no key, "
                    "another protocol or garbage); further ones are only counted",
                    port,
                )


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, max_msg: int) -> zmq.Socket[bytes]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))  # no send blocks for good
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.MAXMSGSIZE, max_msg)
    return s


def _rebind(s: zmq.Socket[bytes], url: str, wait: float = 5.0) -> None:
    """Bind ``s`` at ``url`` again after an unbind (zmq releases the port shortly after)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            s.bind(url)
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise ConnectionError(f"cannot bind the interconnect at {url} again: {e}") from e
            time.sleep(0.01)


def _secure(s: zmq.Socket[bytes], keys: LinkKeys | None, server: bool) -> None:
    if keys is None:
        return
    s.curve_secretkey = keys.secret
    s.curve_publickey = keys.public
    if server:
        s.curve_server = True
        s.setsockopt(zmq.ZAP_DOMAIN, b"mirror")
    else:
        s.curve_serverkey = keys.peer


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class _Heartbeats(threading.Thread):
    """Sends our heartbeat every interval (client) or answers each one (server)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        url: str,
        node: str,
        interval: float,
        server: bool,
        committed: list[int],
        session: list[int],
        keys: LinkKeys | None,
        monitors: list[tuple[str, zmq.Socket[bytes]]],
        guard: Guard | None,
    ) -> None:
        super().__init__(name="heartbeats", daemon=True)
        self.sock = _socket(ctx, zmq.ROUTER if server else zmq.DEALER, HEARTBEAT_MAX_MSG)
        _secure(self.sock, keys, server)
        self.monitors = list(monitors)
        if guard is not None:
            self.monitors.append((url, self.sock.get_monitor_socket(_HANDSHAKE_FAILED)))
        self.guard = guard
        try:
            (self.sock.bind if server else self.sock.connect)(url)
        except zmq.ZMQError:
            self._close()
            raise
        self.node, self.interval, self.server = node, interval, server
        self.committed = committed  # a one-element list the owner updates
        self.session = session  # likewise: the session the owner is in (0: none)
        self.peer = PeerSeen()
        self.rejected = 0
        self.on_reject: Callable[[], None] = lambda: None  # the owner counts them too
        self._halt = threading.Event()
        self._seq = 0
        self.ctx, self.url, self.keys = ctx, url, keys
        self._reconnected = 0.0
        self.rebind = threading.Event()  # server: drop every connection, bind again

    def _mine(self) -> list[bytes]:
        self._seq += 1
        hb = wire.Heartbeat(self.node, self._seq, self.committed[0], self.session[0])
        return [bytes(f) for f in wire.encode(hb)]

    def _beat(self) -> None:
        """Send our heartbeat without ever blocking.  zmq has no connection to send on
        (its CURVE handshake failed: a listener without keys, or a peer that does not
        admit our key; zmq then gives up on it for good): connect again, at most once a
        second, so that the right peer is found once it listens."""
        try:
            self.sock.send_multipart(self._mine(), zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        now = time.monotonic()
        if now - self._reconnected < 1.0:
            return
        self._reconnected = now
        self.poller.unregister(self.sock)
        self.sock.close()
        self.sock = _socket(self.ctx, zmq.DEALER, HEARTBEAT_MAX_MSG)
        _secure(self.sock, self.keys, False)
        self.sock.connect(self.url)
        self.poller.register(self.sock, zmq.POLLIN)

    def _close(self) -> None:
        for _, m in self.monitors:
            m.close()
        self.sock.close()

    def _watch(self, poller: zmq.Poller, ready: dict[Any, int]) -> None:
        for port, m in self.monitors:
            while ready.get(m) and m.poll(0):
                try:
                    ev = recv_monitor_message(m)
                except (zmq.ZMQError, ValueError):
                    break
                if self.guard is not None and ev["event"] & _HANDSHAKE_FAILED:
                    self.guard.handshake_failed(port, int(ev["event"]))

    def run(self) -> None:
        next_beat = time.monotonic()
        self.poller = poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for _, m in self.monitors:
            poller.register(m, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                if self.server and self.rebind.is_set():
                    self.rebind.clear()
                    self.sock.unbind(self.url)
                    _rebind(self.sock, self.url)
                if not self.server and time.monotonic() >= next_beat:
                    self._beat()
                    next_beat += self.interval
                timeout = (
                    max(0.0, next_beat - time.monotonic()) if not self.server else 0.02
                )  # stops within 20 ms
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                self._watch(poller, ready)
                if not ready.get(self.sock):
                    continue
                frames = self.sock.recv_multipart()
                ident = frames[:1] if self.server else []
                try:
                    hb = wire.decode(list(frames[len(ident) :]))
                except wire.WireError as e:
                    self.rejected += 1
                    self.on_reject()
                    if self.rejected == 1 or self.rejected % 1000 == 0:
                        log.error("heartbeat rejected (%d so far): %s", self.rejected, e)
                    continue
                if not isinstance(hb, wire.Heartbeat):
                    self.rejected += 1
                    continue
                # the secondary counts the heartbeats of its session's primary only (or any
                # authenticated one while it has no session): a stale sender is no sign of life
                if self.server and self.session[0] and hb.session != self.session[0]:
                    continue
                self.peer.saw(hb)
                if self.server:
                    with contextlib.suppress(zmq.Again):  # never blocks (a heartbeat lost)
                        self.sock.send_multipart(ident + self._mine(), zmq.NOBLOCK)
        except zmq.ZMQError:
            if not self._halt.is_set():
                raise
        finally:
            self._close()

    def stop(self) -> None:
        self._halt.set()


class Link:
    """One side of the interconnect.  Use :meth:`server` (secondary) or :meth:`client`.

    ``keys``: this host's CurveZMQ key pair and the peer's public key (None: insecure).
    ``max_pages``: the most pages a message may carry (the pair's RAM); it bounds the
    maximum message size of the data socket."""

    def __init__(
        self,
        endpoint: Endpoint,
        node: str,
        *,
        server: bool,
        keys: LinkKeys | None,
        heartbeat_interval: float = 0.1,
        max_pages: int = wire.MAX_PAGES - 1,
        bulk_port: int = 0,
    ) -> None:
        tune_malloc()
        self.endpoint = endpoint
        self.keys = keys
        self.max_pages = max_pages
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.is_server = server
        self.guard: Guard | None = None
        self.auth: ThreadAuthenticator | None = None
        if server and keys is not None:  # the ZAP handler, before any socket binds
            self.guard = Guard(keys.peer)
            self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("mirror.zap"))
            self.auth.start()
            self.auth.configure_curve_callback("mirror", credentials_provider=self.guard)
        # the largest frame a peer may send: a page list of the whole RAM (index, lengths,
        # checksums: 16 bytes a page), a data frame, the device state, the header
        biggest = max(16 * max_pages, wire.DATA_FRAME + PAGE_SIZE, wire.MAX_STATE, wire.MAX_HEADER)
        self._biggest = biggest + 4096
        self.data = _socket(self.ctx, zmq.ROUTER if server else zmq.DEALER, self._biggest)
        # the client's data connection keeps one routing id across reconnects, so that the
        # standby's answers to sealed pages (which come on the pages socket) find it; the
        # server lets a reconnected client take its id over
        self._routing_id = b"mirror-" + secrets.token_bytes(8)
        if server:
            self.data.setsockopt(zmq.ROUTER_HANDOVER, 1)
        else:
            self.data.setsockopt(zmq.ROUTING_ID, self._routing_id)
        _secure(self.data, keys, server)
        # the client's own: handshakes that failed (no CURVE there, or our key refused)
        self._failures: zmq.Socket[bytes] | None = (
            self.data.get_monitor_socket(_HANDSHAKE_FAILED) if not server and keys else None
        )
        self.handshake_failures = 0
        monitors = (
            [(endpoint.url(endpoint.data_port), self.data.get_monitor_socket(_HANDSHAKE_FAILED))]
            if self.guard is not None
            else []
        )
        self.committed = [0]
        self.session = [0]  # the session this side is in (0: none); heartbeats carry it
        # the sealed pages' socket (server, with keys): no CURVE, every part AEAD-sealed
        # (pagecrypt); a head holds the page list and the device state, sealed together
        self.bulk: zmq.Socket[bytes] | None = None
        self.bulk_port = 0
        self._bulk_max = (
            17 * max_pages + wire.MAX_STATE + wire.MAX_HEADER + 4096 + pagecrypt.TAG
        )
        self.opener: pagecrypt.Opener | None = None  # server: this session's, once paired
        self._seal_key: bytes | None = None  # client: this session's, once paired
        try:
            if server:
                self.data.bind(endpoint.url(endpoint.data_port))
                if keys is not None:
                    self.bulk = _socket(self.ctx, zmq.ROUTER, self._bulk_max)
                    # port 0: one the system picks ("*"), named in the WELCOME
                    self.bulk.bind(endpoint.url(bulk_port) if bulk_port else
                                   endpoint.url(0)[:-1] + "*")  # fmt: skip
                    last = self.bulk.getsockopt(zmq.LAST_ENDPOINT)
                    assert isinstance(last, bytes)
                    self.bulk_port = int(last.rsplit(b":", 1)[1])
            else:
                self.data.connect(endpoint.url(endpoint.data_port))
            self.heartbeats = _Heartbeats(
                self.ctx,
                endpoint.url(endpoint.heartbeat_port),
                node,
                heartbeat_interval,
                server,
                self.committed,
                self.session,
                keys,
                monitors,
                self.guard,
            )
        except zmq.ZMQError as e:
            for _, m in monitors:
                m.close()
            if self.bulk is not None:
                self.bulk.close()
            self._close_sockets()
            hint = (
                ": another process listens there (a second standby of this pair on this "
                "host?); stop it or choose other link ports"
                if e.errno == zmq.EADDRINUSE
                else ""
            )
            raise ConnectionError(
                f"cannot {'bind' if server else 'connect'} the interconnect on "
                f"{endpoint.host} ports {endpoint.data_port}/"
                f"{endpoint.heartbeat_port}: {e}{hint}"
            ) from e
        self.heartbeats.start()
        self._peer_id: bytes | None = None  # server: the zmq identity of the last sender
        # server: the data connection of the session's primary (the sender of the HELLO
        # the standby accepted), where the answers to sealed pages go
        self.primary_id: bytes | None = None
        self.last_sealed = False  # server: the last message recv returned came sealed
        # zmq hands over a message only once all its frames are in, and bounds each frame
        # (MAXMSGSIZE), not their number: a peer could make it buffer a message of any
        # size.  The server bounds what this process holds in malloc (zmq's buffers are
        # there): two of the largest messages a pair sends, and some slack; past that the
        # peers' connections are dropped (a partly received message with them) and taken
        # again (a real primary reconnects and sends again what was not acknowledged).
        self.max_message = (
            wire.MAX_HEADER + 17 * max_pages + PAGE_SIZE * max_pages + wire.MAX_STATE
        )
        base = _malloc_in_use() if server else None
        self.memory_bound = None if base is None else base + 2 * self.max_message + MEMORY_SLACK
        self.memory_resets = 0
        self._memory_at = 0.0

    @classmethod
    def server(cls, endpoint: Endpoint, node: str, **kw: Any) -> Link:
        return cls(endpoint, node, server=True, **kw)

    @classmethod
    def client(cls, endpoint: Endpoint, node: str, **kw: Any) -> Link:
        return cls(endpoint, node, server=False, **kw)

    @property
    def peer(self) -> PeerSeen:
        return self.heartbeats.peer

    def seal_pages(self, port: int, key: bytes | None) -> None:
        """Client, at each pairing: send PAGES sealed under ``key`` to the standby's
        ``port`` (its WELCOME's ``bulk_port``), or (0, None) on the data socket."""
        if self.bulk is not None:
            self.bulk.close()
            self.bulk = None
        self._seal_key = key if port and key else None
        if self._seal_key is not None:
            self.bulk = _socket(self.ctx, zmq.DEALER, self._bulk_max)
            self.bulk.connect(self.endpoint.url(port))

    def open_pages(self, key: bytes | None) -> None:
        """Server, at each pairing: the new session's pages key (None: none)."""
        self.opener = pagecrypt.Opener(key) if key is not None else None

    def _send_sealed(self, msg: wire.Pages, corrupt: bool = False) -> None:
        assert self.bulk is not None and self._seal_key is not None
        parts = pagecrypt.sealed_messages(self._seal_key, msg.seq, wire.encode(msg))
        if corrupt:  # MIRROR_FAULT=corrupt: one bit of the last part flipped on the wire
            whole = list(parts)
            last = bytearray(whole[-1][1])
            last[len(last) // 2] ^= 0x04
            whole[-1][1] = last
            parts = iter(whole)
        try:
            for part in parts:  # each sealed while zmq sends the one before
                self.bulk.send_multipart(part, copy=False)
        except zmq.Again:
            raise LinkDown(
                f"cannot send sealed pages to {self.endpoint.host}: the standby's pages "
                f"port took nothing in {SEND_TIMEOUT_S:g} s"
            ) from None

    def pair_with_last_sender(self) -> None:
        """Server: the sender of the last data message (an accepted HELLO) is the
        session's primary: the answers to its sealed pages go to it."""
        self.primary_id = self._peer_id

    def send(self, msg: wire.Message, *, to_primary: bool = False) -> None:
        """Hand ``msg`` to zmq.  LinkDown if zmq cannot queue it within SEND_TIMEOUT_S
        (no connection completed its handshake: :meth:`reconnect`).  Server: to the last
        sender, or (``to_primary``) to the session's primary (:meth:`pair_with_last_sender`)."""
        if isinstance(msg, wire.Pages) and self._seal_key is not None and not self.is_server:
            self._send_sealed(msg)
            return
        frames: Sequence[bytes | memoryview] = wire.encode(msg)
        if self.is_server:
            to = self.primary_id if to_primary else self._peer_id
            if to is None:
                raise ConnectionError("no primary has connected yet")
            frames = [to, *frames]
        try:
            self.data.send_multipart(frames, copy=False)
        except zmq.Again:
            raise LinkDown(
                f"cannot send to {self.endpoint.host}:{self.endpoint.data_port}: no "
                f"connection completed a CURVE handshake in {SEND_TIMEOUT_S:g} s"
            ) from None

    def handshake_failed(self) -> bool:
        """Client: whether a CURVE handshake with the peer failed since the last call
        (something listens there without keys or with another key, or does not admit
        ours).  zmq does not try that connection again: :meth:`reconnect`."""
        failed = False
        while self._failures is not None and self._failures.poll(0):
            try:
                ev = recv_monitor_message(self._failures)
            except (zmq.ZMQError, ValueError):
                break
            if ev["event"] & _HANDSHAKE_FAILED:
                failed = True
                self.handshake_failures += 1
        return failed

    def reconnect(self) -> None:
        """Client: a new data socket, connected again (what was queued is dropped)."""
        if self.is_server:
            return
        if self._failures is not None:
            self._failures.close()
        self.data.close()
        self.data = _socket(self.ctx, zmq.DEALER, self._biggest)
        self.data.setsockopt(zmq.ROUTING_ID, self._routing_id)
        _secure(self.data, self.keys, False)
        self._failures = (
            self.data.get_monitor_socket(_HANDSHAKE_FAILED) if self.keys else None
        )
        self.data.connect(self.endpoint.url(self.endpoint.data_port))

    def send_corrupted(self, msg: wire.Message) -> None:
        """Testing (MIRROR_FAULT=corrupt): send ``msg`` with one bit of its last frame
        flipped, as a bad link would deliver it."""
        if isinstance(msg, wire.Pages) and self._seal_key is not None and not self.is_server:
            log.warning("MIRROR_FAULT: sending a corrupted copy of %s", type(msg).__name__)
            with contextlib.suppress(LinkDown):
                self._send_sealed(msg, corrupt=True)
            return
        frames = [bytes(f) for f in wire.encode(msg)]
        last = bytearray(frames[-1])
        last[len(last) // 2] ^= 0x04
        frames[-1] = bytes(last)
        log.warning("MIRROR_FAULT: sending a corrupted copy of %s", type(msg).__name__)
        if self.is_server:
            if self._peer_id is None:
                raise ConnectionError("no primary has connected yet")
            frames = [self._peer_id, *frames]
        with contextlib.suppress(zmq.Again):
            self.data.send_multipart(frames)

    def recv(self, timeout: float | None) -> wire.Message | None:
        """The next message, or None after ``timeout`` seconds.  Raises WireError
        for a malformed message (already read off the socket)."""
        self._check_memory()
        if self.bulk is not None and self.is_server:
            return self._recv_either(timeout)
        ms = None if timeout is None else int(timeout * 1000)
        if not self.data.poll(ms):
            return None
        return self._recv_data()

    def _recv_either(self, timeout: float | None) -> wire.Message | None:
        """Server with keys: the next message of the data socket, or the next PAGES
        message whose last sealed part came in on the bulk socket (each part opened as
        it arrives).  SealError (a WireError) for a part refused."""
        assert self.bulk is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.data, zmq.POLLIN)
        poller.register(self.bulk, zmq.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(poller.poll(None if left is None else int(left * 1000)))
            # one part of the bulk, then one message of the data socket: neither starves
            # the other (a peer flooding one socket cannot hold the other up)
            if ready.get(self.bulk):
                raw = self.bulk.recv_multipart(copy=False)
                if self.opener is None:
                    raise pagecrypt.SealError("sealed pages before any session: dropped")
                whole = self.opener.take(bytes(raw[0].buffer), [f.buffer for f in raw[1:]])
                if whole is not None:
                    self.last_sealed = True
                    return wire.decode(whole, self.max_pages)
            if ready.get(self.data):
                return self._recv_data()
            # the next part is likely on its way: wait on, but never past the timeout (a
            # peer that never stops sending must not keep the caller from its other work)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _recv_data(self) -> wire.Message:
        self.last_sealed = False
        raw = self.data.recv_multipart(copy=False)
        frames: list[Any] = [f.buffer for f in raw]
        if self.is_server:
            self._peer_id = bytes(frames[0])
            frames = frames[1:]
        return wire.decode(frames, self.max_pages)

    def _check_memory(self) -> None:
        """Server: past the memory bound, drop the peers' connections (see __init__)."""
        if self.memory_bound is None:
            return
        now = time.monotonic()
        if now - self._memory_at < MEMORY_CHECK_S:
            return
        self._memory_at = now
        used = _malloc_in_use()
        if used is None or used <= self.memory_bound:
            return
        self.memory_resets += 1
        log.warning(
            "%s",
            json.dumps({
                "event": "link-memory-bound", "held_mib": used >> 20,
                "bound_mib": self.memory_bound >> 20, "resets": self.memory_resets,
                "note": "a peer sent more than any message may hold: its connections were "
                "dropped (a partly received message with them)",
            }),
        )  # fmt: skip
        url = self.endpoint.url(self.endpoint.data_port)
        self.data.unbind(url)  # ends the connections accepted there, and their pipes
        self.heartbeats.rebind.set()
        self._peer_id = None
        _rebind(self.data, url)
        if self.bulk is not None:
            bulk_url = self.endpoint.url(self.bulk_port)
            self.bulk.unbind(bulk_url)
            _rebind(self.bulk, bulk_url)

    def _close_sockets(self) -> None:
        if getattr(self, "_failures", None) is not None:
            self._failures.close()  # type: ignore[union-attr]
        if getattr(self, "bulk", None) is not None:
            self.bulk.close()  # type: ignore[union-attr]
        self.data.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def close(self) -> None:
        self.heartbeats.stop()
        self.heartbeats.join(2)
        self._close_sockets()
