"""The host agent's metrics and log pieces, each alone: the merge of roles' metrics
(mirror/ha/agentmetrics.py), a role's metrics socket (mirror/replication/metrics.py), the
log sink (mirror/ha/logsink.py), role.log's cap, and their configuration keys."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mirror.config import ConfigError, LogConfig, agent_from_dict, from_dict
from mirror.ha import agentmetrics, logsink
from mirror.ha.hostagent import cap_log
from mirror.replication import metrics


def role_text(pair: str, node: str, checkpoints: int) -> str:
    """A role's exposition: a counter and a histogram with its pair and node."""
    reg = CollectorRegistry()
    c = Counter("mirror_checkpoints_total", "Checkpoints taken", ["pair", "node"], registry=reg)
    h = Histogram("mirror_checkpoint_pause_seconds", "Pause", ["pair", "node"], registry=reg,
                  buckets=(0.01, 0.1))
    c.labels(pair, node).inc(checkpoints)
    h.labels(pair, node).observe(0.005)
    return generate_latest(reg).decode()


def test_merge_gives_each_family_once_with_every_pair() -> None:
    per = {p: list(text_string_to_metric_families(role_text(label, "hostA", n)))
           for p, label, n in (("p1", "p1", 3), ("p2", "wrong", 7))}
    reg = CollectorRegistry(auto_describe=False)

    class C:
        def collect(self) -> list[object]:
            return agentmetrics.merge(per)  # type: ignore[return-value]

    reg.register(C())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert text.count("# TYPE mirror_checkpoints_total counter") == 1
    assert text.count("# TYPE mirror_checkpoint_pause_seconds histogram") == 1
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    totals = {s.labels["pair"]: s.value for s in fams["mirror_checkpoints"].samples
              if s.name == "mirror_checkpoints_total"}
    # the pair label is the pair the role was read for, whatever the role said
    assert totals == {"p1": 3.0, "p2": 7.0}
    counts = {s.labels["pair"] for s in fams["mirror_checkpoint_pause_seconds"].samples}
    assert counts == {"p1", "p2"}


@pytest.fixture
def long_dir(tmp_path: Path) -> Path:
    d = tmp_path / ("x" * 100) / "role"  # past the 108 bytes of a unix socket address
    d.mkdir(parents=True)
    return d


def test_role_socket_serves_the_registry_on_a_long_path(long_dir: Path) -> None:
    path = long_dir / agentmetrics.SOCKET
    assert len(str(path)) > 108
    metrics.Metrics.of("unit-sock", "n").checkpoints.inc()
    metrics.serve_socket(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    fams = {f.name: f for f in agentmetrics.read_role(path)}
    assert any(s.labels == {"pair": "unit-sock", "node": "n"}
               for s in fams["mirror_checkpoints"].samples)
    metrics.serve_socket(path)  # again (a primary that became the secondary): the same one
    assert any(f.name == "mirror_checkpoints" for f in agentmetrics.read_role(path))


def test_a_stuck_role_costs_one_timeout_and_reads_as_down(
    long_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agentmetrics, "SCRAPE_TIMEOUT_S", 0.5)
    good = long_dir / "good.sock"
    metrics.serve_socket(good)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never answers
    stuck.bind(str(Path("/tmp") / f"stuck-{os.getpid()}.sock"))
    stuck.listen(8)
    gone = long_dir / "gone.sock"
    try:
        col = agentmetrics.PairsCollector(
            lambda: [("a", good), ("b", Path(stuck.getsockname())), ("c", gone)], "hostA")
        t0 = time.monotonic()
        fams = list(col.collect())
        took = time.monotonic() - t0
        assert took < 0.5 + 0.5 + 0.3, took
        up = {s.labels["pair"]: s.value for s in fams[0].samples}
        assert fams[0].name == "mirror_agent_role_up"
        assert up == {"a": 1.0, "b": 0.0, "c": 0.0}
    finally:
        os.unlink(stuck.getsockname())
        stuck.close()


def parse_journal(data: bytes) -> dict[str, str]:
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


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "sink"))
    s.settimeout(2)
    yield s
    s.close()
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logsink.SinkHandler)]:
        root.removeHandler(h)
        h.close()


