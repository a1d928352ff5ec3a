"""A real etcd server for the pool tests: its own free loopback ports, data dir and process group.

It never touches a system etcd: the client and peer ports are picked free on
127.0.0.1, the data dir is in the test's temp directory, and the server is
stopped (its whole process group) when the test ends, even if it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from mirror.lab.demo import free_ports


def free_port() -> int:
    return free_ports(1)[0]


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc`` (which leads it), then SIGKILL if needed."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group
    proc.wait()


@contextmanager
def etcd_server(tmp: Path) -> Iterator[str]:
    exe = shutil.which("etcd")
    if exe is None:
        pytest.fail("etcd is not installed: scripts/setup installs Debian's etcd-server")
    for _attempt in range(3):
        client, peer = free_ports(2)  # held together while picked: never the same port
        data = tmp / f"etcd-{client}"
        url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        logf = open(tmp / f"etcd-{client}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [exe, "--name", "t", "--data-dir", str(data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"t={peer_url}", "--max-txn-ops", "10000"],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 20
            up = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                        if b'"true"' in r.read():
                            up = True
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            if up:
                yield url
                return
        finally:
            stop_group(proc)
            logf.close()
    pytest.fail(f"etcd did not start: see {tmp}/etcd-*.log")
