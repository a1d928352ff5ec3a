"""Length-prefixed msgpack messages over a stream socket (local control channels).

Used between a role and the guest processes it runs; the interconnect
between hosts uses zmq frames instead (see wire.py and link.py).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

_LEN = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024 * 1024


class ChannelClosed(EOFError):
    """The other end closed the channel."""


def send_msg(sock: socket.socket, obj: Any) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ChannelClosed("channel closed")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_MESSAGE:
        raise ValueError(f"control message of {n} bytes exceeds the limit of {MAX_MESSAGE}")
    return msgpack.unpackb(_recv_exact(sock, n), raw=False)
