"""Clean start: what a dead earlier run of this pair and node left behind, removed.

A host killed whole cannot clean up (docs/operating.md, "What a dead host leaves
behind").  When an agent starts, it removes what an earlier run of its own pair and
node left, once it is sure that run is gone:

- guest RAM files ``/dev/shm/mirror-PAIR-NODE-PID.ram`` whose PID is not running and
  which no process has open or mapped;
- the standby image ``/dev/shm/mirror-PAIR-NODE-standby.img`` when no process has it
  open or mapped (a live standby or a promoted guest maps it; a new standby would
  refuse to start while it exists);
- QEMU's sockets in ``STATE_DIR/qemu/`` (``qmp.sock``, ``net.sock``) when the agent
  that last reported in STATE_DIR is not running (pid and start time, hoststate.running).

Files of other pairs or nodes are never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from mirror.hoststate import read_json, running

SHM = Path("/dev/shm")


def _in_use(paths: set[str]) -> set[str]:
    """Which of ``paths`` some process has open (/proc/PID/fd) or mapped (/proc/PID/maps)."""
    used: set[str] = set()
    if not paths:
        return used
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target in paths:
                    used.add(target)
            with open(proc / "maps") as maps:
                for line in maps:
                    name = line.rstrip("\n").split(maxsplit=5)[5:]
                    if name and name[0] in paths:
                        used.add(name[0])
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return used


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(pair: str, node: str, state_dir: Path, shm: Path = SHM) -> list[Path]:
    """What a dead earlier run of ``pair`` on ``node`` left, that is safe to remove now."""
    prefix = f"mirror-{pair}-{node}-"
    candidates: list[Path] = []
    for p in shm.glob(f"{prefix}*"):
        rest = p.name[len(prefix) :]
        if rest == "standby.img":
            candidates.append(p)
        elif rest.endswith(".ram") and rest[:-4].isdigit():
            pid = int(rest[:-4])
            if pid != os.getpid() and not _pid_alive(pid):
                candidates.append(p)
    used = _in_use({str(p) for p in candidates})
    found = [p for p in candidates if str(p) not in used]
    qemu_dir = state_dir / "qemu"
    socks = [qemu_dir / n for n in ("qmp.sock", "net.sock") if (qemu_dir / n).exists()]
    if socks:
        try:
            last = read_json(state_dir / "status.json")
        except (OSError, ValueError):
            last = None
        if not isinstance(last, dict) or not running(last):
            found += socks
    return sorted(found)


def clean_start(pair: str, node: str, state_dir: Path, shm: Path = SHM) -> list[str]:
    """Remove :func:`leftovers`; returns what was removed (for the agent's log)."""
    removed = []
    for p in leftovers(pair, node, state_dir, shm):
        try:
            p.unlink()
            removed.append(str(p))
        except FileNotFoundError:
            pass
    return removed
