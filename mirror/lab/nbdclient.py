"""A small synchronous NBD client (fixed newstyle, NBD_OPT_GO, simple replies): the disk
tests and benches talk to the disk server over its real unix socket with it, as QEMU does.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_ZEROES = 0, 1, 2, 3, 4, 6
FLAG_FUA = 1


class NbdError(OSError):
    pass


class NbdClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._handle = 0
        magic, opt, _flags = struct.unpack(">QQH", self._read(18))
        if magic != 0x4E42444D41474943 or opt != 0x49484156454F5054:
            raise NbdError(0, "not an NBD server")
        self.sock.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
        name = b""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        self.size = 0
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", self._read(20))
            body = self._read(rlen)
            if rtype == 3 and struct.unpack(">H", body[:2])[0] == 0:
                self.size = struct.unpack(">Q", body[2:10])[0]
            elif rtype == 1:
                break
            else:
                raise NbdError(0, f"NBD_OPT_GO refused: reply {rtype:#x}")

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError(0, "the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _cmd(self, kind: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> bytes:
        self._handle += 1
        head = struct.pack(">IHHQQI", 0x25609513, flags, kind, self._handle, offset, length)
        self.sock.sendall(head + data)
        magic, err, handle = struct.unpack(">IIQ", self._read(16))
        if magic != 0x67446698 or handle != self._handle:
            raise NbdError(0, "bad reply")
        if err:
            raise NbdError(err, f"NBD command {kind} failed with error {err}")
        return self._read(length) if kind == CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._cmd(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._cmd(CMD_WRITE, offset, len(data), data, FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self._cmd(CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        self._cmd(CMD_TRIM, offset, length)

    def zeroes(self, offset: int, length: int) -> None:
        self._cmd(CMD_ZEROES, offset, length)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_DISC, 0, 0, 0))
        self.sock.close()
