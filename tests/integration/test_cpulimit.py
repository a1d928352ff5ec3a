"""The throttle's mechanism for hypervisor guests (mirror/guests/cpulimit.py) on this
machine's cgroups: a real busy thread is held to its quota, freed, and put back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirror.guests.cpulimit import CpuLimit, CpuLimitError


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one CPU that ``pid`` used over ``seconds``."""

    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.monotonic(), ticks()
    time.sleep(seconds)
    return (ticks() - c0) / hz / (time.monotonic() - t0)


def test_a_busy_thread_is_held_to_its_quota_and_freed() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    name = f"test-{os.getpid()}"
    try:
        try:
            limit = CpuLimit.create(name, busy.pid, [busy.pid])
        except CpuLimitError as e:
            pytest.skip(f"no cgroup here: {e}")
        try:
            assert limit.group.is_dir()
            before = Path(f"/proc/{busy.pid}/cgroup").read_text()
            limit.set_share(0.1)
            held = cpu_share(busy.pid, 2.0)
            limit.set_share(1.0)
            free = cpu_share(busy.pid, 2.0)
            assert held <= 0.2, held  # 10% of a CPU, with the scheduler's slack
            assert free > 2 * held, (free, held)  # not just a loaded machine
        finally:
            limit.close()
        assert not limit.group.exists()  # removed, the thread put back where it was
        assert Path(f"/proc/{busy.pid}/cgroup").read_text() != before
        limit.close()  # idempotent
    finally:
        os.killpg(busy.pid, signal.SIGKILL)
        busy.wait()


def test_no_threads_is_a_clear_error() -> None:
    with pytest.raises(CpuLimitError, match="no threads"):
        CpuLimit.create("none", os.getpid(), [])


def test_clean_start_removes_a_dead_runs_cgroup_only(tmp_path: Path) -> None:
    from mirror.ha.cleanup import clean_start

    root = Path("/sys/fs/cgroup")
    hier = root if (root / "cgroup.controllers").exists() else root / "cpu"
    if os.geteuid() != 0 or not (hier / "cgroup.procs").exists():
        pytest.skip("no writable cpu cgroup hierarchy here")
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    pair = f"tcl{os.getpid()}"
    left = hier / f"mirror-{pair}-n-{dead.pid}"  # a role killed whole left it
    live = hier / f"mirror-{pair}-n-{alive.pid}"  # a running role's
    other = hier / f"mirror-{pair}x-n-{dead.pid}"  # another pair's
    try:
        for g in (left, live, other):
            g.mkdir()
        removed = clean_start(pair, "n", tmp_path)
        assert removed == [str(left)] and not left.exists()
        assert live.is_dir() and other.is_dir()
    finally:
        alive.kill()
        alive.wait()
        for g in (left, live, other):
            if g.exists():
                g.rmdir()
