"""The pool agent's metrics port (`mirror pool agent --metrics-listen`): each pair role's
configuration hands its metrics over a unix socket in its own state directory; only the
pair roles are scraped (the stand-in VMs have none); a bad or taken address is one line,
exit 2, before anything is asked of etcd."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mirror.cli import main
from mirror.ha import agentmetrics
from mirror.pool.model import PairSpec
from mirror.pool.poolagent import Child, PoolAgent, pair_config

NO_ETCD = "http://127.0.0.1:9"  # nothing may be asked of it


def test_pair_config_hands_metrics_over_a_socket_in_its_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = PairSpec(pair="vm-web", data_port=7600, heartbeat_port=7601,
                    observer="127.0.0.1:7500")
    cfg = pair_config(spec, "h1", NO_ETCD, Path("run/pairs/web/h1"))
    assert cfg.metrics.listen == ""
    assert cfg.metrics.socket == str(tmp_path / "run/pairs/web/h1" / agentmetrics.SOCKET)
    assert cfg.metrics.address() is None  # absolute: accepted


def test_only_pair_roles_are_scrape_targets(tmp_path: Path) -> None:
    agent = PoolAgent(NO_ETCD, "h1", run_dir=tmp_path)
    proc = subprocess.Popen(["true"])
    proc.wait()
    agent.procs = {
        "web": Child(proc, "primary", tmp_path / "pairs/web/h1", pair="vm-web"),
        "db": Child(proc, "secondary", tmp_path / "pairs/db/h1", pair="vm-db"),
        "r1": Child(proc, "vm"),  # a stand-in VM: no metrics
    }
    assert agent.metric_targets() == [
        ("vm-db", tmp_path / "pairs/db/h1" / agentmetrics.SOCKET),
        ("vm-web", tmp_path / "pairs/web/h1" / agentmetrics.SOCKET)]


def _agent(capsys: pytest.CaptureFixture[str], tmp_path: Path, listen: str) -> tuple[int, str]:
    rc = main(["pool", "agent", "--host", "h1", "--etcd", NO_ETCD, "--run-dir",
               str(tmp_path / "run"), "--metrics-listen", listen])
    err = capsys.readouterr().err
    return rc, err


def test_a_taken_port_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, err = _agent(capsys, tmp_path, f"127.0.0.1:{port}")
    assert rc == 2
    assert err.splitlines() == [
        f"mirror pool: error: cannot serve metrics on 127.0.0.1:{port}: Address already in "
        f'use; give --metrics-listen a free HOST:PORT, or "" to serve none']
    assert not (tmp_path / "run").exists()  # nothing done: no keys made


def test_a_bad_address_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = _agent(capsys, tmp_path, "9471")
    assert rc == 2
    assert err.splitlines() == [
        "mirror pool: error: --metrics-listen: expected HOST:PORT with a port in 1..65535, "
        "got '9471'"]
