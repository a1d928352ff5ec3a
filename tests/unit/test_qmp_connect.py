"""QEMU binds its QMP socket a moment before it listens: a connection refused in that
moment is tried again (it failed pairings under load: "QMP connect ... refused")."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirror.guests.base import GuestError
from mirror.guests.qemu import QemuGuest

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": ""}, "capabilities": []}}  # fmt: skip


def fake_qmp(sock: socket.socket, listen_after: float) -> None:
    """A QMP server on a bound socket: listens only after ``listen_after`` s, then
    answers the capabilities negotiation of one client."""
    time.sleep(listen_after)
    sock.listen(1)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
        text = b""
        while True:  # one JSON object (qemu.qmp ends it with no newline)
            chunk = conn.recv(4096)
            assert chunk, "the client went before its request"
            text += chunk
            try:
                request = json.loads(text)
                break
            except ValueError:
                continue
        assert request["execute"] == "qmp_capabilities"
        reply: dict[str, object] = {"return": {}}
        if "id" in request:
            reply["id"] = request["id"]
        conn.sendall(json.dumps(reply).encode() + b"\r\n")
        while conn.recv(4096):  # until the client goes
            pass


def guest_on(path: Path) -> QemuGuest:
    g = QemuGuest.__new__(QemuGuest)  # only what _connect_qmp reads
    g.qmp_path = path
    g.run_dir = path.parent
    g.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    g._loop = None
    return g


def close(g: QemuGuest) -> None:
    if getattr(g, "qmp", None) is not None and g._loop is not None:
        g._await(g.qmp.disconnect(), 5)
        g._loop.call_soon_threadsafe(g._loop.stop)
    g.proc.kill()
    g.proc.wait()


def test_a_socket_bound_before_it_listens_is_connected_once_it_listens(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # the file exists; connecting now is refused
    server = threading.Thread(target=fake_qmp, args=(sock, 0.3), daemon=True)
    server.start()
    g = guest_on(path)
    try:
        g._connect_qmp(timeout=10)
        assert g.qmp.runstate is not None
    finally:
        close(g)
        sock.close()


def test_a_socket_that_never_listens_is_still_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    g = guest_on(path)
    try:
        with pytest.raises(GuestError, match=r"QMP connect to .* failed"):
            g._connect_qmp(timeout=0.5)
    finally:
        close(g)
        sock.close()
