"""The install path agrees with itself: the systemd unit runs the command that
`scripts/install` (and docs/install.md) say the install gives, its documentation is a file
the wheel installs, and the package lists docs/install.md gives are scripts/setup's.
(tests/integration/test_install.py installs for real.)"""

from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "mirror-agent.service"
INSTALL_MD = ROOT / "docs" / "install.md"


def _unit_field(key: str) -> str:
    values = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
              if line.startswith(key + "=")]
    assert len(values) == 1, f"{key}= in {UNIT}: {values}"
    return values[0]


def _install_paths() -> dict[str, str]:
    run = subprocess.run([str(ROOT / "scripts" / "install"), "--paths"], capture_output=True,
                         text=True, timeout=30, check=True)
    return {k: v.strip() for k, _, v in (line.partition(":") for line in run.stdout.splitlines())}


def _wheel_data_files() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files: dict[str, list[str]] = data["tool"]["setuptools"]["data-files"]
    return files


def _installed_by_the_wheel(prefix: str, path: str) -> bool:
    """Whether the wheel's data files put a file of this checkout at ``path`` (under the
    virtualenv ``prefix``)."""
    if not path.startswith(prefix + "/"):
        return False
    target, _, name = path.removeprefix(prefix + "/").rpartition("/")
    for pattern in _wheel_data_files().get(target, []):
        for f in ROOT.glob(pattern):
            if f.is_file() and f.name == name and fnmatch.fnmatch(str(f.relative_to(ROOT)),
                                                                  pattern):
                return True
    return False


def test_the_unit_runs_the_command_the_install_gives() -> None:
    paths = _install_paths()
    command = paths["command"]
    prefix = command.removesuffix("/bin/mirror")
    assert command == "/opt/mirror/bin/mirror" and prefix == "/opt/mirror"
    assert _unit_field("ExecStart").split() == [command, "agent", "--config",
                                                 "/etc/mirror/agent.toml"]
    assert paths["link"] == f"/usr/local/bin/mirror -> {command}"
    doc = INSTALL_MD.read_text()
    assert f"`{command}`" in doc and "`/usr/local/bin/mirror`" in doc
    assert f"ExecStart={command} agent --config /etc/mirror/agent.toml" in doc
    # scripts/install takes the unit from what the wheel installed
    assert _installed_by_the_wheel(prefix, f"{prefix}/share/mirror/systemd/{UNIT.name}")


def test_the_units_documentation_is_installed_by_the_wheel() -> None:
    prefix = _install_paths()["command"].removesuffix("/bin/mirror")
    urls = _unit_field("Documentation").split()
    assert urls
    for url in urls:
        assert url.startswith("file://"), url
        assert _installed_by_the_wheel(prefix, url.removeprefix("file://")), url
    assert _installed_by_the_wheel(prefix, f"{prefix}/share/doc/mirror/docs/install.md")
    assert not _installed_by_the_wheel(prefix, f"{prefix}/share/doc/mirror/docs/nothing.md")


def _packages(kind: str) -> list[str]:
    run = subprocess.run([str(ROOT / "scripts" / "setup"), "--list", kind],
                         capture_output=True, text=True, timeout=30, check=True)
    return run.stdout.split()


def test_setup_keeps_a_hosts_packages_apart_from_a_developers() -> None:
    host, build, dev = _packages("host"), _packages("build"), _packages("dev")
    assert host and build and dev
    assert not (set(host) & set(build)) and not (set(host) & set(dev))
    for tool in ("gcc", "libc6-dev", "python3-dev", "etcd-server", "prometheus", "nbdkit"):
        assert tool not in host and tool in build + dev, tool
    for need in ("qemu-system-x86", "libvirt-daemon-system", "python3-venv"):
        assert need in host, need
    # docs/install.md gives each list as it is
    doc = INSTALL_MD.read_text()
    for kind, packages in (("host", host), ("build", build), ("dev", dev)):
        assert f"| {kind} | `{' '.join(packages)}` |" in doc, kind
