"""Small files in a host's state directory: status snapshots written atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
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


def agent_record() -> dict[str, Any]:
    """What an agent's status says about the process that wrote it (for :func:`running`)
    and when (wall clock, for the age of a dead agent's last report)."""
    pid = os.getpid()
    if pid not in _own:
        _own[pid] = process_identity(pid)
    return {"pid": pid, "process": _own[pid], "reported_at": round(time.time(), 3)}


def running(status: dict[str, Any]) -> bool:
    """Whether the agent that wrote ``status`` still runs: its pid is alive and is the
    same process (same boot, same start time), not a later one given the same pid."""
    pid, ident = status.get("pid"), status.get("process")
    if type(pid) is not int or pid <= 0 or not isinstance(ident, str):
        return False
    return process_identity(pid) == ident