def test_journal_lines_carry_the_pair(sink: socket.socket) -> None:
    h = logsink.attach(LogConfig(f"journal:{sink.getsockname()}"), "web1", "hostA")
    assert h is not None
    log = logging.getLogger("mirror.unit")
    log.warning("two\nlines")
    f = parse_journal(sink.recv(65536))
    assert f["MESSAGE"] == "mirror.unit WARNING two\nlines"
    assert (f["PAIR"], f["NODE"], f["PRIORITY"], f["SYSLOG_IDENTIFIER"]) == (
        "web1", "hostA", "4", "mirror")
    # a second attach replaces the first (a role that becomes the other role)
    logsink.attach(LogConfig(f"journal:{sink.getsockname()}"), "web2", "hostA")
    log.error("once")
    assert parse_journal(sink.recv(65536))["PAIR"] == "web2"
    sink.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sink.recv(65536)


def test_syslog_lines_and_json(sink: socket.socket) -> None:
    from mirror.ha.role import JsonFormatter, event

    logsink.attach(LogConfig(f"syslog:{sink.getsockname()}"), "web1", "hostA")
    logging.getLogger("mirror.unit").warning("hello")
    line = sink.recv(65536).decode()
    assert line == f"<28>mirror[{os.getpid()}]: pair=web1 node=hostA mirror.unit WARNING hello"
    root = logging.getLogger()
    stderr = logging.StreamHandler()
    stderr.setFormatter(JsonFormatter())
    root.addHandler(stderr)  # as --log-json makes it
    try:
        logsink.attach(LogConfig(f"syslog:{sink.getsockname()}"), "web1", "hostA")
        event("unit-event", logging.WARNING, answer=42)
        line = sink.recv(65536).decode()
    finally:
        root.removeHandler(stderr)
    obj = json.loads(line.split("]: ", 1)[1])
    assert obj["pair"] == "web1" and obj["event"] == "unit-event" and obj["answer"] == 42


def test_a_missing_sink_drops_lines_silently(tmp_path: Path) -> None:
    h = logsink.attach(LogConfig(f"journal:{tmp_path / 'none'}"), "p", "n")
    assert h is not None
    logging.getLogger("mirror.unit").warning("nobody listens")
    assert h.dropped == 1
    logsink.attach(LogConfig(""), "p", "n")
    assert not any(isinstance(x, logsink.SinkHandler) for x in logging.getLogger().handlers)


def test_resolve() -> None:
    assert logsink.resolve("none") == ""
    assert logsink.resolve("syslog:/x/y") == "syslog:/x/y"
    assert logsink.resolve("journal") == "journal:/run/systemd/journal/socket"
    auto = logsink.resolve("auto")
    assert auto in ("", "journal:/run/systemd/journal/socket", "syslog:/dev/log")
    assert (auto == "") == (not os.path.exists("/run/systemd/journal/socket")
                            and not os.path.exists("/dev/log"))


@pytest.mark.parametrize("data,why", [
    ({"agent": {"metrics_listen": "9470"}}, "[agent] metrics_listen: expected HOST:PORT"),
    ({"agent": {"log": "journald"}}, '[agent] log must be "auto", "none"'),
    ({"agent": {"log": "syslog:dev/log"}}, "got 'syslog:dev/log'"),
])
def test_agent_keys_errors(data: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError) as e:
        agent_from_dict(data, "agent.toml")
    assert why in str(e.value) and "agent.toml" in str(e.value)


def test_agent_keys_defaults_and_role_keys() -> None:
    a = agent_from_dict({}).agent
    assert (a.metrics_listen, a.log) == ("127.0.0.1:9470", "auto")
    assert agent_from_dict({"agent": {"metrics_listen": "", "log": "none"}}).agent.log == "none"
    with pytest.raises(ConfigError, match=r"metrics\.socket must be an absolute path"):
        from_dict({"metrics": {"socket": "metrics.sock"}})
    with pytest.raises(ConfigError, match=r"log\.sink must be"):
        from_dict({"log": {"sink": "stderr"}})
    assert from_dict({"log": {"sink": "syslog"}}).log.target() == ("syslog", "/dev/log")


def test_role_log_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "role.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as the role's stderr
    try:
        os.write(fd, b"old\n" * 300)
        assert not cap_log(path, limit=2000)
        os.write(fd, b"old\n" * 300)
        assert cap_log(path, limit=2000)
        os.write(fd, b"new\n")
        assert path.read_bytes() == b"new\n"  # the writer's next line starts the file
        old = path.with_name("role.log.1")
        assert old.read_bytes() == b"old\n" * 600 and (old.stat().st_mode & 0o777) == 0o600
    finally:
        os.close(fd)
