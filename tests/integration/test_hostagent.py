"""The host agent (`mirror agent`) with real processes: two agents on loopback (each its
own address), their pair roles as real `mirror primary|secondary` processes, a shared
arbiter directory, CURVE keys; the guest is the synthetic one, through the same pair
definitions a libvirt domain takes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.ha import peerlink
from mirror.hoststate import read_json
from mirror.lab.demo import free_ports
from mirror.lab.observer import Observer
from mirror.replication import keys

ADDR = {"hostA": "127.0.0.2", "hostB": "127.0.0.3"}


def mirror(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True,
                          text=True, timeout=timeout)


class Agent:
    def __init__(self, root: Path, name: str, peer: str, port: int, peer_port: int,
                 ports: tuple[int, int], metrics_port: int, log: str = "auto") -> None:
        self.name, self.root = name, root
        self.dir = root / name
        self.dir.mkdir(exist_ok=True)
        self.config = self.dir / "agent.toml"
        k = root / "keys"
        self.config.write_text(f"""
[agent]
node = "{name}"
state_dir = "{self.dir / 'state'}"
address = "{ADDR[name]}"
port = {port}
pair_ports_from = {ports[0]}
pair_ports_to = {ports[1]}
metrics_listen = "127.0.0.1:{metrics_port}"
log = "{log}"

[keys]
secret_key = "{k / (name + '.key_secret')}"

[arbiter]
dir = "{root / 'shared'}"

[checkpoint]
epoch_ms = 30
threads = 1

