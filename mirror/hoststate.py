"""Small files in a host's state directory: status snapshots written atomically.

What a pair keeps on a host is its owner's only: directories 0700 (an existing looser
one is tightened, with a note in the log), files 0600 (:func:`private_dir`,
:func:`write_atomic`, :func:`open_private`; child processes get umask 077)."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("mirror.hoststate")

PRIVATE_UMASK = 0o077  # for the child processes that write in a state dir (QEMU, disk)


def private_dir(path: Path) -> Path:
    """``path`` made (with its parents) or, if it exists, its mode made 0700: an
    existing directory that others could read or enter is tightened, with a note."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
        log.warning(
            "%s was mode %04o: made it 0700 (what a pair keeps there is this host's only)",
            path, stat.S_IMODE(st.st_mode),
        )  # fmt: skip
    return path


def open_private(path: Path, mode: str = "ab") -> IO[bytes]:
    """Open ``path`` for writing (``ab`` or ``wb``), created 0600 and not through a
    symlink; an existing file is made 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, mode)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> str | None:
    """Who process ``pid`` is, robust against pid reuse: this boot's id and the
    process's start time (clock ticks since boot, /proc/PID/stat field 22); None if no
    such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has finished running
        return None
    return f"{_boot_id()}:{fields[19]}"


_own: dict[int, str | None] = {}


def process_record() -> dict[str, Any]:
    """What a daemon's status says about the process that wrote it (for :func:`running`)
    and when (wall clock, for the age of a dead process's last report)."""
    pid = os.getpid()
    if pid not in _own:
        _own[pid] = process_identity(pid)
    return {"pid": pid, "process": _own[pid], "reported_at": round(time.time(), 3)}


def running(status: dict[str, Any]) -> bool:
    """Whether the process that wrote ``status`` still runs: its pid is alive and is the
    same process (same boot, same start time), not a later one given the same pid."""
    pid, ident = status.get("pid"), status.get("process")
    if type(pid) is not int or pid <= 0 or not isinstance(ident, str):
        return False
    return process_identity(pid) == ident
