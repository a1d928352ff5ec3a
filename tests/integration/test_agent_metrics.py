"""The host agent's metrics and logs with real processes: two agents each run two pairs
(one primary and one secondary each); a real Prometheus scrapes each agent's one port and
sees both pairs' series, labelled by pair; a stopped role does not hang a scrape; the
roles' log lines reach a syslog or journald sink of the test's own (a unix datagram
socket), with the pair as a field, JSON with --log-json."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.ha import agentmetrics
from mirror.hoststate import read_json
from mirror.lab.observer import Observer
from tests.integration.test_hostagent import (  # noqa: F401  (agents: a fixture)
    Agent,
    agents,
    mirror,
    wait,
)
from tests.integration.test_prometheus import (  # noqa: F401  (prometheus_for: a fixture)
    needs_prometheus,
    prometheus_for,
)


class Sink:
    """A unix datagram socket of the test's own, standing for journald or /dev/log; a
    thread keeps every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[bytes] = []
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(TimeoutError):
                self.got.append(self.sock.recv(1 << 20))

    def close(self) -> None:
        self.halt.set()
        self.thread.join(2)
        self.sock.close()


def journal_fields(data: bytes) -> dict[str, str]:
    """journald's native protocol, read back (KEY=value lines, or KEY, length, value)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + n].decode()
            i = nl + 9 + n + 1
    return out


def scrape(agent: Agent, timeout: float = 10) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def pair_up(agent: Agent, pair: str, peer: str, obs: Observer) -> None:
    r = mirror("pair", pair, "--peer", peer, "--guest", "synthetic", "--ram-mib", "16",
               "--observer", f"127.0.0.1:{obs.port}", "--agent-config", str(agent.config),
               "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[dict[str, Sink]]:
    s = {"hostA": Sink(tmp_path / "journal.sock"), "hostB": Sink(tmp_path / "syslog.sock")}
    yield s
    for x in s.values():
        x.close()


@needs_prometheus
@pytest.mark.parametrize("agents", [{"hostA": "journal:{root}/journal.sock",
                                     "hostB": "syslog:{root}/syslog.sock"}], indirect=True)
def test_one_port_per_host_serves_every_pair(
    agents: tuple[Agent, Agent], pair_name: str, prometheus_for: Any,  # noqa: F811
    sinks: dict[str, Sink],
) -> None:
    a, b = agents
    p1, p2 = pair_name, f"{pair_name}-2"
    b.extra = ["--log-json"]  # its roles' lines (stderr and sink) are JSON too
    a.start()
    b.start()
    obs1, obs2 = Observer(), Observer()
    try:
        pair_up(a, p1, "hostB", obs1)  # p1: primary on A, standby on B
        pair_up(b, p2, "hostA", obs2)  # p2: primary on B, standby on A
        prom = prometheus_for([a.metrics, b.metrics])
        up = prom.wait("both agents scraped", "up", lambda r: len(r) == 2 and all(
            float(x["value"][1]) == 1 for x in r))  # fmt: skip
        assert {x["metric"]["instance"] for x in up} == {a.metrics, b.metrics}

        def per(result: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
            return {(r["metric"]["pair"], r["metric"]["node"]): float(r["value"][1])
                    for r in result}

        # every role answered its agent; each agent's port has both its pairs
        roles_up = prom.wait("the four roles up", "mirror_agent_role_up",
                             lambda r: len(r) == 4 and all(float(x["value"][1]) for x in r))
        assert set(per(roles_up)) == {(p, n) for p in (p1, p2) for n in ("hostA", "hostB")}
        taken = prom.wait("checkpoints of both pairs", "mirror_checkpoints_total",
                          lambda r: per(r).get((p1, "hostA"), 0) >= 5
                          and per(r).get((p2, "hostB"), 0) >= 5)
        assert per(taken)[(p1, "hostB")] == 0 and per(taken)[(p2, "hostA")] == 0
        by_instance = {(r["metric"]["instance"], r["metric"]["pair"])
                       for r in prom.query("mirror_role")}
        assert by_instance == {(i, p) for i in (a.metrics, b.metrics) for p in (p1, p2)}
        assert per(prom.query("mirror_protected")) == {(p1, "hostA"): 1.0, (p2, "hostB"): 1.0}
        roles = {(r["metric"]["pair"], r["metric"]["node"], r["metric"]["mirror_role"])
                 for r in prom.query("mirror_role == 1")}
        assert roles == {(p1, "hostA", "primary"), (p1, "hostB", "secondary"),
                         (p2, "hostB", "primary"), (p2, "hostA", "secondary")}
        seen = per(prom.query("mirror_peer_storage_slot_seen"))
        assert seen == {(p, n): 1.0 for p in (p1, p2) for n in ("hostA", "hostB")}, seen
        storage_ok = per(prom.query("mirror_storage_heartbeat_ok"))
        assert storage_ok == {(p, n): 1.0 for p in (p1, p2) for n in ("hostA", "hostB")}
        pause = prom.wait(
            "each pair's pause median",
            "histogram_quantile(0.5, sum by (pair, le) "
            "(rate(mirror_checkpoint_pause_seconds_bucket[10s])))",
            lambda r: len(r) == 2 and all(x["value"][1] != "NaN" for x in r))
        assert {x["metric"]["pair"] for x in pause} == {p1, p2}
        assert not prom.query("ALERTS"), "two healthy pairs fire no alert"

        # a stopped role (p2's standby on A) does not hang A's scrape: it is reported down
        pid = int(read_json(a.dir / "state" / "pairs" / p2 / "role" / "status.json")["pid"])
        os.killpg(pid, signal.SIGSTOP)
        try:
            # (the first may take the result of Prometheus' scrape begun before the stop)
            for _ in range(2):
                t0 = time.monotonic()
                fams = scrape(a)
                took = time.monotonic() - t0
                assert took < 2 * agentmetrics.SCRAPE_TIMEOUT_S + 2, took
        finally:
            os.killpg(pid, signal.SIGCONT)
        role_up = {s.labels["pair"]: s.value for s in fams["mirror_agent_role_up"].samples}
        assert role_up == {p1: 1.0, p2: 0.0}, role_up
        assert {s.labels["pair"] for s in fams["mirror_role"].samples} == {p1}

        # the roles' lines reached each host's sink, with their pair as a field
        journal = [journal_fields(d) for d in sinks["hostA"].got]
        assert journal, "no line reached A's journal sink"
        assert {j["PAIR"] for j in journal} == {p1, p2}
        assert all(j["SYSLOG_IDENTIFIER"] == "mirror" and j["NODE"] == "hostA"
                   for j in journal)
        assert any(j.get("EVENT") and j["PAIR"] == p1 for j in journal)  # p1's primary's
        assert all(f'"event": "{j["EVENT"]}"' in j["MESSAGE"] for j in journal if j.get("EVENT"))
        syslog = [d.decode() for d in sinks["hostB"].got]
        assert syslog and all(s.startswith("<") and "mirror[" in s for s in syslog)
        objs = [json.loads(s.split("]: ", 1)[1]) for s in syslog]  # --log-json: JSON
        assert {o["pair"] for o in objs} == {p1, p2}
        assert all(o["node"] == "hostB" and "ts" in o for o in objs)
        # and role.log (its stderr) has the same lines, JSON on B
        b_log = (b.dir / "state" / "pairs" / p2 / "role.log").read_text().splitlines()
        assert b_log and all(json.loads(line)["level"] for line in b_log[:5])
        assert any(json.loads(line).get("event") for line in b_log if line.startswith("{"))
        assert obs1.seen.gaps() == 0 and obs2.seen.gaps() == 0
    finally:
        obs1.close()
        obs2.close()
