"""The operator's side, through the real `mirror` command: a port in use, two agents on
one state directory, failover and switchover only through the agent's control
socket (never a pid read from a file), and bad input of every kind: one line,
exit 2, no traceback."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mirror import config as config_mod
from mirror.config import Config, KeysConfig, MetricsConfig
from mirror.hoststate import write_json
from mirror.lab.demo import Host, free_ports
from tests.integration.conftest import SMALL, Pair, shm_files


def mirror(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(run: subprocess.CompletedProcess[str], *expect: str) -> str:
    """The run failed with exit 2 and one `mirror: error:` line saying ``expect``."""
    err = run.stderr
    assert "Traceback" not in err, err
    assert run.returncode == 2, f"exit {run.returncode}: {err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("mirror: error:")]
    assert len(lines) == 1, err
    assert "internal error" not in lines[0], f"a bad input reached the last resort: {err}"
    for e in expect:
        assert e in lines[0], f"{e!r} not in {lines[0]!r}"
    return lines[0]


def host_config(tmp_path: Path, pair_name: str, node: str = "hostB", **link: int) -> Path:
    (tmp_path / "shared").mkdir(exist_ok=True)
    data, hb = free_ports(2)
    cfg = replace(
        SMALL,
        pair=replace(SMALL.pair, name=pair_name),
        node=replace(SMALL.node, name=node, state_dir=str(tmp_path / node)),
        link=replace(
            SMALL.link, data_port=link.get("data", data), heartbeat_port=link.get("hb", hb)
        ),
        arbiter=replace(SMALL.arbiter, dir=str(tmp_path / "shared")),
        keys=KeysConfig(insecure=True),  # keys are not this test's point
        metrics=MetricsConfig(listen=""),
    )
    path = tmp_path / f"{node}-{pair_name}.toml"
    path.write_text(config_mod.to_toml(cfg))
    return path


# -- a port in use; two agents on one state directory -----------------------------------------


@pytest.mark.parametrize("which", ["hb", "data"])
def test_a_port_in_use_is_an_error_not_a_hang(
    tmp_path: Path, pair_name: str, no_leftovers: None, which: str
) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    try:
        cfg = host_config(tmp_path, pair_name, **{which: port})
        t0 = time.monotonic()
        run = mirror("secondary", "--config", str(cfg), timeout=30)
        one_line_error(run, "cannot bind the interconnect", str(port), "in use")
        assert time.monotonic() - t0 < 20
    finally:
        squatter.close()
    assert not shm_files(pair_name), "the standby image was left behind"
    assert not (tmp_path / "hostB" / "control.sock").exists()


def test_two_agents_cannot_share_a_state_directory(pair: Pair, tmp_path: Path) -> None:
    b = pair.start_secondary()
    cfg = replace(
        pair.cfg_b,
        pair=replace(pair.cfg_b.pair, name=pair.cfg_b.pair.name + "two"),
        link=replace(pair.cfg_b.link, data_port=free_ports(2)[0], heartbeat_port=free_ports(2)[1]),
    )
    path = tmp_path / "second.toml"
    path.write_text(config_mod.to_toml(cfg))
    run = mirror("secondary", "--config", str(path))
    one_line_error(
        run, f"another mirror daemon (pid {b.proc.pid}) uses the state directory {cfg.state_dir}"
    )
    assert b.proc.poll() is None and (b.status() or {}).get("role") == "secondary"
    assert not shm_files(cfg.pair.name)


# -- the control socket --------------------------------------------------------------------


def test_failover_and_switchover_go_through_the_control_socket(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s.get("acked", 0) >= 5)
    for host in (a, b):
        sock = host.dir / "control.sock"
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (host.dir / "agent.lock").read_text().strip() == str(host.proc.pid)

    # another user cannot reach it (the socket is 0600, and the agent checks SO_PEERCRED)
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        's.sendall(b\'{"op": "failover"}\\n\')\n'
        "print(s.recv(100))\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code, str(b.dir / "control.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe
    assert (b.status() or {}).get("role") == "secondary"

    # the wrong role: refused (exit 1), nothing happens
    run = mirror("failover", "--config", str(a.config_path))
    assert run.returncode == 1 and "is not a secondary" in run.stderr, run.stderr
    run = mirror("switchover", "--config", str(b.config_path))
    assert run.returncode == 1 and "is not a protected primary" in run.stderr, run.stderr

    # the status files now lie: the commands do not read them
    write_json(a.dir / "status.json", {"role": "secondary", "pid": "x"})
    run = mirror("switchover", "--config", str(a.config_path))
    assert run.returncode == 0, run.stderr + a.log_tail()
    pair.wait(
        "B primary and protected",
        lambda: (s := b.status()) and s.get("role") == "primary" and s.get("phase") == "protected",
    )


def test_a_stale_status_file_never_signals_its_pid(tmp_path: Path, pair_name: str) -> None:
    """No agent runs; the status file names the pid of an unrelated process."""
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        cfg = host_config(tmp_path, pair_name)
        state = tmp_path / "hostB"
        state.mkdir()
        write_json(
            state / "status.json",
            {"role": "secondary", "committed": 9, "primary": None, "pid": victim.pid},
        )
        run = mirror("failover", "--config", str(cfg), "--force")
        one_line_error(run, f"no daemon runs in {state}", "no control socket")

        dead = socket.socket(socket.AF_UNIX)  # a socket file left by an agent that is gone
        dead.bind(str(state / "control.sock"))
        dead.close()
        run = mirror("failover", "--config", str(cfg), "--force")
        one_line_error(run, "left from a daemon that is gone")
        write_json(state / "status.json", {"role": "primary", "phase": "protected",
                                           "pid": victim.pid})  # fmt: skip
        run = mirror("switchover", "--config", str(cfg))
        one_line_error(run, "left from a daemon that is gone")

        (state / "control.sock").unlink()
        (state / "control.sock").write_text("not a socket")
        run = mirror("failover", "--config", str(cfg), "--force")
        one_line_error(run, "is not a daemon's control socket")
        time.sleep(0.2)
        assert victim.poll() is None, "an unrelated process was signalled"
        with open(f"/proc/{victim.pid}/status") as f:
            pending = [ln for ln in f if ln.startswith(("SigPnd", "ShdPnd"))]
        assert all(ln.split()[1].strip("0") == "" for ln in pending), pending
    finally:
        victim.kill()
        victim.wait()


# -- bad input: one line, exit 2 -------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _toml(cfg: Config) -> bytes:
    return config_mod.to_toml(cfg).encode()


BAD_CONFIGS: dict[str, tuple[bytes, str]] = {
    "not UTF-8": (b'[node]\nname = "h\xff\xfe"\n', "not UTF-8 text"),
    "NUL in a name": (b'[node]\nname = "a\\u0000b"\n', "must not contain a NUL"),
    "NUL in a path": (b'[node]\nstate_dir = "/tmp/a\\u0000b"\n', "must not contain a NUL"),
    "a name with a slash": (b'[pair]\nname = "../../etc"\n', "part of file names"),
    "a hidden name": (b'[node]\nname = ".x"\n', "part of file names"),
    "a control character": (b'[node]\nname = "a\\u0007"\n', "part of file names"),
    "nested too deeply": (b"a = " + b"[" * 50_000, "not valid TOML"),
    "not TOML": (b"\x00\x01\x02", "not valid TOML"),
    "a wrong type": (b"[link]\ndata_port = 1e400\n", "must be an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["secondary", "status", "failover", "demo"])
def test_bad_config_is_one_line(tmp_path: Path, case: str, command: str) -> None:
    data, expect = BAD_CONFIGS[case]
    path = _write(tmp_path, "bad.toml", data)
    one_line_error(mirror(command, "--config", path), expect)


def test_bad_files_and_state_are_one_line(tmp_path: Path, pair_name: str) -> None:
    one_line_error(mirror("secondary", "--config", str(tmp_path)), "cannot read config")
    one_line_error(mirror("failover", "--config", str(tmp_path / "none.toml")), "cannot read")
    cfg = host_config(tmp_path, pair_name)
    state = tmp_path / "hostB"
    state.mkdir()
    for junk in (b"\xff{garbage", b"[]", b'{"role": "secondary", "committed": 3, "pid": "12ab"}'):
        (state / "status.json").write_bytes(junk)
        one_line_error(mirror("failover", "--config", str(cfg)), "no daemon runs in")
        one_line_error(mirror("switchover", "--config", str(cfg)), "no daemon runs in")
    # a state directory that is a file; a lock file planted as a symlink
    bad = tmp_path / "file-state"
    bad.write_text("x")
    cfg_file = tmp_path / "f.toml"
    cfg_file.write_bytes(cfg.read_bytes().replace(str(state).encode(), str(bad).encode()))
    one_line_error(mirror("secondary", "--config", str(cfg_file)), "state directory")
    (state / "status.json").unlink()
    (state / "agent.lock").symlink_to(tmp_path / "elsewhere")
    one_line_error(mirror("secondary", "--config", str(cfg)), "the lock file is a symlink")
    assert not (tmp_path / "elsewhere").exists()
    assert not shm_files(pair_name)


def test_last_resort_handler_prints_one_line(tmp_path: Path) -> None:
    """An error nobody foresaw is still one line (with -v, the traceback too)."""
    code = (
        "import sys, mirror.cli.app as c\n"
        "def boom(*a, **k): raise KeyError('surprise')\n"
        "c.run = boom\n"
        "sys.exit(c.main(sys.argv[1:]))\n"
    )
    args = ["status", "--config", "x.toml"]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "mirror: error: internal error: KeyError: 'surprise' (a bug in mirror: run it again "
        "with -v for the traceback, and report it)"
    ]
    run = subprocess.run([sys.executable, "-c", code, "-v", *args], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" in run.stderr


def test_host_kill_leaves_a_lock_that_is_no_lock(pair: Pair) -> None:
    """A killed agent's lock dies with it: a new agent takes the state directory."""
    b = pair.start_secondary()
    b.signal(signal.SIGKILL)
    b.proc.wait()
    b.remove_shm_files()
    deadline = time.monotonic() + 10  # its guest process too (reaped by init)
    while time.monotonic() < deadline:
        try:
            os.killpg(b.proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    b2 = Host("hostB", "secondary", pair.cfg_b, pair.root)
    pair.hosts.append(b2)
    pair.wait(
        "the new secondary", lambda: (s := b2.status()) and s.get("pid") == b2.proc.pid, alive=[b2]
    )
    assert (b2.dir / "agent.lock").read_text().strip() == str(b2.proc.pid)
