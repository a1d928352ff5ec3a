"""`mirror status` tells the truth (promoted, killed, stopped), a restarted node cleans
what its killed run left, and the agents' logs are quiet and machine-readable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mirror.lab.demo import Host
from tests.integration.conftest import Pair, shm_files


def status(cfg_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", "status", "--config", str(cfg_path), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def rows(run: subprocess.CompletedProcess[str]) -> dict[str, str]:
    out = {}
    for line in run.stdout.splitlines():
        key, _, value = line.partition(": ")
        out[key.strip()] = value
    return out


def as_json(run: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return dict(json.loads(run.stdout))


def test_status_promoted_killed_restarted_and_stopped(pair: Pair) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 5)
    run = status(a.config_path)
    assert run.returncode == 0, run.stderr
    view = rows(run)
    assert (view["phase"], view["protection"]) == ("protected", "protected"), run.stdout
    assert view["process"].startswith(f"running (pid {a.proc.pid},"), run.stdout
    st = as_json(status(a.config_path, "--json"))
    assert st["running"] is True and st["protection"] == "protected"

    ram = Path(str(st["ram"]))
    # pairing is no partition (after the kill, B may judge a cut for a tick or two: the
    # primary's storage slot can still look fresh when its heartbeats have stopped)
    assert "interconnect cut" not in b.log_path.read_text()
    a.signal(signal.SIGKILL)  # host A dies whole
    a.proc.wait()
    run = status(a.config_path)
    assert run.returncode == 3, run.stdout + run.stderr
    assert rows(run)["process"].startswith("not running (last report "), run.stdout
    st = as_json(status(a.config_path, "--json"))
    assert st["running"] is False and float(st["report_age_s"]) >= 0  # type: ignore[arg-type]
    # a healthy run logged nothing at WARNING, and no carriage-return progress text
    log = a.log_path.read_text()
    assert "\r" not in log and " INFO " in log
    assert not [ln for ln in log.splitlines() if " WARNING " in ln], log

    pair.wait("hostB to promote", lambda: (s := b.status()) and s.get("role") == "primary",
              alive=[b])  # fmt: skip
    time.sleep(0.6)  # a status write or two after the promotion
    run = status(b.config_path)
    assert run.returncode == 0, run.stderr
    view = rows(run)
    # promoted: the guest runs here with no standby; the JSON and the human view agree
    assert (view["role"], view["phase"], view["protection"]) == (
        "primary", "unprotected", "unprotected"), run.stdout  # fmt: skip
    st = as_json(status(b.config_path, "--json"))
    assert (st["phase"], st["protection"]) == ("unprotected", "unprotected")

    # host A comes back as the secondary, in the same state dir: its clean start removes
    # the RAM file its killed run left in /dev/shm
    assert ram.exists()
    a2 = Host("hostA", "secondary", pair.cfg_a, pair.root, "--log-json")
    pair.hosts.append(a2)
    pair.wait(
        "hostB to re-protect",
        lambda: (s := b.status()) and s.get("protection") == "protected" and s["acked"] >= 3,
        alive=[b, a2],
    )
    assert not ram.exists()
    assert rows(status(b.config_path))["protection"] == "protected"
    cleaned = [
        e for e in map(json.loads, a2.log_path.read_text().splitlines())
        if e.get("event") == "cleaned-leftovers"
    ]  # fmt: skip
    assert cleaned and cleaned[0]["removed"] == [str(ram)] and cleaned[0]["level"] == "info"

    b.signal(signal.SIGTERM)  # a stopped primary is not running, and says it stopped
    assert b.proc.wait(20) == 0
    run = status(b.config_path)
    assert run.returncode == 3, run.stdout
    view = rows(run)
    assert view["process"].startswith("not running (stopped; last report"), run.stdout
    assert (view["phase"], view["protection"]) == ("stopped", "stopped"), run.stdout
    assert not shm_files(pair.cfg_b.pair.name + "-hostB")

    # with --log-json every line is one JSON object
    assert "\r" not in b.log_path.read_text()
    a2.stop()
    lines = [json.loads(ln) for ln in a2.log_path.read_text().splitlines()]
    assert lines and all({"ts", "level", "logger"} <= set(e) for e in lines)
    assert not [e for e in lines if e["level"] == "warning"], lines


def test_status_watch_redraws_in_place(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[node]\nname = "w"\nstate_dir = "{tmp_path}"\n')
    (tmp_path / "status.json").write_text(
        json.dumps({"role": "secondary", "phase": "standby", "pid": os.getpid(),
                    "process": "not this process", "reported_at": time.time() - 42})
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirror", "status", "--config", str(cfg), "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        # ^C as at a terminal: a run started in the background by a shell without job
        # control (a CI runner's) inherits SIGINT ignored, and Python then keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # until three frames are drawn (by the frames, not a time: a start can take seconds
    # on a loaded machine), then ^C
    import select

    assert proc.stdout is not None
    try:
        drawn, deadline = b"", time.monotonic() + 60
        while drawn.count(b"\x1b[H\x1b[J") < 4 and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                drawn += chunk
        proc.send_signal(signal.SIGINT)
        rest, err_b = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:  # it did not end on ^C: the test fails, nothing left running
            proc.kill()
            proc.communicate()
    out, err = (drawn + rest).decode(), err_b.decode()
    assert proc.returncode == 0, err
    frames = out.split("\x1b[H\x1b[J")[1:]
    assert len(frames) >= 3, out
    # the pid is alive but is not the process that reported: not running
    assert all("not running (last report 4" in f for f in frames), frames[-1]
    assert all("phase: standby" in f for f in frames)