[peers.{peer}]
address = "{ADDR[peer]}"
port = {peer_port}
public_key = "{k / (peer + '.key')}"
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "agent.log"
        self.metrics = f"127.0.0.1:{metrics_port}"
        self.extra: list[str] = []  # options before the command (--log-json)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mirror", *self.extra, "agent", "--config",
                 str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if mirror("list", "--agent-config", str(self.config), timeout=10).returncode == 0:
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"{self.name}'s agent did not start: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL the agent's own process group (its roles are in groups of their own)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def list(self) -> list[dict[str, Any]]:
        r = mirror("list", "--json", "--agent-config", str(self.config), timeout=20)
        assert r.returncode == 0, r.stderr
        obj = json.loads(r.stdout)
        assert obj["ok"] is True, obj
        return list(obj["pairs"])

    def role_pids(self) -> list[int]:
        pids = []
        for st in (self.dir / "state" / "pairs").glob("*/role/status.json"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(read_json(st)["pid"]))
        return pids


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def pair_port_base() -> int:
    """The first of 61 ports for the two agents' pair ports: below the kernel's ephemeral
    range, where free_ports() finds the agents' own (a range over them is refused)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    span = max(low - 61 - 20000, 1)
    return 20000 + (os.getpid() * 7) % span


@pytest.fixture
def agents(tmp_path: Path, pair_name: str, no_leftovers: None,
           request: pytest.FixtureRequest) -> Iterator[tuple[Agent, Agent]]:
    (tmp_path / "shared").mkdir()
    for n in ("hostA", "hostB", "stranger"):
        keys.generate(tmp_path / "keys", n)
    pa, pb, ma, mb = free_ports(4)
    base = pair_port_base()
    # [agent] log of each (a test's own sinks: "{root}" is its tmp_path)
    log = {n: v.replace("{root}", str(tmp_path))
           for n, v in getattr(request, "param", {}).items()}
    a = Agent(tmp_path, "hostA", "hostB", pa, pb, (base, base + 20), ma,
              log.get("hostA", "auto"))
    b = Agent(tmp_path, "hostB", "hostA", pb, pa, (base + 40, base + 60), mb,
              log.get("hostB", "auto"))
    try:
        yield a, b
    finally:
        for ag in (a, b):
            ag.kill()
        for ag in (a, b):
            for pid in ag.role_pids():
                kill_group(pid)
        for f in Path("/dev/shm").glob(f"mirror-{pair_name}-*"):  # the killed roles'
            f.unlink()


def wait(what: str, cond: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def by_pair(agent: Agent, pair: str) -> dict[str, Any] | None:
    return next((p for p in agent.list() if p["pair"] == pair), None)


def test_pair_adopt_resume_and_unpair(agents: tuple[Agent, Agent], pair_name: str) -> None:
    a, b = agents
    a.start()
    b.start()
    obs = Observer()
    try:
        r = mirror("pair", pair_name, "--peer", "hostB", "--guest", "synthetic", "--ram-mib",
                   "16", "--observer", f"127.0.0.1:{obs.port}", "--agent-config", str(a.config),
                   "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{pair_name} is protected by hostB" in r.stdout
        assert "standby ready on hostB" in r.stdout
        pa, pb = by_pair(a, pair_name), by_pair(b, pair_name)
        assert pa and pa["role"] == "primary" and pa["phase"] == "protected"
        assert pb and pb["role"] == "secondary" and pb["running"]
        # the definitions, and B's standby XML path in its role config (synthetic: none)
        pdir = a.dir / "state" / "pairs" / pair_name
        assert json.loads((pdir / "definition.json").read_text())["peer"] == "hostB"
        assert "[guest]" in (pdir / "mirror.toml").read_text()

        # status DOMAIN goes through the agent
        r = mirror("status", pair_name, "--agent-config", str(a.config))
        assert r.returncode == 0 and "protected" in r.stdout, r.stdout + r.stderr

        # 1. the agent restarts under a running primary: it adopts it, starts nothing
        primary_pid = pa["role_pid"]
        a.kill()
        os.killpg(primary_pid, 0)  # the role outlived its agent
        a.start()
        pa = by_pair(a, pair_name)
        assert pa and pa["running"] and pa["role_pid"] == primary_pid
        assert "role-adopted" in a.log.read_text()

        # 2. host A's agent and guest die; B promotes; A's agent comes back: the arbiter
        #    says B runs the guest, so A starts its secondary, never a second primary
        a.kill()
        kill_group(primary_pid)
        wait("B's promotion", lambda: (by_pair(b, pair_name) or {}).get("role") == "primary")
        a.start()
        pa = wait("A's secondary", lambda: (p := by_pair(a, pair_name)) and p["role"] ==
                  "secondary" and p["running"] and p)
        assert "started as its secondary" in a.log.read_text() or "started its secondary" in \
            a.log.read_text()
        wait("B protected again by A", lambda: (by_pair(b, pair_name) or {}).get("phase")
             == "protected")
        assert "won generation" not in a.log.read_text()
        seqs = obs.seen.seqs
        assert seqs and obs.seen.gaps() == 0

        # 3. unpair on the primary's host (now B): both sides gone
        r = mirror("unpair", pair_name, "--agent-config", str(a.config))
        assert r.returncode == 2 and "run `mirror unpair" in r.stderr, r.stderr
        r = mirror("unpair", pair_name, "--agent-config", str(b.config))
        assert r.returncode == 0, r.stderr
        assert "standby dropped on hostA" in r.stdout
        assert by_pair(a, pair_name) is None and by_pair(b, pair_name) is None
        assert not (a.dir / "state" / "pairs" / pair_name).exists()
        assert a.role_pids() == [] and b.role_pids() == []
    finally:
        obs.close()


def test_resume_when_the_peer_is_gone_claims_first(agents: tuple[Agent, Agent],
                                                   pair_name: str) -> None:
    """Both hosts' roles die; A's agent comes back alone: B is silent on the arbiter, so A
    wins the generation's claim (B can never promote in it) and leads under the next."""
    a, b = agents
    a.start()
    b.start()
    obs = Observer()
    try:
        r = mirror("pair", pair_name, "--peer", "hostB", "--guest", "synthetic", "--ram-mib",
                   "16", "--observer", f"127.0.0.1:{obs.port}", "--agent-config", str(a.config))
        assert r.returncode == 0, r.stdout + r.stderr
        pids = {ag.name: ag.role_pids() for ag in (a, b)}
        for ag in (b, a):
            ag.kill()
            for pid in pids[ag.name]:
                kill_group(pid)
        a.start()
        pa = wait("A's primary again", lambda: (p := by_pair(a, pair_name)) and p["running"]
                  and p["role"] == "primary" and p)
        # A's primary may have won "unprotected" (generation 1) before it was killed: the
        # resume claims whatever generation is current, then leads under the next
        claims = {c.name: json.loads(c.read_text()) for c in
                  (a.root / "shared" / pair_name / "claims").glob("generation-*")}
        resumed = [g for g, c in claims.items() if c["action"] == "resume"]
        assert len(resumed) == 1 and claims[resumed[0]]["node"] == "hostA", claims
        g = int(resumed[0].split("-")[1])
        assert f"won generation {g} (hostB silent): started the primary under {g + 1}" in \
            a.log.read_text()
        assert pa["generation"] >= g + 1
        # B's agent comes back: its standby again, and A protected by it
        b.start()
        wait("A protected again by B", lambda: (by_pair(a, pair_name) or {}).get("phase")
             == "protected")
        pb = by_pair(b, pair_name)
        assert pb and pb["role"] == "secondary"
        # failover and switchover DOMAIN go through the agent to the pair's role
        r = mirror("failover", pair_name, "--agent-config", str(b.config))
        assert r.returncode == 1 and "alive on storage" in r.stderr, r.stdout + r.stderr
        r = mirror("switchover", pair_name, "--agent-config", str(a.config))
        assert r.returncode == 0 and "switched over" in r.stdout, r.stdout + r.stderr
        wait("the agents follow the swap", lambda: (by_pair(b, pair_name) or {}).get("role")
             == "primary" and (by_pair(a, pair_name) or {}).get("role") == "secondary")
    finally:
        obs.close()


