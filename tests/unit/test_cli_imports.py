"""`mirror --help` (and a command's --help) imports no demo and no heavy library: the
demos (mirror/lab) and numpy, libvirt, etcd3gw, zmq are imported by the commands that
use them only (issue 20); nor mirror's own configuration, engine or pool code (issue 24:
--help is fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("mirror.lab", "numpy", "libvirt", "etcd3gw", "zmq")


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run python -X importtime ARGS: the process, and every module it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
             if line.startswith("import time:")}
    return run, names


def heavy(names: set[str]) -> set[str]:
    return {n for n in names if any(n == h or n.startswith(h + ".") for h in HEAVY)}


@pytest.mark.parametrize("argv", [
    ["--help"], ["status", "--help"], ["pool", "--help"], ["pool", "status", "--help"],
    ["demo", "--help"], ["pair", "--help"], ["primary", "--help"], ["keygen", "--help"],
])
def test_help_imports_no_demo_and_no_heavy_library(argv: list[str]) -> None:
    run, names = imported("-m", "mirror", *argv)
    assert run.returncode == 0 and run.stdout.startswith("usage: mirror"), run.stderr[-2000:]
    assert "mirror.cli.app" in names  # the parser was built here
    assert not heavy(names), f"mirror {' '.join(argv)} imported {sorted(heavy(names))}"


# what the parser needs: the command modules, and the pool's constants (mirror/pool/__init__)
PARSER_ONLY = {"mirror", "mirror.__main__", "mirror.pool"}


@pytest.mark.parametrize("argv", [["--help"], ["pool", "vm", "add", "--help"],
                                  ["demo", "--help"], ["--version"]])
def test_help_imports_only_the_parser(argv: list[str]) -> None:
    run, names = imported("-m", "mirror", *argv)
    assert run.returncode == 0 and run.stdout.startswith(("usage: mirror", "mirror ")), \
        run.stderr[-2000:]
    ours = {n for n in names if n == "mirror" or n.startswith("mirror.")}
    beyond = {n for n in ours - PARSER_ONLY if not n.startswith("mirror.cli")}
    assert not beyond, f"mirror {' '.join(argv)} imported {sorted(beyond)}"
    assert not {"mirror.cli.manual"} & ours  # completion and man load it themselves


def test_the_check_sees_a_heavy_import() -> None:
    """The same check on a process that imports the demo finds it (it can fail)."""
    run, names = imported("-c", "import mirror.lab.demo")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mirror.lab" in heavy(names)
