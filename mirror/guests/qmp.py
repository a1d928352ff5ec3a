"""QMP on a plain UNIX socket: JSON lines written and read here, no event loop between.

A checkpoint's pause is three commands to QEMU (``stop``, ``xen-save-devices-state``,
``cont``); each answer waited for through an asyncio client on a thread of its own cost
about 0.5 ms more than on the socket itself (docs/benchmarks.md, "QEMU, the log").
Commands carry an ``id``: several go out in one write (:meth:`QmpSocket.send`) and each
answer is taken when it is wanted (:meth:`QmpSocket.wait`), so ``stop`` and the
device-state save leave in one round trip and the save runs in QEMU while mirror scans.
QEMU answers one monitor's commands in order; events come between the answers and are
dropped, but for the names in ``keep`` (the QEMU guest keeps SHUTDOWN).

The device state goes into a memfd passed to QEMU once (``add-fd``, :class:`StateFd`):
no file to create, write and read back through a file system at every checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mirror.guests.base import GuestError


class QmpSocket:
    """One QMP connection on ``path``.  Thread-safe: one lock orders writes and reads."""

    def __init__(self, path: str, *, keep: frozenset[str] = frozenset(), timeout: float = 30):
        self.path = path
        self.keep = keep
        self.events: list[dict[str, Any]] = []  # the kept events, in order
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._lock = threading.RLock()
        self._next = 0
        self._names: dict[int, str] = {}  # id -> command, for the ones not answered yet
        self._answers: dict[int, dict[str, Any]] = {}  # answers read before they were wanted
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self._read()  # the greeting
        except BaseException:
            self.sock.close()
            raise
        self.execute("qmp_capabilities")

    def send(self, *commands: tuple[str, dict[str, Any] | None], fd: int = -1) -> list[int]:
        """Write ``commands`` ((name, arguments) each) in one write; their ids for
        :meth:`wait`.  ``fd`` goes with them (SCM_RIGHTS: ``getfd``, ``add-fd``)."""
        data, ids = b"", []
        with self._lock:
            for name, args in commands:
                self._next += 1
                self._names[self._next] = name
                ids.append(self._next)
                msg = {"execute": name, "id": self._next, **({"arguments": args} if args else {})}
                data += json.dumps(msg).encode() + b"\n"
            try:
                if fd >= 0:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
                    sent = self.sock.sendmsg([data], rights)
                    self.sock.sendall(data[sent:])
                else:
                    self.sock.sendall(data)
            except OSError as e:
                raise GuestError(f"QMP {commands[0][0]} failed: {e} ({self.path})") from None
        return ids

    def wait(self, ident: int, timeout: float = 60) -> Any:
        """The answer to command ``ident``: its return value, GuestError (with QEMU's
        words) if it failed or no answer came within ``timeout`` s."""
        with self._lock:
            name = self._names.get(ident, "?")
            deadline = time.monotonic() + timeout
            try:
                while ident not in self._answers:
                    self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    self._take(self._read())
            except (OSError, ValueError) as e:
                raise GuestError(f"QMP {name} failed: {e} ({self.path})") from None
            answer = self._answers.pop(ident)
            del self._names[ident]
        if "error" in answer:
            raise GuestError(f"QMP {name} failed: {answer['error'].get('desc')}")
        return answer.get("return")

    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        """One command, waited for."""
        return self.wait(self.send((name, args), fd=fd)[0])

    def drain(self) -> None:
        """Read what QEMU has written and nobody asked for yet (the kept events of a QEMU
        that has exited are still in the socket)."""
        with self._lock:
            self.sock.setblocking(False)
            try:
                while True:
                    self._take(self._read())
            except (OSError, ValueError):
                pass  # nothing more now, or the end
            finally:
                self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()

    def _take(self, msg: dict[str, Any]) -> None:
        if "event" in msg:
            if msg["event"] in self.keep:
                self.events.append(msg)
        elif isinstance(msg.get("id"), int):
            self._answers[msg["id"]] = msg

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]


class StateFd:
    """A memfd that QEMU saves the device state into (``/dev/fdset/N``, given to QEMU
    once with ``add-fd``).  QEMU's copy shares the offset of the description passed:
    :meth:`command` sets it to 0, :meth:`read` reads up to where QEMU's writes ended."""

    def __init__(self, execute: Callable[..., Any], name: str) -> None:
        self.fd = os.memfd_create(f"mirror-devstate-{name}")
        self.wfd = -1
        try:
            self.wfd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY)
            self.fdset = execute("add-fd", {}, fd=self.wfd)["fdset-id"]
        except BaseException:
            self.close()
            raise

    def command(self) -> tuple[str, dict[str, Any]]:
        """The save command, its file rewound: send it while the guest is stopped."""
        os.lseek(self.wfd, 0, os.SEEK_SET)
        return "xen-save-devices-state", {"filename": f"/dev/fdset/{self.fdset}", "live": False}

    def read(self) -> bytes:
        """The state the last save wrote (after its answer)."""
        return os.pread(self.fd, os.lseek(self.wfd, 0, os.SEEK_CUR), 0)

    def close(self) -> None:
        for fd in (self.fd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.wfd = -1
