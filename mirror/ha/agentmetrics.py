"""Every pair's metrics on one port per host: the host agent's ``[agent] metrics_listen``.

Each role the host agent starts serves its metrics (mirror/replication/metrics.py) on a unix
socket in its own state directory (``[metrics] socket`` in its generated configuration:
``STATE_DIR/pairs/PAIR/role/metrics.sock``).  A scrape of the host agent asks every active
pair's role at once, each within SCRAPE_TIMEOUT_S, and answers with all their series
merged by family, each sample's ``pair`` label set to the pair it was read from (the
roles' series carry ``pair`` and ``node`` already), plus ``mirror_agent_role_up{pair,
node}``: 1 when the role answered, 0 when it did not (dead, stuck, or not started).

Bounded: a dead or slow role costs a scrape at most SCRAPE_TIMEOUT_S (it is asked in a
thread of its own, and its answer is cut at metrics.MAX_EXPOSITION bytes); one scrape
gathers at a time (others wait for it, then take its result); the HTTP server is the
roles' (metrics.serve_registry: MAX_CONNECTIONS, READ_TIMEOUT_S).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from mirror.replication import metrics

log = logging.getLogger("mirror.ha.agentmetrics")

SCRAPE_TIMEOUT_S = 2.0  # for one role's answer (they are asked at once)
SOCKET = "metrics.sock"  # in the role's state directory

# (pair, the role's socket) of every pair whose role should be running now
Targets = Callable[[], list[tuple[str, Path]]]


def read_role(path: Path, timeout: float = SCRAPE_TIMEOUT_S) -> list[Metric]:
    """One role's metric families (ValueError or OSError when it gave none)."""
    text = metrics.scrape_socket(path, timeout).decode("utf-8", "replace")
    return list(text_string_to_metric_families(text))


def merge(per_pair: dict[str, list[Metric]]) -> list[Metric]:
    """The families of every pair merged by name (a family's help and type from the first
    pair that has it), each sample's ``pair`` label the pair's."""
    merged: dict[str, Metric] = {}
    for pair in sorted(per_pair):
        for fam in per_pair[pair]:
            m = merged.get(fam.name)
            if m is None:
                m = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            if m.type != fam.type:
                continue  # a role of another version: its family is not mixed in
            for s in fam.samples:
                m.samples.append(s._replace(labels={**s.labels, "pair": pair}))
    return list(merged.values())


class PairsCollector:
    """The host agent's registry's one collector: every running pair's series, gathered at
    each scrape."""

    def __init__(self, targets: Targets, node: str) -> None:
        self.targets, self.node = targets, node
        self._lock = threading.Lock()
        self._last: list[Metric] = []
        self._last_at = 0.0

    def gather(self) -> list[Metric]:
        targets = self.targets()
        got: dict[str, list[Metric]] = {}
        threads = []

        def ask(pair: str, path: Path) -> None:
            try:
                got[pair] = read_role(path, SCRAPE_TIMEOUT_S)
            except (OSError, ValueError) as e:
                log.debug("pair %s: no metrics from its role: %s", pair, e)

        for pair, path in targets:
            t = threading.Thread(target=ask, args=(pair, path), daemon=True,
                                 name=f"scrape-{pair}")
            t.start()
            threads.append(t)
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S + 0.5
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        done = dict(got)  # a straggler's answer after the deadline is not used
        up = GaugeMetricFamily(*metrics.ROLE_UP, labels=["pair", "node"])
        for pair, _ in targets:
            up.add_metric([pair, self.node], 1.0 if pair in done else 0.0)
        return [up, *merge(done)]

    def collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        with self._lock:  # one gathering at a time; a scrape that waited takes its result
            if self._last_at < started:
                self._last = self.gather()
                self._last_at = time.monotonic()
            return list(self._last)


class AgentMetrics:
    """The host agent's metrics endpoint: http://HOST:PORT/metrics."""

    def __init__(self, listen: tuple[str, int], targets: Targets, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PairsCollector(targets, node))
        self.server = metrics.serve_registry(self.registry, *listen)
        host, port = self.server.server_address[:2]
        self.address = f"{host!s}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
