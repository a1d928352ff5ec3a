"""There is no default arbiter: a role or an agent whose configuration names neither
``[arbiter] dir`` nor ``[arbiter] etcd`` stops at once with one line naming the key
(a local folder on each host would be two arbiters, and both hosts would win)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config import ArbiterConfig, Config, ConfigError, from_dict, require_arbiter
from mirror.ha.role import make_arbiter


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_no_arbiter_has_no_default() -> None:
    assert ArbiterConfig().dir == "" and ArbiterConfig().etcd == ""
    with pytest.raises(ConfigError, match=r"m.toml: \[arbiter\] dir is not set"):
        require_arbiter(from_dict({"pair": {"name": "p"}}, "m.toml").arbiter, "m.toml")
    require_arbiter(ArbiterConfig(dir="/srv/shared"), "x")  # either names one
    require_arbiter(ArbiterConfig(etcd="http://127.0.0.1:2379"), "x")
    with pytest.raises(ConfigError, match=r"\[arbiter\] dir is not set"):
        make_arbiter(Config().arbiter, "mirror", "host")  # one built in code: no arbiter either


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_a_role_without_an_arbiter_is_one_line_naming_the_key(
    tmp_path: Path, pair_name: str, role: str
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        f'[pair]\nname = "{pair_name}"\n[node]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[guest]\nram_mib = 8\n[keys]\ninsecure = true\n"
    )
    run = mirror(role, "--config", str(cfg))
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines == [
        f"mirror: error: {cfg}: [arbiter] dir is not set: name the storage both hosts "
        f"share (an NFS mount or a shared disk), or set [arbiter] etcd; there is no "
        f"default, as a local folder on each host would let both run the guest"
    ], run.stderr
    assert not (tmp_path / "state").exists(), "the role started before refusing"
    assert not Path("/var/lib/mirror/arbiter", pair_name).exists()


def test_an_agent_without_an_arbiter_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nnode = "hostA"\nstate_dir = "{tmp_path / "agent"}"\n')
    run = mirror("agent", "--config", str(cfg))
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        f"mirror: error: {cfg}: [arbiter] dir is not set: name the storage both hosts "
        f"share (an NFS mount or a shared disk), or set [arbiter] etcd; there is no "
        f"default, as a local folder on each host would let both run the guest"
    ], run.stderr
    assert not (tmp_path / "agent").exists()
