"""Clean start removes only what a dead run of this pair and node left (real processes
hold the files that must stay); an agent's identity survives pid reuse."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from mirror.config import Config, NodeConfig, PairConfig
from mirror.ha.cleanup import clean_start, leftovers
from mirror.hoststate import process_identity, process_record, running


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def holder(path: Path) -> subprocess.Popen[bytes]:
    """A process that maps ``path`` (as a live standby or guest does) and waits."""
    code = (
        "import mmap,sys,time\n"
        f"f=open({str(path)!r},'r+b'); m=mmap.mmap(f.fileno(),4096); f.close()\n"
        "print('ok',flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ok\n"
    return p


def test_clean_start_removes_only_a_dead_runs_files(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    state = tmp_path / "state"
    (state / "qemu").mkdir(parents=True)
    cfg = replace(
        Config(), pair=PairConfig(name="p"), node=NodeConfig(name="n", state_dir=str(state))
    )

    def make(name: str) -> Path:
        f = shm / name
        f.write_bytes(b"\0" * 4096)
        return f

    dead = dead_pid()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        gone = [make(f"mirror-p-n-{dead}.ram"), make("mirror-p-n-standby.img")]
        stays = [
            make(f"mirror-p-n-{sleeper.pid}.ram"),  # its run is alive
            make(f"mirror-p-other-{dead}.ram"),  # another node's
            make(f"mirror-q-n-{dead}.ram"),  # another pair's
        ]
        (state / "qemu" / "qmp.sock").write_text("")  # no live agent reported in state
        assert leftovers(cfg.pair.name, cfg.node.name, cfg.state_dir, shm) == sorted(
            [*gone, state / "qemu" / "qmp.sock"]
        )
        mapped = make(f"mirror-p-n-{dead_pid()}.ram")  # pid dead, but a process maps it
        h = holder(mapped)
        try:
            removed = clean_start(cfg.pair.name, cfg.node.name, cfg.state_dir, shm)
            assert sorted(removed) == sorted(str(p) for p in [*gone, state / "qemu" / "qmp.sock"])
            assert all(p.exists() for p in [*stays, mapped])
            assert not any(p.exists() for p in gone)
        finally:
            h.kill()
            h.wait()
        # its holder is gone now
        assert clean_start(cfg.pair.name, cfg.node.name, cfg.state_dir, shm) == [str(mapped)]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_live_agent_keeps_its_sockets_and_image(tmp_path: Path) -> None:
    from mirror.hoststate import write_json

    shm = tmp_path / "shm"
    shm.mkdir()
    state = tmp_path / "state"
    (state / "qemu").mkdir(parents=True)
    cfg = replace(Config(), node=NodeConfig(name="n", state_dir=str(state)))
    write_json(state / "status.json", process_record())  # this process: a live agent
    (state / "qemu" / "net.sock").write_text("")
    img = shm / f"mirror-{cfg.pair.name}-n-standby.img"
    img.write_bytes(b"\0" * 4096)
    h = holder(img)
    try:
        assert leftovers(cfg.pair.name, cfg.node.name, cfg.state_dir, shm) == []
    finally:
        h.kill()
        h.wait()


def test_running_is_robust_against_pid_reuse() -> None:
    me = process_record()
    assert running(me)
    time.sleep(0.05)  # start times count in 10 ms ticks: a reused pid starts later
    other = subprocess.Popen(["sleep", "60"])  # alive, with a pid a report could name
    try:
        assert process_identity(other.pid) not in (None, me["process"])
        assert not running({**me, "pid": other.pid})
        assert running({**me, "pid": other.pid, "process": process_identity(other.pid)})
    finally:
        other.kill()
        other.wait()
    assert not running({**me, "pid": dead_pid()})
    for garbage in ({}, {"pid": "12"}, {"pid": -1, "process": "x"}, {"pid": True}):
        assert not running(garbage)
