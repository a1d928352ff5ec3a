"""The test rigs never hand out a port twice in one process.

Linux offers a port that was just freed to the next bind to port 0: in the suite, the
observers of two consecutive tests were seen on the same port.  Whatever still knows
the old port (a host of an earlier test, a retrying client, a stale connection) then
reaches the new owner.  This runs in a network namespace of its own whose ephemeral
range is four ports, so that the kernel has to choose among a few, as on a busy machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, socket, subprocess
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 40003")
from mirror.lab.demo import free_ports
from mirror.lab.observer import Observer

# the kernel's own choice: a freed port is offered again
reoffered = 0
for _ in range(20):
    s = socket.create_server(("127.0.0.1", 0)); old = s.getsockname()[1]; s.close()
    t = socket.create_server(("127.0.0.1", 0)); reoffered += t.getsockname()[1] == old; t.close()

first = Observer(); first.close()
second = Observer(); second.close()
ports = free_ports(2)
try:
    free_ports(1)
    exhausted = ""
except OSError as e:
    exhausted = str(e)
print(json.dumps({"reoffered": reoffered, "observers": [first.port, second.port],
                  "free": ports, "exhausted": exhausted}))
"""


def test_observers_and_free_ports_never_reuse_a_port_of_this_process() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    run = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["reoffered"] > 0, "the kernel never re-offered a freed port: nothing is tested"
    handed = got["observers"] + got["free"]
    assert sorted(handed) == [40000, 40001, 40002, 40003], got
    assert "no free port on 127.0.0.1 this process has not had before" in got["exhausted"]
