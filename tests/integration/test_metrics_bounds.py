"""The metrics server under many idle local connections: a bounded number of threads,
and it serves a scrape again once the idle ones time out."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mirror.replication import metrics

SERVER = """
import sys, time
from mirror.replication import metrics
host, port = metrics.serve("127.0.0.1", 0)
print(port, flush=True)
time.sleep(600)
"""


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_idle_connections_cannot_multiply_threads() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    socks: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/metrics"
        urllib.request.urlopen(url, timeout=5).read()
        base_threads, base_rss = _threads(proc.pid), _rss_mib(proc.pid)
        for _ in range(1100):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)
        threads, rss = _threads(proc.pid), _rss_mib(proc.pid)
        print(f"1100 idle connections: threads {base_threads} -> {threads}, "
              f"RSS {base_rss:.0f} -> {rss:.0f} MiB")  # fmt: skip
        assert threads <= base_threads + metrics.MAX_CONNECTIONS
        assert rss < base_rss + 40
        # the idle ones are closed after the read timeout; a scrape is served again
        deadline = time.monotonic() + metrics.READ_TIMEOUT_S + 10
        while True:
            try:
                body = urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "no scrape served after the idle timeout"
                time.sleep(0.5)
        assert b"mirror_" in body or b"python_" in body or body == b""
        assert _threads(proc.pid) <= base_threads + metrics.MAX_CONNECTIONS
    finally:
        for s in socks:
            s.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
