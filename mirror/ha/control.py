"""How an operator's command reaches a daemon of this host (a role run by hand, or the
host agent: whichever owns the state directory), and only it.

- ``STATE_DIR/agent.lock``: the daemon holds an exclusive ``flock`` on it for its
  whole life, so two daemons cannot share a state directory (the second one is
  told which pid holds it, and exits 2).  The lock dies with its process: a
  killed daemon never leaves a stale lock.
- ``STATE_DIR/control.sock``: a unix socket the daemon serves, made by the daemon
  after it took the lock (a socket file left by a dead daemon is replaced), mode
  0600.  ``mirror failover``, ``mirror switchover`` send it one JSON request
  line (``{"op": "status" | "failover" | "switchover" | "detach"}``; the host
  daemon's socket takes ``list``, ``status``, ``pair``, ``progress``, ``unpair``
  with their fields beside ``op``) and read one JSON answer line.  Both ends
  check the other's credentials (SO_PEERCRED): the daemon answers only root or
  its own user, and the command talks only to a socket served by root or its
  own user.  Nothing is ever signalled by a pid
  read from a file: a stale status file cannot make a command touch whatever
  process now has that pid.

The socket is bound and reached through ``/proc/self/fd/N/control.sock`` (N: the
state directory's descriptor), so a long state directory path does not meet the
108-byte limit of unix socket addresses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirror.hoststate import private_dir

log = logging.getLogger("mirror.ha.control")

# the name of earlier versions, kept: an old and a new daemon exclude each other
LOCK = "agent.lock"
SOCKET = "control.sock"
MAX_REQUEST = 4096
MAX_ANSWER = 1 << 20


class ControlError(RuntimeError):
    """The daemon cannot be reached (or cannot start its control); the message says why."""


def _peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


class StateDirLock:
    """The exclusive lock on a state directory, held by this process until it exits."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        try:
            private_dir(state_dir)
            self.fd = os.open(
                state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise ControlError(
                f"cannot lock the state directory {state_dir}: {e.strerror}"
                + (" (the lock file is a symlink)" if e.errno == errno.ELOOP else "")
            ) from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise ControlError(
                f"another mirror daemon (pid {holder or '?'}) uses the state directory "
                f"{state_dir}: two daemons cannot share one; stop it, or give this host's "
                f"daemon its own node.state_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)  # for the message above only

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


Handler = Callable[[], dict[str, Any]]
# a handler that reads the request's other fields (the host agent's: pair, domain, ...)
RequestHandler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer(threading.Thread):
    """Serves ``STATE_DIR/control.sock`` (start it once the state directory is locked).
    The running role sets :attr:`handlers` (op -> what to do; returns the answer)."""

    def __init__(self, state_dir: Path, max_request: int = MAX_REQUEST) -> None:
        super().__init__(name="control", daemon=True)
        self.dir = state_dir
        self.handlers: dict[str, Handler] = {}
        self.request_handlers: dict[str, RequestHandler] = {}
        self.max_request = max_request
        self._dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET, dir_fd=self._dfd)  # a dead daemon's: we hold the lock
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window before a chmod
        try:
            self.sock.bind(f"/proc/self/fd/{self._dfd}/{SOCKET}")
        except OSError as e:
            self.sock.close()
            os.close(self._dfd)
            raise ControlError(
                f"cannot make the control socket {state_dir / SOCKET}: {e.strerror}"
            ) from e
        finally:
            os.umask(old)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.timeout = 2.0  # seconds a client has to send its request and take the answer
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._halt.is_set():
                    return
                raise
            with conn:
                try:
                    self._serve(conn)
                except Exception as e:  # one bad request never ends the control
                    log.warning("control request failed: %s", e)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        pid, uid = _peer_uid(conn)
        if not _trusted(uid):
            log.warning("control: refused pid %d of uid %d (not root or uid %d)", pid, uid,
                        os.geteuid())
            return
        data = b""
        while b"\n" not in data and len(data) <= self.max_request:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        req: Any = None
        try:
            req = json.loads(data.split(b"\n", 1)[0].decode())
            op = req["op"] if isinstance(req, dict) else None
        except (ValueError, KeyError):
            op = None
        handler = self.handlers.get(op) if isinstance(op, str) else None
        rhandler = self.request_handlers.get(op) if isinstance(op, str) else None
        if handler is None and rhandler is None:
            takes = sorted({*self.handlers, *self.request_handlers})
            answer: dict[str, Any] = {
                "ok": False,
                "error": f"this daemon does not take {op!r} now (it takes: "
                f"{', '.join(takes) or 'nothing yet'})",
            }
        else:
            log.info("control: %s asked by pid %d", op, pid)
            assert isinstance(req, dict)
            result = rhandler(req) if rhandler is not None else handler()  # type: ignore[misc]
            answer = {"ok": True, "pid": os.getpid(), **result}
        conn.sendall(json.dumps(answer, default=str).encode() + b"\n")

    def close(self) -> None:
        self._halt.set()
        self.join(2)
        with contextlib.suppress(OSError):
            os.unlink(SOCKET, dir_fd=self._dfd)
        self.sock.close()
        os.close(self._dfd)


def ask(
    state_dir: Path,
    op: str,
    timeout: float = 5.0,
    args: dict[str, Any] | None = None,
    *,
    refused_ok: bool = False,
    start_with: str = "`mirror primary` or `mirror secondary`",
) -> dict[str, Any]:
    """Send ``op`` (with ``args``, the request's other fields) to the daemon of
    ``state_dir``; its answer.  ControlError (saying why) if no daemon serves there, or
    the socket is not one a daemon of ours serves; also when the daemon refuses, unless
    ``refused_ok`` (then the answer, ``ok`` false and ``error``, is returned)."""
    path = state_dir / SOCKET
    try:
        dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ControlError(
            f"no daemon runs in {state_dir}: {e.strerror} (start it with {start_with})"
        ) from e
    try:
        try:
            st = os.stat(SOCKET, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise ControlError(
                f"no daemon runs in {state_dir} (no control socket {path}): start it with "
                f"{start_with}"
            ) from None
        if not stat.S_ISSOCK(st.st_mode) or not _trusted(st.st_uid):
            raise ControlError(
                f"{path} is not a daemon's control socket (a {stat.filemode(st.st_mode)} "
                f"owned by uid {st.st_uid}): refusing to use it"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(timeout)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{SOCKET}")
            except ConnectionRefusedError:
                raise ControlError(
                    f"no daemon runs in {state_dir}: its control socket {path} is left from a "
                    f"daemon that is gone"
                ) from None
            except OSError as e:
                raise ControlError(f"cannot reach the daemon at {path}: {e.strerror}") from e
            pid, uid = _peer_uid(sock)
            if not _trusted(uid):
                raise ControlError(
                    f"the process serving {path} (pid {pid}) runs as uid {uid}, not as root "
                    f"or as you: refusing to talk to it"
                )
            try:
                sock.sendall(json.dumps({**(args or {}), "op": op}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n") and len(data) <= MAX_ANSWER:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as e:
                raise ControlError(f"the daemon at {path} did not answer: {e}") from e
    finally:
        os.close(dfd)
    try:
        answer = json.loads(data.decode())
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon at {path} gave no valid answer to {op!r}")
    if not answer.get("ok") and not refused_ok:
        raise ControlError(f"the daemon at {path} refused {op!r}: {answer.get('error')}")
    return answer


# The one daemon of this process (a process runs one daemon; its roles follow each other).
_server: ControlServer | None = None


def start(state_dir: Path) -> tuple[StateDirLock, ControlServer]:
    """Lock ``state_dir`` and serve its control socket, for this process's daemon."""
    global _server
    lock = StateDirLock(state_dir)
    try:
        _server = ControlServer(state_dir)
    except BaseException:
        lock.close()
        raise
    _server.start()
    return lock, _server


def serve(handlers: dict[str, Handler]) -> None:
    """What the running role answers from now on (nothing happens if no control runs,
    as when a role is run from a library rather than by `mirror`)."""
    if _server is not None:
        _server.handlers = dict(handlers)
