"""QEMU's QMP socket as mirror's client (mirror/guests/qmp.py) uses it, against a fake QMP
server on a real UNIX socket: QEMU binds its socket a moment before it listens, and a
connection refused in that moment is tried again (it failed pairings under load: "QMP
connect ... refused"); commands sent in one write are answered by id, with events between;
QEMU's errors and its last events reach the caller."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mirror.guests.base import GuestError
from mirror.guests.qemu import QemuGuest
from mirror.guests.qmp import QmpSocket, StateFd

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": ""}, "capabilities": []}}  # fmt: skip


def send(conn: socket.socket, *msgs: dict[str, object]) -> None:
    conn.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in msgs))


def requests(conn: socket.socket, n: int) -> tuple[list[dict[str, Any]], int]:
    """The next ``n`` requests (JSON lines) and how many reads brought them."""
    text, reads = b"", 0
    while text.count(b"\n") < n:
        chunk = conn.recv(4096)
        assert chunk, "the client went before its requests"
        text, reads = text + chunk, reads + 1
    return [json.loads(line) for line in text.splitlines()], reads


def fake_qmp(
    sock: socket.socket,
    listen_after: float,
    then: Callable[[socket.socket], None] | None = None,
) -> None:
    """A QMP server on a bound socket: listens only after ``listen_after`` s, answers
    the capabilities negotiation of one client, then ``then`` (or waits for the end)."""
    time.sleep(listen_after)
    sock.listen(1)
    conn, _ = sock.accept()
    with conn:
        send(conn, GREETING)
        [request], _ = requests(conn, 1)
        assert request["execute"] == "qmp_capabilities"
        send(conn, {"return": {}, "id": request["id"]})
        if then is not None:
            then(conn)
            return
        while conn.recv(4096):  # until the client goes
            pass


def guest_on(path: Path) -> QemuGuest:
    g = QemuGuest.__new__(QemuGuest)  # only what _connect_qmp reads
    g.qmp_path = path
    g.run_dir = path.parent
    g.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    g.qmp = None
    return g


def close(g: QemuGuest) -> None:
    if g.qmp is not None:
        g.qmp.close()
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
        assert isinstance(g.qmp, QmpSocket)
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


def served(
    tmp_path: Path, then: Callable[[socket.socket], None]
) -> tuple[QmpSocket, threading.Thread]:
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(1)
    server = threading.Thread(target=fake_qmp, args=(sock, 0, then), daemon=True)
    server.start()
    return QmpSocket(str(path), keep=frozenset({"SHUTDOWN"}), timeout=5), server


def test_commands_sent_together_go_in_one_write_and_are_answered_by_id(tmp_path: Path) -> None:
    seen: list[object] = []

    def qemu(conn: socket.socket) -> None:
        got, reads = requests(conn, 2)
        seen.extend([[r["execute"] for r in got], reads])
        stop, save = (r["id"] for r in got)
        # an event between the answers, the second answer after it: as QEMU does
        send(conn, {"event": "STOP", "data": {}}, {"return": {}, "id": stop})
        time.sleep(0.2)
        send(conn, {"return": {}, "id": save})
        [cont], _ = requests(conn, 1)
        send(conn, {"error": {"class": "GenericError", "desc": "no, not now"}, "id": cont["id"]})
        send(conn, {"event": "SHUTDOWN", "data": {"reason": "guest-shutdown"}})

    qmp, server = served(tmp_path, qemu)
    try:
        stop, save = qmp.send(("stop", None), ("xen-save-devices-state", {"live": False}))
        t0 = time.monotonic()
        assert qmp.wait(stop) == {}
        assert time.monotonic() - t0 < 0.15  # not held back by the save's answer
        assert qmp.wait(save) == {}
        assert seen == [["stop", "xen-save-devices-state"], 1]
        with pytest.raises(GuestError, match="QMP cont failed: no, not now"):
            qmp.execute("cont")
        server.join(5)
        qmp.drain()  # QEMU has gone: its last words are read
        assert [e["event"] for e in qmp.events] == ["SHUTDOWN"]  # STOP was dropped
    finally:
        qmp.close()


def test_no_answer_in_time_and_a_closed_socket_are_errors(tmp_path: Path) -> None:
    def qemu(conn: socket.socket) -> None:
        requests(conn, 1)  # never answered; then QEMU goes

    qmp, server = served(tmp_path, qemu)
    try:
        with pytest.raises(GuestError, match=r"QMP query-status failed: .*qmp.sock"):
            qmp.wait(qmp.send(("query-status", None))[0], timeout=0.3)
        server.join(5)
        with pytest.raises(GuestError, match=r"QMP cont failed: .*qmp.sock"):
            qmp.execute("cont")
    finally:
        qmp.close()


def test_state_fd_is_passed_once_and_read_back_to_where_the_writer_stopped(
    tmp_path: Path,
) -> None:
    """What QEMU does with /dev/fdset/N: writes from offset 0 of the fd it was given."""
    given: list[int] = []

    def add_fd(name: str, args: dict[str, Any], fd: int) -> dict[str, int]:
        assert name == "add-fd"
        given.append(os.dup(fd))
        return {"fdset-id": 7}

    state = StateFd(add_fd, "t")
    try:
        for data in (b"x" * 5000, b"short"):  # a shorter save after a longer one
            name, args = state.command()
            assert (name, args["filename"]) == ("xen-save-devices-state", "/dev/fdset/7")
            os.write(given[0], data)
            assert state.read() == data
    finally:
        state.close()
        os.close(given[0])
