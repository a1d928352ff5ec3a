"""QMP to a QEMU that libvirt runs: through libvirt (``qemuMonitorCommand``, untainted) or
through a monitor socket of mirror's own that the domain's XML adds (``<qemu:commandline>``
``-qmp unix:PATH``); ``[libvirt] qmp`` picks (bench/libvirt_pause.py measures both).
The libvirt guest (mirror/guests/libvirt.py) drives its domain with one of them.
"""

from __future__ import annotations

import concurrent.futures
import json
from abc import ABC, abstractmethod
from typing import Any

from mirror.guests.base import GuestError
from mirror.guests.qmp import QmpSocket


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
    """A QMP socket of mirror's own (mirror/guests/qmp.py; no libvirt in the path)."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__()
        self.path = path
        try:
            self.qmp = QmpSocket(path, timeout=timeout)
        except OSError as e:
            raise GuestError(
                f"cannot use the QMP socket {path}: {e}; the domain's XML must have "
                f"<qemu:commandline> -qmp unix:{path},server=on,wait=off, or set "
                f'[libvirt] qmp = "libvirt"'
            ) from None

    def execute(self, name: str, args: dict[str, Any] | None = None, fd: int = -1) -> Any:
        return self.qmp.execute(name, args, fd)

    def close(self) -> None:
        super().close()
        self.qmp.close()
