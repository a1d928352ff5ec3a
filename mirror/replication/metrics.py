"""Every Prometheus metric a role exports, defined here and nowhere else.

One role process is one node of one pair, so every series carries the labels
``pair`` and ``node`` (``Metrics.of(pair, node)`` binds them).  Names follow
Prometheus' conventions: base units in the name (``_seconds``, ``_bytes``),
``_total`` on counters.  The role serves them over HTTP when ``[metrics] listen``
is set (:func:`serve`); deploy/prometheus/mirror-rules.yml alerts on them.  A role the
host agent runs hands them to it on a unix socket instead (``[metrics] socket``:
:func:`serve_socket`, :func:`scrape_socket`); the host agent serves every pair's on one
port (mirror/ha/agentmetrics.py).

The checkpoint pause is the hottest path: nothing here is called inside it.  The
epoch engine records a checkpoint's figures after the guest runs again (after the
checkpoint is handed to the link); observing a histogram costs about a microsecond.

Not here yet: disk replication lag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from functools import cache
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)

log = logging.getLogger("mirror.replication.metrics")

REGISTRY = CollectorRegistry()
LABELS = ("pair", "node")
_PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0)
_PAGE_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_BYTE_BUCKETS = tuple(float(b * 4096) for b in _PAGE_BUCKETS)
_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
PHASES = ("stop", "scan", "gather", "state", "resume")  # the pause's split
# the failover rules' states (mirror/ha/rules.py State), plus the role's own: no
# rules yet, or the role stopped
STATES = (
    "standby",
    "partitioned",
    "unverified",
    "claiming-promote",
    "promoted",
    "claim-lost",
    "protected",
    "claiming-unprotected",
    "unprotected",
    "isolated",
    "holding",
    "fenced",
    "stopped",
)

PAUSE = Histogram(
    "mirror_checkpoint_pause_seconds",
    "How long the guest was paused for one checkpoint",
    LABELS,
    buckets=_PAUSE_BUCKETS,
    registry=REGISTRY,
)
PAUSE_PHASE = Histogram(
    "mirror_checkpoint_pause_phase_seconds",
    "The checkpoint pause's split: stop the guest, scan RAM, gather pages, save device "
    "state, resume",
    (*LABELS, "phase"),
    buckets=_PAUSE_BUCKETS,
    registry=REGISTRY,
)
DIRTY_PAGES = Histogram(
    "mirror_checkpoint_dirty_pages",
    "Dirty pages (4 KiB) in one checkpoint",
    LABELS,
    buckets=_PAGE_BUCKETS,
    registry=REGISTRY,
)
CHECKPOINT_BYTES = Histogram(
    "mirror_checkpoint_bytes",
    "Bytes one checkpoint sends (page data and device state)",
    LABELS,
    buckets=_BYTE_BUCKETS,
    registry=REGISTRY,
)
REPLICATED = Counter(
    "mirror_replicated_bytes_total",
    "Bytes sent to the standby (pre-copy and checkpoints); rate() is the replication throughput",
    LABELS,
    registry=REGISTRY,
)
CHECKPOINTS = Counter("mirror_checkpoints_total", "Checkpoints taken", LABELS, registry=REGISTRY)
ACKED = Counter(
    "mirror_checkpoints_acked_total",
    "Checkpoints the standby acknowledged",
    LABELS,
    registry=REGISTRY,
)
ACK_LATENCY = Histogram(
    "mirror_checkpoint_ack_seconds",
    "From a checkpoint handed to the link to its acknowledgement",
    LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OUTPUT_HOLD = Histogram(
    "mirror_output_hold_seconds",
    "How long the guest's outputs were held (produced to released)",
    LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
OUTPUTS_HELD = Gauge(
    "mirror_outputs_held", "Outputs held now, waiting for their checkpoint's ack", LABELS,
    registry=REGISTRY,
)  # fmt: skip
PROTECTED = Gauge(
    "mirror_protected",
    "1 while this node runs the guest and a standby holds its checkpoints, 0 while it "
    "runs the guest unprotected (exported only by the node that runs the guest)",
    LABELS,
    registry=REGISTRY,
)
STATE = Enum(
    "mirror_protection_state",
    "The failover controller's state (and 'stopped')",
    LABELS,
    states=list(STATES),
    registry=REGISTRY,
)
ROLE = Enum(
    "mirror_role", "This node's role", LABELS, states=["primary", "secondary"], registry=REGISTRY
)
GENERATION = Gauge(
    "mirror_generation", "The pair's generation as this node knows it", LABELS, registry=REGISTRY
)
COMMITTED = Gauge(
    "mirror_standby_committed_checkpoint",
    "The checkpoint the standby image holds (secondary)",
    LABELS,
    registry=REGISTRY,
)
PROMOTIONS = Counter(
    "mirror_promotions_total",
    "This node's standby became the primary, by cause: failure (the primary died), "
    "operator (mirror failover), switchover (a planned handover)",
    (*LABELS, "cause"),
    registry=REGISTRY,
)
UNPROTECTED = Counter(
    "mirror_unprotected_total",
    "This primary lost its standby and won the claim to run on unprotected",
    LABELS,
    registry=REGISTRY,
)
FENCED = Counter(
    "mirror_fenced_total", "This primary fenced itself (stopped its guest)", LABELS,
    registry=REGISTRY,
)  # fmt: skip
HEARTBEAT_AGE = Gauge(
    "mirror_peer_heartbeat_age_seconds",
    "Seconds since the peer's last heartbeat, by path (network, storage); NaN: never seen",
    (*LABELS, "path"),
    registry=REGISTRY,
)
STORAGE_OK = Gauge(
    "mirror_storage_heartbeat_ok",
    "1 while this node's storage heartbeat writes to the arbiter succeed, 0 while they "
    "fail (its storage path is dead: the peer cannot tell it from a dead node)",
    LABELS,
    registry=REGISTRY,
)
PEER_SLOT_SEEN = Gauge(
    "mirror_peer_storage_slot_seen",
    "1 once this node has seen its peer's storage heartbeat slot change on the arbiter in "
    "this generation; 0 until then: the peer's silence there is no evidence, failover is "
    "disabled, and the pair is not protected (the arbiter may not be shared). Exported "
    "while this node judges a peer",
    LABELS,
    registry=REGISTRY,
)
REJECTED_FRAMES = Counter(
    "mirror_rejected_frames_total",
    "Frames this node rejected (malformed or failing verification), by socket",
    (*LABELS, "socket"),
    registry=REGISTRY,
)
REFUSED_PEERS = Counter(
    "mirror_refused_peers_total",
    "Peers refused at pairing (wrong pair, generation, RAM size or guest, or a "
    "stranger while the primary lives)",
    LABELS,
    registry=REGISTRY,
)
# The dirty log's misses: pages a checkpoint's dirty log did not report but a check found
# written.  Stays 0 until a dirty-log scan counts its misses here (DIRTYLOG-NOTES).
MISSED_PAGES = Counter(
    "mirror_dirty_log_missed_pages_total",
    "Pages the dirty log missed (found written by a check scan, not reported by the log)",
    LABELS,
    registry=REGISTRY,
)

THROTTLE_LEVEL = Gauge(
    "mirror_throttle_level",
    "How much the throttle slows the guest (checkpoint.max_pause_ms): 0 runs it at full "
    "speed, 0.95 at a twentieth of it",
    LABELS,
    registry=REGISTRY,
)
THROTTLED = Gauge(
    "mirror_throttled_seconds",
    "Seconds the throttle has held the guest below full speed (this engine's life; a "
    "counter that restarts with a new pairing)",
    LABELS,
    registry=REGISTRY,
)
CANNOT_HOLD = Gauge(
    "mirror_throttle_cannot_hold",
    "1 while the throttle, at its lowest speed, still cannot keep checkpoints within "
    "checkpoint.max_pause_ms (event throttle-cannot-hold); 0 otherwise",
    LABELS,
    registry=REGISTRY,
)
CAPACITY = Gauge(
    "mirror_replication_capacity_bytes_per_second",
    "The pair's capacity (link and standby) as measured from the acks; 0: not measured yet",
    LABELS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "mirror_in_flight_bytes",
    "Bytes of checkpoints sent and not yet acknowledged",
    LABELS,
    registry=REGISTRY,
)
SEND_BUFFERS = Gauge(
    "mirror_send_buffer_bytes",
    "Bytes the primary's send buffers hold (capped at (max_in_flight + 1) x guest RAM)",
    LABELS,
    registry=REGISTRY,
)


DISK_STORAGE = Enum(
    "mirror_disk_storage",
    "Where the primary's guest disk I/O goes: its local image, the secondary's replica "
    "(the local image failed), or suspended (the local image failed and the secondary is gone)",
    LABELS,
    states=["local", "remote", "suspended"],
    registry=REGISTRY,
)
DISK_FAILOVERS = Gauge(
    "mirror_disk_storage_failovers",
    "Times the primary's disk switched to the secondary's replica (this disk server's life)",
    LABELS,
    registry=REGISTRY,
)
DISK_DIRTY_LOCAL = Gauge(
    "mirror_disk_local_dirty_blocks",
    "4 KiB blocks the primary's local image lacks (written while it ran on the replica)",
    LABELS,
    registry=REGISTRY,
)

NIC_GATES_BROKEN = Gauge(
    "mirror_nic_gates_broken",
    "NICs of this node's guest whose output-commit gate no longer holds as it should (a "
    "libvirt domain's NICs as defined, mirror/replication/nicgate.py): their frames are "
    "dropped, or leave unheld if the hold filter is gone; 0 while every gate holds",
    LABELS,
    registry=REGISTRY,
)


class Metrics:
    """The series of one pair and node; get it with :meth:`of`."""

    def __init__(self, pair: str, node: str) -> None:
        self.pair, self.node = pair, node
        labels = (pair, node)
        self.pause = PAUSE.labels(*labels)
        self.phases = {p: PAUSE_PHASE.labels(*labels, p) for p in PHASES}
        self.dirty_pages = DIRTY_PAGES.labels(*labels)
        self.checkpoint_bytes = CHECKPOINT_BYTES.labels(*labels)
        self.replicated = REPLICATED.labels(*labels)
        self.checkpoints = CHECKPOINTS.labels(*labels)
        self.acked = ACKED.labels(*labels)
        self.ack_latency = ACK_LATENCY.labels(*labels)
        self.output_hold = OUTPUT_HOLD.labels(*labels)
        self.outputs_held = OUTPUTS_HELD.labels(*labels)
        self.state = STATE.labels(*labels)
        self.role = ROLE.labels(*labels)
        self.generation = GENERATION.labels(*labels)
        self.committed = COMMITTED.labels(*labels)
        self.unprotected = UNPROTECTED.labels(*labels)
        self.fenced = FENCED.labels(*labels)
        self.net_age = HEARTBEAT_AGE.labels(*labels, "network")
        self.storage_age = HEARTBEAT_AGE.labels(*labels, "storage")
        self.storage_ok = STORAGE_OK.labels(*labels)
        self.refused_peers = REFUSED_PEERS.labels(*labels)
        self.missed_pages = MISSED_PAGES.labels(*labels)
        self.disk_storage = DISK_STORAGE.labels(*labels)
        self.throttle_level = THROTTLE_LEVEL.labels(*labels)
        self.throttled = THROTTLED.labels(*labels)
        self.cannot_hold = CANNOT_HOLD.labels(*labels)
        self.capacity = CAPACITY.labels(*labels)
        self.in_flight_bytes = IN_FLIGHT.labels(*labels)
        self.send_buffers = SEND_BUFFERS.labels(*labels)
        self.disk_failovers = DISK_FAILOVERS.labels(*labels)
        self.disk_dirty_local = DISK_DIRTY_LOCAL.labels(*labels)
        self.nic_gates_broken = NIC_GATES_BROKEN.labels(*labels)
        for cause in ("failure", "operator", "switchover"):
            PROMOTIONS.labels(*labels, cause)  # each cause exported from 0
        for sock in ("data", "heartbeat"):
            REJECTED_FRAMES.labels(*labels, sock)

    @staticmethod
    @cache
    def of(pair: str, node: str) -> Metrics:
        return Metrics(pair, node)

    def checkpoint(
        self, split_ms: dict[str, float], pause_ms: float, pages: int, sent: int
    ) -> None:
        """One checkpoint's figures (called after the guest resumed)."""
        self.pause.observe(pause_ms / 1000)
        for phase, ms in split_ms.items():
            self.phases[phase].observe(ms / 1000)
        self.dirty_pages.observe(pages)
        self.checkpoint_bytes.observe(sent)
        self.replicated.inc(sent)
        self.checkpoints.inc()

    def throttle(
        self, level: float, throttled_s: float, capacity: float, cannot_hold: bool = False
    ) -> None:
        """The throttle after a checkpoint (after the resume)."""
        self.throttle_level.set(level)
        self.cannot_hold.set(1 if cannot_hold else 0)
        self.throttled.set(throttled_s)
        self.capacity.set(capacity)

    def in_flight(self, nbytes: int, buffers: int) -> None:
        self.in_flight_bytes.set(nbytes)
        self.send_buffers.set(buffers)

    def promoted(self, cause: str) -> None:
        PROMOTIONS.labels(self.pair, self.node, cause).inc()

    def rejected(self, socket: str) -> None:
        REJECTED_FRAMES.labels(self.pair, self.node, socket).inc()

    def guest_here(self, protected: bool | None) -> None:
        """Whether this node runs the guest protected (True), unprotected (False), or
        does not run it (None: the series is withdrawn)."""
        if protected is None:
            with contextlib.suppress(KeyError):
                PROTECTED.remove(self.pair, self.node)
        else:
            PROTECTED.labels(self.pair, self.node).set(1 if protected else 0)

    def slot_seen(self, seen: bool | None) -> None:
        """Whether this node has seen its peer's storage slot on the arbiter in this
        generation; None withdraws the series (no peer is being judged)."""
        if seen is None:
            with contextlib.suppress(KeyError):
                PEER_SLOT_SEEN.remove(self.pair, self.node)
        else:
            PEER_SLOT_SEEN.labels(self.pair, self.node).set(1 if seen else 0)

    def ages(self, net: float | None, storage: float | None) -> None:
        nan = float("nan")
        self.net_age.set(nan if net is None else net)
        self.storage_age.set(nan if storage is None else storage)


