"""The pool agent's metrics port with real processes: a real etcd, two `mirror pool agent`
processes each given `--metrics-listen`, a mirrored VM run as a real pair (primary on h1,
standby on h2) and a restart VM (a stand-in) on h1.  A scrape of each agent's port has
its pair role's series, labelled with the pair's name and the host, and
`mirror_agent_role_up` for the pair role only (the stand-in has no metrics).  A second
agent given a taken port exits 2 with one line and registers nothing."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from mirror.ha.etcd import Etcd
from mirror.lab.demo import free_ports
from mirror.lab.observer import Observer
from mirror.pool.store import Store
from tests.integration.test_pool_kill import Agents, _pool_cli
from tests.integration.test_pool_pairs import (  # noqa: F401  (pool_pair: a fixture)
    _status,
    _wait,
    pool_pair,
)


def scrape(address: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(fams: dict[str, Any], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples named ``name`` (a counter's family has no _total) by these labels."""
    return {tuple(s.labels[k] for k in labels): s.value for f in fams.values()
            for s in f.samples if s.name == name}


def test_a_pool_agent_serves_its_pair_roles_metrics_labelled_by_pair(
    pool_pair: tuple[str, Path, Agents, Observer, str],  # noqa: F811
) -> None:
    url, root, agents, observer, vm = pool_pair
    for h in ("h1", "h2"):
        _pool_cli(url, "host", "add", h, "--mem", "8192", "--vcpus", "8")
    _pool_cli(url, "config", "--failures", "0")
    data, hb, m1, m2 = free_ports(4)
    _pool_cli(url, "vm", "add", vm, "--mem", "1024", "--priority", "mirrored", "--host", "h1",
              "--standby", "h2", "--observer", f"127.0.0.1:{observer.port}",
              "--link-ports", f"{data},{hb}")
    _pool_cli(url, "vm", "add", "r1", "--mem", "1024", "--priority", "restart", "--host", "h1")
    store = Store(Etcd(url))
    pair = store.load().pool.pairs[vm].pair
    listen = {"h1": f"127.0.0.1:{m1}", "h2": f"127.0.0.1:{m2}"}
    for h in ("h1", "h2"):
        agents.start(h, "--metrics-listen", listen[h])
    _wait("the pair protected on h1/h2", lambda: (s := _status(root, vm, "h1"))
          .get("phase") == "protected" and s.get("acked", 0) >= 10, 40, root)
    _wait("r1 running on h1", lambda: store.load().running.get("r1") == "h1", 20, root)

    def checkpoints(fams: dict[str, Any], node: str) -> float:
        return values(fams, "mirror_checkpoints_total", "pair", "node").get((pair, node), 0)

    a = _wait("h1's port to show the primary's checkpoints", lambda: (
        f := scrape(listen["h1"])) and checkpoints(f, "h1") >= 5 and f, 20, root)
    b = scrape(listen["h2"])
    # each port: its own pair role only (r1, a stand-in on h1, has no metrics)
    assert values(a, "mirror_agent_role_up", "pair", "node") == {(pair, "h1"): 1.0}
    assert values(b, "mirror_agent_role_up", "pair", "node") == {(pair, "h2"): 1.0}
    assert values(a, "mirror_role", "pair", "node", "mirror_role")[(pair, "h1", "primary")] == 1
    assert values(b, "mirror_role", "pair", "node", "mirror_role")[
        (pair, "h2", "secondary")] == 1
    assert {s.labels["pair"] for f in (a, b) for fam in f.values() for s in fam.samples} == {
        pair}
    assert values(a, "mirror_protected", "pair", "node") == {(pair, "h1"): 1.0}
    assert checkpoints(b, "h2") == 0  # the standby takes none

    # a second agent on a taken port: one line, exit 2, the pool unchanged
    _pool_cli(url, "host", "add", "h3", "--mem", "8192", "--vcpus", "8")
    taken = subprocess.run(
        [sys.executable, "-m", "mirror", "pool", "agent", "--host", "h3", "--etcd", url,
         "--run-dir", str(root / "h3"), "--metrics-listen", listen["h1"]],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert taken.returncode == 2, taken.stderr
    assert taken.stderr.splitlines() == [
        f"mirror pool: error: cannot serve metrics on {listen['h1']}: Address already in "
        f'use; give --metrics-listen a free HOST:PORT, or "" to serve none']
    snap = store.load()
    assert "h3" not in snap.members and not snap.pool.hosts["h3"].agent
    assert not (root / "h3").exists()
