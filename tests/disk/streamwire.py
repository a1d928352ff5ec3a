"""The disk stream's handshake from Python, as a primary (with the session key) or as a
stranger (with a wrong key, or none): what native/diskstream.c's cmd_replicate does.

Records after the handshake are sent as they are: a replica started with
``plain_stream`` takes them (the record checks are then the same as under AEAD); a
replica under AES-256-GCM refuses them for their missing tag."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

MAGIC = 0x4D524431
HELLO, WRITE, ZERO, TRIM, BARRIER, SYNC, SYNC_DONE, READ, READ_REPLY = range(1, 10)


def rec(kind: int, epoch: int = 0, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack("<IIQQQ", MAGIC, kind, epoch, offset, length)


def _recv(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("the replica closed the connection")
        got += chunk
    return got


def hello(
    port: int,
    key: bytes,
    text: str,
    size: int,
    *,
    generation: int = 1,
    cipher: str = "plain",
    host: str = "127.0.0.1",
) -> tuple[socket.socket, int | None]:
    """Connect, take B's challenge, send a HELLO (``text``: "PAIR SID MODE") under ``key``;
    (the socket, B's verdict: 0 taken, 1 needs a full copy, 2 another generation, 3
    refused; None: B closed without an answer, or its answer does not prove ``key``)."""
    s = socket.create_connection((host, port), timeout=10)
    head = _recv(s, 32)
    magic, kind, _, _, n = struct.unpack("<IIQQQ", head)
    assert (magic, kind, n) == (MAGIC, HELLO, 32), "no challenge from the replica"
    nb = _recv(s, 32)
    na = os.urandom(32)
    body = f"{text} {cipher} {na.hex()}".encode()
    h = rec(HELLO, generation, size, len(body) + 32)
    label = b"mirror-disk-hello".ljust(32, b"\0")
    mac = hmac.new(key, label + nb + h + body, hashlib.sha256).digest()
    s.sendall(h + body + mac)
    try:
        ans = _recv(s, 64)
    except (ConnectionError, OSError):
        return s, None
    _, _, verdict, _, _ = struct.unpack("<IIQQQ", ans[:32])
    label = b"mirror-disk-answer".ljust(32, b"\0")
    want = hmac.new(key, label + nb + na + struct.pack("<Q", verdict), hashlib.sha256).digest()
    return s, verdict if hmac.compare_digest(want, ans[32:]) else None