_served: dict[str, Any] = {}
_lock = threading.Lock()


def served() -> str | None:
    """HOST:PORT where this process serves its metrics, or None."""
    with _lock:
        addr = _served.get("address")
    return None if addr is None else f"{addr[0]}:{addr[1]}"


MAX_CONNECTIONS = 16  # served at once; more are closed at once (a scrape needs one)
READ_TIMEOUT_S = 5.0  # a connection that sends nothing for this long is closed


class _Quiet(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S  # on the connection's socket: reads and writes

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS of them, each with a timeout:
    idle or slow clients cannot make the role hold threads and memory without bound."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    refused = 0  # connections closed at once for want of a slot

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to report (no traceback)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` at http://HOST:PORT/metrics from a daemon thread; the server
    (``shutdown()`` and ``server_close()`` end it).  Port 0 picks a free one.  At most
    MAX_CONNECTIONS connections are served at once, each closed after READ_TIMEOUT_S
    without progress.  Raises OSError when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(_BoundedServer):
        address_family = family

    server = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def serve(host: str, port: int) -> tuple[str, int]:
    """Serve REGISTRY at http://HOST:PORT/metrics (:func:`serve_registry`), once per
    process; a second call returns the first address."""
    with _lock:
        if "address" not in _served:
            server = serve_registry(REGISTRY, host, port)
            _served.update(address=server.server_address[:2], server=server)
        addr = _served["address"]
        return str(addr[0]), int(addr[1])


# -- a role's metrics for its host agent: a unix socket -----------------------------------
#
# The host agent connects to the role's socket; the role writes the text exposition of
# REGISTRY and closes.  Nothing is read from the client.  One client at a time, each
# given SOCKET_TIMEOUT_S; only root or the role's own user is answered (SO_PEERCRED).

SOCKET_TIMEOUT_S = 2.0
MAX_EXPOSITION = 8 << 20  # bytes the host agent reads from one role at most


def _trusted_peer(conn: socket.socket) -> bool:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                          socket.SO_PEERCRED, 12))
    return uid in (0, os.geteuid())


_sockets: set[Path] = set()  # served by this process (a role that becomes the other)


def serve_socket(path: str | Path) -> None:
    """Serve REGISTRY's text on the unix socket ``path`` (made 0600, a leftover replaced)
    from a daemon thread, for this process's life (once per path).  OSError when it cannot
    be made."""
    path = Path(path)
    with _lock:
        if path in _sockets:
            return
        _serve_socket(path)
        _sockets.add(path)


def _serve_socket(path: Path) -> None:
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # through the directory's descriptor: a long path does not meet the 108-byte limit
    where = f"/proc/self/fd/{dfd}/{path.name}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=dfd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(where)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
        os.close(dfd)
    sock.listen(8)

    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError as e:
                log.warning("metrics socket %s: %s", path, e)
                time.sleep(1)
                continue
            with conn:
                try:
                    conn.settimeout(SOCKET_TIMEOUT_S)
                    if _trusted_peer(conn):
                        conn.sendall(generate_latest(REGISTRY))
                except OSError:
                    pass  # a client that went away or took too long: the next one

    threading.Thread(target=run, name="metrics-socket", daemon=True).start()


def scrape_socket(path: str | Path, timeout: float = SOCKET_TIMEOUT_S) -> bytes:
    """A role's metrics text from its socket ``path``, within ``timeout`` seconds in all;
    OSError (TimeoutError, ConnectionRefusedError...) when there is none."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(f"/proc/self/fd/{dfd}/{path.name}")
            if not _trusted_peer(s):
                raise PermissionError(f"{path} is served by another user: not read")
            chunks: list[bytes] = []
            size = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{path}: no complete answer within {timeout:g} s")
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > MAX_EXPOSITION:
                    raise OSError(f"{path}: more than {MAX_EXPOSITION} bytes: not read")
                chunks.append(chunk)
    finally:
        os.close(dfd)


# The host agent's own series (mirror/ha/agentmetrics.py makes them at each scrape).
ROLE_UP = ("mirror_agent_role_up", "1 when the pair's role answered the host agent's last "
           "scrape of its metrics, 0 when it did not (dead, stuck, or not started)")
