"""The `mirror` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def mirror(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def own_pair(tmp_path: Path, pair_name: str) -> str:
    """A base configuration naming this test's own pair (its /dev/shm files are its own)."""
    cfg = tmp_path / "base.toml"
    cfg.write_text(f'[pair]\nname = "{pair_name}"\n')
    return str(cfg)


def test_demo_json_summary(own_pair: str, no_leftovers: None) -> None:
    run = mirror(
        "demo",
        "--config",
        own_pair,
        "--ram-mib",
        "16",
        "--duration",
        "3",
        "--epoch-ms",
        "40",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["checkpoints"] >= 20 and r["acked"] >= r["checkpoints"] - 2
    assert r["outputs_released"] > 100
    assert r["observer_outputs"] == r["outputs_released"]
    assert r["observer_gaps"] == 0 and r["observer_duplicates"] == 0
    assert r["standby_committed"] >= r["acked"]
    assert r["pause_ms_p50"] > 0 and r["pause_ms_p99"] >= r["pause_ms_p50"]


def test_demo_human_summary_with_an_external_observer(own_pair: str, no_leftovers: None) -> None:
    from mirror.lab.observer import Observer

    obs = Observer()
    try:
        run = mirror(
            "demo",
            "--config",
            own_pair,
            "--ram-mib",
            "8",
            "--duration",
            "2",
            "--observer",
            f"127.0.0.1:{obs.port}",
        )
        assert run.returncode == 0, run.stderr
        assert "pause: p50" in run.stdout and "output latency added" in run.stdout
        assert obs.count() > 50 and obs.seen.gaps() == 0
    finally:
        obs.close()


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "[checkpoint]\nepoch_ms = 5\n",
            "[checkpoint].epoch_ms: value must be within 10..1000, got 5",
        ),
        ("[guest]\nram = 1\n", "[guest]: unknown key(s) ram"),
        ("[link\n", "not valid TOML"),
        ('[metrics]\nlisten = "nowhere"\n', "metrics.listen: expected HOST:PORT"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, text: str, message: str, no_leftovers: None
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    for role in ("primary", "secondary"):
        run = mirror(role, "--config", str(cfg))
        assert run.returncode == 2
        assert message in run.stderr, run.stderr


def test_missing_config_and_bad_options(tmp_path: Path) -> None:
    run = mirror("primary", "--config", str(tmp_path / "none.toml"))
    assert run.returncode == 2 and "cannot read config" in run.stderr
    run = mirror("demo", "--epoch-ms", "5")
    assert run.returncode == 2 and "must be within 10..1000" in run.stderr
    run = mirror("demo", "--observer", "nowhere")
    assert run.returncode == 2 and "expected HOST:PORT" in run.stderr


def test_status_reports_what_the_agent_wrote(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[node]\nname = "hostB"\nstate_dir = "{tmp_path}"\n')
    run = mirror("status", "--config", str(cfg))  # nothing reported: not running, exit 3
    assert run.returncode == 3 and run.stdout == "", run
    assert run.stderr.startswith("mirror: error: not running: no role has reported")
    run = mirror("status", "--config", str(cfg), "--json")
    assert run.returncode == 3 and json.loads(run.stdout) == {
        "ok": False, "error": run.stderr.strip().removeprefix("mirror: error: "), "exit": 3,
        "running": False}
    (tmp_path / "status.json").write_text('{"role": "secondary", "committed": 7}')
    run = mirror("status", "--config", str(cfg), "--json")  # no pid: no running agent
    assert run.returncode == 3 and json.loads(run.stdout)["committed"] == 7
    assert json.loads(run.stdout)["running"] is False
    run = mirror("status", "--config", str(cfg))
    assert run.returncode == 3 and "committed checkpoint: 7" in run.stdout
    assert "process: not running (last report " in run.stdout
    for garbage in ("[1, 2]", "{not json", '{"pid": "x", "reported_at": "soon"}'):
        (tmp_path / "status.json").write_text(garbage)
        run = mirror("status", "--config", str(cfg))
        assert run.returncode in (2, 3) and "Traceback" not in run.stderr, run.stderr


def test_a_metrics_port_in_use_is_a_clear_error(
    tmp_path: Path, pair_name: str, no_leftovers: None
) -> None:
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        cfg = tmp_path / "m.toml"
        cfg.write_text(
            f'[pair]\nname = "{pair_name}"\n[node]\nstate_dir = "{tmp_path}"\n'
            f'[guest]\nram_mib = 8\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
            f'[keys]\ninsecure = true\n[arbiter]\ndir = "{tmp_path}"\n'
        )
        for role in ("primary", "secondary"):
            run = mirror(role, "--config", str(cfg), timeout=60)
            assert run.returncode == 2, run.stderr
            assert f"mirror: error: cannot serve metrics on 127.0.0.1:{port}: " in run.stderr
            assert 'set [metrics] listen to a free HOST:PORT, or "" to serve none' in run.stderr
            assert "Traceback" not in run.stderr
    finally:
        taken.close()


def test_secondary_refuses_memory_it_cannot_have(
    tmp_path: Path, pair_name: str, no_leftovers: None
) -> None:
    import os

    free_mib = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize >> 20
    cfg = tmp_path / "big.toml"
    cfg.write_text(
        f'[pair]\nname = "{pair_name}"\n[node]\nname = "big"\nstate_dir = "{tmp_path}"\n'
        f"[guest]\nram_mib = {free_mib + 1024}\n[keys]\ninsecure = true\n"
        f'[arbiter]\ndir = "{tmp_path}"\n'
    )
    run = mirror("secondary", "--config", str(cfg))
    assert run.returncode == 2
    assert "cannot reserve" in run.stderr and "free memory or lower guest.ram_mib" in run.stderr
