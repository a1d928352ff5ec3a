"""The install path (docs/install.md): `scripts/install` from a copy of this checkout into a
temporary prefix, which is `python -m venv` + `pip install .` with build isolation (setuptools,
cffi and every dependency from the package index, as on a real host), gives a working
`mirror` whose native engine runs, a link on PATH, and a unit that runs that very command;
and the same from wheels built beforehand, with no package index.

Slow (a few minutes each under load: pip compiles native/ and libvirt-python); needs the
package index that scripts/setup needs too, and the Debian packages of `scripts/setup
--build` (the developer set-up installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# what a checkout holds that is not source: built files, caches, the developer's venv
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", ".hypothesis", "*.so",
)


def _unit_field(text: str, key: str) -> str:
    values = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]
    assert len(values) == 1, f"{key}= in the unit: {values}"
    return values[0]


def _source(tmp_path: Path) -> Path:
    """A copy of this checkout's source (pip builds in the tree it installs from)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    return src


def _env() -> dict[str, str]:
    """Nothing of this checkout or of the test's virtualenv may leak into the install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHON"] = sys.executable  # `-m venv` from a venv: a fresh one of its base Python
    return env


def _install(src: Path, tmp_path: Path, *args: str) -> tuple[Path, Path, Path]:
    """scripts/install into tmp_path: the prefix, the link's directory, the unit's."""
    prefix, bindir, units = tmp_path / "opt" / "mirror", tmp_path / "bin", tmp_path / "units"
    run = subprocess.run(
        [str(src / "scripts" / "install"), "--prefix", str(prefix), "--bin", str(bindir),
         "--unit-dir", str(units), *args],
        capture_output=True, text=True, timeout=1200, env=_env(), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    link = bindir / "mirror"
    assert link.is_symlink() and os.readlink(link) == str(prefix / "bin" / "mirror")
    return prefix, bindir, units


def _check_unit(units: Path, prefix: Path) -> None:
    """The unit runs exactly the installed command, its documentation is there, and it
    is the unit of this checkout, moved to the prefix."""
    unit = (units / "mirror-agent.service").read_text()
    exec_start = _unit_field(unit, "ExecStart").split()
    assert exec_start[0] == str(prefix / "bin" / "mirror")
    assert os.access(exec_start[0], os.X_OK)
    assert exec_start[1:] == ["agent", "--config", "/etc/mirror/agent.toml"]
    docs = _unit_field(unit, "Documentation").split()
    assert docs
    for url in docs:
        assert url.startswith("file://") and Path(url.removeprefix("file://")).is_file(), url
    shipped = (ROOT / "deploy" / "systemd" / "mirror-agent.service").read_text()
    assert unit == shipped.replace("/opt/mirror/", f"{prefix}/")


def test_install_gives_a_working_mirror_that_the_unit_runs(tmp_path: Path) -> None:
    src = _source(tmp_path)
    prefix, bindir, _ = _install(src, tmp_path)  # `python -m venv` + `pip install SRC`
    link, env = bindir / "mirror", _env()

    def mirror(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(link), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=tmp_path)

    helped = mirror("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("agent", "pair", "keygen", "primary", "secondary"):
        assert command in helped.stdout

    made = mirror("keygen", "--dir", str(tmp_path / "keys"), "--name", "hostA")
    assert made.returncode == 0, made.stderr
    secret = tmp_path / "keys" / "hostA.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "hostA.key").is_file()

    # the package, its native parts and the preload library come from the install
    probe = subprocess.run(
        [str(prefix / "bin" / "python"), "-c",
         "import json, mirror, mirror._pagediff, mirror._diskserver\n"
         "from mirror.guests import uffd\n"
         "from mirror.replication import dirtylog\n"
         "print(json.dumps({'package': mirror.__file__, 'preload': str(uffd.preload_library()),"
         " 'log': dirtylog.probe()}))"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["package"]).is_relative_to(prefix), found
    assert Path(found["preload"]).is_relative_to(prefix) and Path(found["preload"]).is_file()

    # the whole engine from the install: a synthetic pair on loopback, checkpoints acked
    config = tmp_path / "demo.toml"
    config.write_text(f'[pair]\nname = "tinstall{os.getpid()}"\n')  # its /dev/shm files
    demo = mirror("demo", "--guest", "synthetic", "--config", str(config), "--ram-mib", "16",
                  "--dirty-rate", "2000", "--duration", "8", "--json", timeout=300)
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert summary["acked"] > 0 and summary["observer_gaps"] == 0, summary
    # with the kernel's log where this kernel has one: the installed preload library works
    assert summary["scan"] == ("log" if found["log"] is None else "hashed"), summary

    _check_unit(tmp_path / "units", prefix)
    shutil.rmtree(src)  # about 50 MB; kept when a check above fails
    shutil.rmtree(prefix)


def test_install_from_wheels_needs_no_index_and_no_build(tmp_path: Path) -> None:
    """The production way (docs/install.md): wheels built once elsewhere, installed with
    pip's --no-index from them alone."""
    src = _source(tmp_path)
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=1200, env=_env(), cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr
    assert list(wheels.glob("mirror-*.whl")) and list(wheels.glob("libvirt_python-*.whl"))
    prefix, bindir, units = _install(src, tmp_path, "--wheels", str(wheels))
    helped = subprocess.run([str(bindir / "mirror"), "--help"], capture_output=True,
                            text=True, timeout=60, env=_env(), cwd=tmp_path)
    assert helped.returncode == 0 and "agent" in helped.stdout, helped.stderr
    installed = subprocess.run(
        [str(prefix / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path, check=True,
    )
    names = {p["name"] for p in json.loads(installed.stdout)}
    assert {"mirror", "libvirt-python", "pyzmq"} <= names, names
    _check_unit(units, prefix)
    for d in (src, prefix, wheels):
        shutil.rmtree(d)
