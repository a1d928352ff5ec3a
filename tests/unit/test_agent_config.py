"""The host agent's configuration (mirror/config.py: agent_from_dict, load_agent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror.config import ConfigError, agent_from_dict, load_agent

PEER = {"address": "10.0.0.2", "public_key": "/etc/mirror/hostB.key"}


def test_defaults_and_peers() -> None:
    cfg = agent_from_dict({"agent": {"node": "hostA"}, "peers": {"hostB": PEER}})
    assert cfg.agent.node == "hostA" and cfg.agent.port == 7600
    assert cfg.peers["hostB"].address == "10.0.0.2" and cfg.peers["hostB"].port == 7600
    assert str(cfg.state_dir) == "/var/lib/mirror/agent"


@pytest.mark.parametrize(
    "data,why",
    [
        ({"agnet": {}}, "unknown section(s) agnet"),
        ({"agent": {"nod": "x"}}, "unknown key(s) nod"),
        ({"agent": {"port": 0}}, "[agent].port: value must be within 1..65535"),
        ({"agent": {"node": "a/b"}}, "part of file names"),
        ({"agent": {"port": 7615}}, "inside pair_ports_from..pair_ports_to"),
        ({"agent": {"pair_ports_from": 8000, "pair_ports_to": 8001}}, "at least 3 ports"),
        ({"peers": {"hostB": {"address": "x"}}}, "needs address and public_key"),
        ({"peers": {"../x": PEER}}, "part of file names"),
        ({"peers": {"host": PEER}}, "is this host itself"),
        ({"peers": "hostB"}, "[peers] must hold tables"),
        ({"arbiter": {"etcd_prefix": "no-slash"}}, "bad etcd key prefix"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        agent_from_dict(data, "agent.toml")
    assert why in str(e.value) and "agent.toml" in str(e.value)


def test_load_agent_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the host agent configuration"):
        load_agent(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent(bad)
