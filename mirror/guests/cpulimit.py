"""A CPU quota on some threads of a process (a QEMU's vCPU threads): the throttle's
mechanism for hypervisor guests (checkpoint.max_pause_ms, mirror/replication/throttle.py).

mirror makes a cgroup of its own for the threads and sets its quota:

- cgroup v2 (``/sys/fs/cgroup`` is cgroup2 with the ``cpu`` controller): threads can only
  be placed apart in a threaded subtree, so the process goes into ``mirror-NAME`` (a
  domain made threaded) and its vCPU threads into ``mirror-NAME/vcpus`` (threaded), whose
  ``cpu.max`` is the quota;
- cgroup v1 (a ``cpu`` hierarchy at ``/sys/fs/cgroup/cpu``, as on hybrid hosts): any
  thread can be placed alone, by its id in ``tasks``: ``mirror-NAME`` there, and its
  ``cpu.cfs_quota_us``.

The quota is the threads' share times their number times the period: each vCPU may run
``share`` of the time.  :meth:`CpuLimit.close` puts the threads back where they were and
removes the cgroup.  Anything that stops it (not root, no cpu controller, a read-only
cgroupfs in a container) is a :class:`CpuLimitError` with the reason in one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel's floor for a quota


class CpuLimitError(RuntimeError):
    """The cgroup could not be made or the threads not placed in it."""


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise CpuLimitError(f"cannot write {text.strip()!r} to {path}: {e.strerror}") from e


def _v1_cpu_cgroup(tid: int) -> str:
    """The thread's cgroup in the v1 cpu hierarchy ("/" if none is named)."""
    try:
        lines = Path(f"/proc/{tid}/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return "/"


class CpuLimit:
    """A cgroup of mirror's holding some threads of one process, with a CPU quota."""

    def __init__(
        self,
        version: int,
        group: Path,
        quota_file: Path,
        tids: list[int],
        restore: dict[int, Path],
        process_home: Path | None,
        pid: int,
    ) -> None:
        self.version, self.group, self.quota_file = version, group, quota_file
        self.tids, self._restore, self._home, self._pid = tids, restore, process_home, pid
        self.share = 1.0

    @classmethod
    def create(
        cls, name: str, pid: int, tids: list[int], root: Path = Path("/sys/fs/cgroup")
    ) -> CpuLimit:
        """Place ``tids`` (threads of process ``pid``) in a new cgroup ``mirror-NAME``."""
        if not tids:
            raise CpuLimitError("no threads to limit (QEMU listed no vCPU threads)")
        if os.geteuid() != 0:
            raise CpuLimitError("making a cgroup needs root (mirror runs as uid "
                                f"{os.geteuid()})")  # fmt: skip
        v2 = root / "cgroup.controllers"
        if v2.exists():
            if "cpu" not in v2.read_text().split():
                raise CpuLimitError(f"the cgroup v2 hierarchy at {root} has no cpu controller")
            return cls._create_v2(root, name, pid, tids)
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            return cls._create_v1(v1, name, pid, tids)
        raise CpuLimitError(
            f"no cpu controller under {root} (neither cgroup v2 with cpu nor a v1 cpu "
            f"hierarchy at {v1})"
        )

    @classmethod
    def _create_v1(cls, hier: Path, name: str, pid: int, tids: list[int]) -> CpuLimit:
        group = hier / f"mirror-{name}"
        try:
            group.mkdir(exist_ok=True)
        except OSError as e:
            raise CpuLimitError(f"cannot make the cgroup {group}: {e.strerror}") from e
        restore = {t: hier / _v1_cpu_cgroup(t).lstrip("/") for t in tids}
        limit = cls(1, group, group / "cpu.cfs_quota_us", tids, restore, None, pid)
        try:
            _write(group / "cpu.cfs_period_us", str(PERIOD_US))
            for t in tids:
                _write(group / "tasks", str(t))
        except CpuLimitError:
            limit.close()
            raise
        return limit

    @classmethod
    def _create_v2(cls, root: Path, name: str, pid: int, tids: list[int]) -> CpuLimit:
        group = root / f"mirror-{name}"
        # the process's cgroup v2 line is "0::/PATH"
        line = Path(f"/proc/{pid}/cgroup").read_text().split("::", 1)[1].strip()
        home = root / line.lstrip("/")
        try:
            group.mkdir(exist_ok=True)
            (group / "vcpus").mkdir(exist_ok=True)
        except OSError as e:
            raise CpuLimitError(f"cannot make the cgroup {group}: {e.strerror}") from e
        limit = cls(2, group, group / "vcpus" / "cpu.max", tids, {}, home, pid)
        try:
            _write(group / "cgroup.procs", str(pid))
            _write(group / "vcpus" / "cgroup.type", "threaded")
            _write(group / "cgroup.subtree_control", "+cpu")
            for t in tids:
                _write(group / "vcpus" / "cgroup.threads", str(t))
        except CpuLimitError:
            limit.close()
            raise
        return limit

    def set_share(self, share: float) -> None:
        """Each thread may run ``share`` (0 < share <= 1) of the time; 1: no quota."""
        share = min(1.0, max(0.0, share))
        if share >= 1.0:
            text = "max" if self.version == 2 else "-1"
        else:
            quota = max(MIN_QUOTA_US, int(share * PERIOD_US * len(self.tids)))
            text = f"{quota} {PERIOD_US}" if self.version == 2 else str(quota)
        _write(self.quota_file, text)
        self.share = share

    def close(self) -> None:
        """Threads back where they were, the cgroup removed (idempotent; a thread or
        process gone meanwhile is skipped)."""
        if self.version == 1:
            for t, home in self._restore.items():
                with contextlib.suppress(OSError):
                    (home / "tasks").write_text(str(t))
        else:
            for t in self.tids:  # back into the threaded root, then the process home
                with contextlib.suppress(OSError):
                    (self.group / "cgroup.threads").write_text(str(t))
            if self._home is not None:
                with contextlib.suppress(OSError):
                    (self._home / "cgroup.procs").write_text(str(self._pid))
            with contextlib.suppress(OSError):
                (self.group / "vcpus").rmdir()
        with contextlib.suppress(OSError):
            self.group.rmdir()


def stale_groups(prefix: str, root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """mirror's cgroups ``PREFIX-PID`` (v2 at ``root``, v1 under ``root/cpu``) whose PID
    (the role that made them) is no longer running: left by a role killed whole."""
    found = []
    for hier in (root, root / "cpu"):
        for group in hier.glob(f"{prefix}*"):
            pid = group.name[len(prefix) :]
            if not (group.is_dir() and pid.isdigit()) or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                found.append(group)
            except PermissionError:
                pass
    return found


def remove_stale(prefix: str, root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Remove :func:`stale_groups` (a group that still holds a thread stays: rmdir
    refuses it); returns what was removed."""
    removed = []
    for group in stale_groups(prefix, root):
        with contextlib.suppress(OSError):
            (group / "vcpus").rmdir()
        try:
            group.rmdir()
            removed.append(str(group))
        except OSError:
            continue
    return removed
