"""QMP to a QEMU that libvirt runs: through libvirt (``qemuMonitorCommand``, untainted) or
through a monitor socket of mirror's own that the domain's XML adds (``<qemu:commandline>``
``-qmp unix:PATH``); ``[libvirt] qmp`` picks (bench/libvirt_pause.py measures both).
The libvirt guest (mirror/guests/libvirt.py) drives its domain with one of them.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from abc import ABC, abstractmethod
from typing import Any

from mirror.guests.base import GuestError


class Monitor(ABC):
    """QMP commands to one QEMU; ``submit`` starts one and returns its future."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qmp")

    @abstractmethod
    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        """One command (``fd``: passed with it, for getfd/add-fd); GuestError if it fails."""

    def submit(
        self, name: str, args: dict[str, Any] | None = None
    ) -> concurrent.futures.Future[Any]:
        return self._pool.submit(self.execute, name, args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LibvirtMonitor(Monitor):
    """QMP through libvirt; ``call`` runs a function of the domain, reconnecting once
    to a libvirtd that restarted (LibvirtGuest.call)."""

    def __init__(self, call: Any) -> None:
        super().__init__()
        self.call = call

    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        import libvirt_qemu

        cmd = json.dumps({"execute": name, **({"arguments": args} if args else {})})
        if fd >= 0:
            text, _ = self.call(
                f"QMP {name} through libvirt",
                lambda dom: libvirt_qemu.qemuMonitorCommandWithFiles(dom, cmd, [fd], 0),
            )
        else:
            text = self.call(
                f"QMP {name} through libvirt",
                lambda dom: libvirt_qemu.qemuMonitorCommand(dom, cmd, 0),
            )
        answer = json.loads(text)
        if "error" in answer:
            raise GuestError(f"QMP {name} failed: {answer['error'].get('desc')}")
        return answer.get("return")


class SocketMonitor(Monitor):
    """A QMP socket of mirror's own (plain JSON lines; no libvirt in the path)."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__()
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        self._lock = threading.Lock()
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self._line()  # the greeting
            self.execute("qmp_capabilities")
        except OSError as e:
            self.sock.close()
            raise GuestError(
                f"cannot use the QMP socket {path}: {e}; the domain's XML must have "
                f"<qemu:commandline> -qmp unix:{path},server=on,wait=off, or set "
                f'[libvirt] qmp = "libvirt"'
            ) from None

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        import socket

        msg = json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode()
        with self._lock:
            try:
                if fd >= 0:
                    self.sock.sendmsg(
                        [msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
                    )
                else:
                    self.sock.sendall(msg)
                while True:
                    answer = self._line()
                    if "return" in answer or "error" in answer:
                        break  # (events are skipped: libvirt has its own monitor for them)
            except OSError as e:
                raise GuestError(f"QMP {name} on {self.path} failed: {e}") from None
        if "error" in answer:
            raise GuestError(f"QMP {name} failed: {answer['error'].get('desc')}")
        return answer["return"]

    def close(self) -> None:
        super().close()
        self.sock.close()
