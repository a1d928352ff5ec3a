"""Metrics: a real Prometheus server scrapes a running pair (real primary and secondary
processes) and its HTTP API answers with their series; the alerting rules pass
promtool's check and its unit tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.lab.demo import free_ports
from tests.integration.conftest import Pair

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package (prometheus, promtool) is not installed: run scripts/setup",
)


@needs_prometheus
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES / "mirror-rules.yml")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 11 rules found" in check.stdout
    # each alert fires on the series that should fire it, and not on a healthy pair
    unit = subprocess.run(
        ["promtool", "test", "rules", "mirror-rules.test.yml"],
        capture_output=True,
        text=True,
        cwd=RULES,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


class Prometheus:
    """A Prometheus server of the test's own: its config and data in tmp, a free port,
    its own process group, stopped by pid."""

    def __init__(self, root: Path, targets: list[str]) -> None:
        (self.port,) = free_ports(1)
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES / 'mirror-rules.yml'}']\n"
            "scrape_configs:\n"
            "  - job_name: mirror\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n"
        )
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    def query(self, q: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=q)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def wait(self, what: str, q: str, cond: Any, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited"
            with contextlib.suppress(OSError):
                result = self.query(q)
                if cond(result):
                    return result
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {q} = {result}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path / "prometheus", targets)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def by_node(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["node"]: float(r["value"][1]) for r in result}


@needs_prometheus
def test_prometheus_scrapes_a_running_pair(pair: Pair, prometheus_for: Any) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("checkpoints", lambda: (s := a.status()) and s["acked"] >= 5)
    assert a.status()["metrics"] == pair.cfg_a.metrics.listen  # type: ignore[index]
    prom = prometheus_for([pair.cfg_a.metrics.listen, pair.cfg_b.metrics.listen])

    up = prom.wait("both agents scraped", "up", lambda r: len(r) == 2 and all(
        float(x["value"][1]) == 1 for x in r))  # fmt: skip
    assert len(up) == 2
    taken = prom.wait(
        "checkpoints counted",
        "mirror_checkpoints_total",
        lambda r: by_node(r).get("hostA", 0) >= 5,
    )
    assert by_node(taken)["hostB"] == 0  # every series exists on both; B takes none
    assert all(r["metric"]["pair"] == pair.cfg_a.pair.name for r in taken)
    assert by_node(prom.query("mirror_protected")) == {"hostA": 1.0}  # B runs no guest
    # each has seen the other's storage slot on the (shared) arbiter
    seen = by_node(prom.query("mirror_peer_storage_slot_seen"))
    assert seen == {"hostA": 1.0, "hostB": 1.0}, seen
    committed = by_node(prom.query("mirror_standby_committed_checkpoint"))
    assert committed["hostB"] >= 1
    states = {
        (r["metric"]["node"], r["metric"]["mirror_protection_state"])
        for r in prom.query("mirror_protection_state == 1")
    }
    assert states == {("hostA", "protected"), ("hostB", "standby")}
    roles = {
        (r["metric"]["node"], r["metric"]["mirror_role"]) for r in prom.query("mirror_role == 1")
    }
    assert roles == {("hostA", "primary"), ("hostB", "secondary")}
    assert set(by_node(prom.query("mirror_generation")).values()) == {1.0}

    # the pause histogram, its split, and rates derived from the counters
    pause = prom.wait(
        "the pause's median over a few scrapes",
        'histogram_quantile(0.5, rate(mirror_checkpoint_pause_seconds_bucket{node="hostA"}[10s]))',
        lambda r: r and r[0]["value"][1] != "NaN",
    )
    assert 0 < float(pause[0]["value"][1]) < 1, pause
    split = prom.query("mirror_checkpoint_pause_phase_seconds_count")
    phases = {r["metric"]["phase"] for r in split}
    assert phases == {"stop", "scan", "gather", "state", "resume"}
    assert by_node(prom.query("rate(mirror_replicated_bytes_total[10s])"))["hostA"] > 0
    assert by_node(prom.query("mirror_checkpoint_dirty_pages_count"))["hostA"] >= 5
    assert by_node(prom.query("mirror_checkpoint_ack_seconds_count"))["hostA"] >= 5
    assert by_node(prom.query("mirror_output_hold_seconds_count"))["hostA"] > 0
    ages = {
        (r["metric"]["node"], r["metric"]["path"]): float(r["value"][1])
        for r in prom.query("mirror_peer_heartbeat_age_seconds")
    }
    assert set(ages) == {(n, p) for n in ("hostA", "hostB") for p in ("network", "storage")}
    assert all(0 <= v < 1 for v in ages.values()), ages
    # the counters an alert watches exist from 0 on every node
    for name in ("mirror_dirty_log_missed_pages_total", "mirror_refused_peers_total"):
        assert by_node(prom.query(name)) == {"hostA": 0.0, "hostB": 0.0}, name
    promotions = prom.query("mirror_promotions_total")
    assert {r["metric"]["cause"] for r in promotions} == {"failure", "operator", "switchover"}
    assert all(float(r["value"][1]) == 0 for r in promotions)
    assert not prom.query("ALERTS"), "a healthy pair fires no alert"
    assert b.proc.poll() is None and a.proc.poll() is None