def test_interconnect_admits_known_peers_only(agents: tuple[Agent, Agent]) -> None:
    a, _ = agents
    a.start()
    port = int(a.config.read_text().split("port = ")[1].split()[0])
    target = peerlink.PeerAddress("hostA", ADDR["hostA"], port,
                                  keys.parse_public(str(a.root / "keys" / "hostA.key")))
    pub, sec = keys.load_secret(a.root / "keys" / "hostB.key_secret")
    assert peerlink.ask(target, pub, sec, "ping")["node"] == "hostA"
    with pytest.raises(peerlink.PeerError, match="refused 'drop'"):
        peerlink.ask(target, pub, sec, "drop", {"pair": "nothing"})
    spub, ssec = keys.load_secret(a.root / "keys" / "stranger.key_secret")
    with pytest.raises(peerlink.PeerError, match="did not answer"):
        peerlink.ask(target, spub, ssec, "ping", timeout=2)
    with pytest.raises(peerlink.PeerError, match="did not answer"):
        peerlink.ask(target, spub, ssec, "prepare", {"pair": "x", "kind": "synthetic"},
                     timeout=2)
    text = a.log.read_text()
    assert "refused a host agent with an unknown CURVE key" in text
    assert list((a.dir / "state" / "pairs").iterdir()) == []


def test_cli_without_an_agent(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nnode = "h"\nstate_dir = "{tmp_path / "s"}"\n')
    r = mirror("list", "--agent-config", str(cfg))
    assert r.returncode == 2
    assert "no daemon runs in" in r.stderr and "mirror agent" in r.stderr
    r = mirror("list", "--agent-config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "cannot read the host agent configuration" in r.stderr
    cfg.write_text('[agent]\nnode = "h"\nport = 7615\n')
    r = mirror("list", "--agent-config", str(cfg))
    assert r.returncode == 2 and "inside pair_ports_from..pair_ports_to" in r.stderr
    r = mirror("failover", "--agent-config", str(cfg))
    assert r.returncode == 2 and "give DOMAIN" in r.stderr


def test_agents_reload_a_rotated_key(agents: tuple[Agent, Agent], pair_name: str,
                                     tmp_path: Path) -> None:
    """Host A's key rotated under a protected pair: B's agent reloads (`mirror keys
    reload`), A's on SIGHUP; both agents and their roles use the new key (the pair is
    protected again, the agents answer each other), and the old key gets no answer from
    B's agent any more."""
    a, b = agents
    a.start()
    b.start()
    obs = Observer()
    try:
        r = mirror("pair", pair_name, "--peer", "hostB", "--guest", "synthetic", "--ram-mib",
                   "16", "--observer", f"127.0.0.1:{obs.port}", "--agent-config", str(a.config),
                   "--timeout", "60")
        assert r.returncode == 0, r.stdout + r.stderr
        k = a.root / "keys"
        old_pub, old_sec = keys.load_secret(k / "hostA.key_secret")
        new_pub_file, new_sec_file, new_key = keys.generate(tmp_path / "rotated", "hostA")
        (k / "hostA.key_secret").write_bytes(new_sec_file.read_bytes())  # mode 0600 stays
        (k / "hostA.key").write_bytes(new_pub_file.read_bytes())  # B's [peers] hostA
        r = mirror("keys", "reload", "--agent-config", str(b.config))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"peer hostA: {keys.fingerprint(new_key)}" in r.stdout, r.stdout
        assert f"pair {pair_name}: changed" in r.stdout, r.stdout
        assert a.proc is not None
        a.proc.send_signal(signal.SIGHUP)
        wait("A's agent reloaded", lambda: '"event": "keys-reloaded"' in a.log.read_text())
        acked0 = (by_pair(a, pair_name) or {}).get("acked", 0)
        wait("the pair protected with A's new key",
             lambda: (p := by_pair(a, pair_name)) and p["role"] == "primary"
             and p["phase"] == "protected" and p["acked"] > acked0 + 20)  # fmt: skip
        assert (by_pair(b, pair_name) or {}).get("role") == "secondary"
        # the agents' interconnect: A's new key is B's peer, its old one a stranger
        port_b = int(b.config.read_text().split("port = ")[1].split()[0])
        target = peerlink.PeerAddress("hostB", ADDR["hostB"], port_b,
                                      keys.parse_public(str(k / "hostB.key")))  # fmt: skip
        _, new_sec = keys.load_secret(k / "hostA.key_secret")
        assert peerlink.ask(target, new_key, new_sec, "ping")["node"] == "hostB"
        with pytest.raises(peerlink.PeerError, match="did not answer"):
            peerlink.ask(target, old_pub, old_sec, "ping", timeout=2)
        assert obs.seen.gaps() == 0
    finally:
        obs.close()
