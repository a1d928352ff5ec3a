"""Interconnect keys: `mirror keygen`'s files, the [keys] section, and its errors."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mirror.config import Config, ConfigError, KeysConfig, from_dict, to_toml
from mirror.replication import keys


def keyed(tmp_path: Path, secret: str, peer: str, insecure: bool = False) -> Config:
    return replace(Config(), keys=KeysConfig(secret, peer, insecure))


def test_keygen_writes_a_secret_file_0600_and_prints_the_public_key(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "keygen", "--dir", str(tmp_path), "--name", "hostA"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    secret, public = tmp_path / "hostA.key_secret", tmp_path / "hostA.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = keys.load_secret(secret)
    assert keys.parse_public(str(public)) == pub
    assert pub.decode() in run.stdout and sec.decode() not in run.stdout
    assert b"secret-key" not in public.read_bytes()
    # never overwritten
    again = subprocess.run(
        [sys.executable, "-m", "mirror", "keygen", "--dir", str(tmp_path), "--name", "hostA"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert keys.load_secret(secret) == (pub, sec)


def test_keygen_dir_that_is_a_file_is_one_clear_line(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for target, says in ((afile, "is not a directory"), (afile / "sub", "cannot make the key")):
        run = subprocess.run(
            [sys.executable, "-m", "mirror", "keygen", "--dir", str(target)],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 2
        assert run.stderr.startswith("mirror: error: ") and says in run.stderr, run.stderr
        assert "Errno" not in run.stderr and len(run.stderr.splitlines()) == 1
    assert afile.read_text() == "x"


def test_a_pair_without_keys_refuses_and_says_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"secret_key and peer_public_key not set.*mirror keygen"):
        keys.load(Config().keys)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}"\n[arbiter]\ndir = "{tmp_path}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "mirror", "secondary", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("mirror: error: [keys]") and "mirror keygen" in run.stderr
    assert not list(Path("/dev/shm").glob("mirror-mirror-host-standby.img"))


def test_z85_text_or_file_and_the_errors(tmp_path: Path) -> None:
    pub_a, sec_a, key_a = keys.generate(tmp_path, "a")
    _, sec_b, key_b = keys.generate(tmp_path, "b")
    assert keys.load(keyed(tmp_path, str(sec_a), key_b.decode()).keys) == keys.LinkKeys(
        key_a, keys.load_secret(sec_a)[1], key_b
    )
    # a path of exactly 40 characters is a path (z85 has '/', '.', '-' and letters too)
    short = Path(f"/tmp/kz{os.getpid()}")  # z85 has no "_", which mkdtemp may pick
    short.mkdir()
    try:
        d = short / ("x" * (40 - len(str(short)) - len("/b.key") - 1))
        d.mkdir()
        (d / "b.key").write_bytes((tmp_path / "b.key").read_bytes())
        assert len(str(d / "b.key")) == 40 and keys.valid_z85(str(d / "b.key").encode())
        assert keys.parse_public(str(d / "b.key")) == key_b
    finally:
        shutil.rmtree(short)
    for secret, peer, match in [
        (str(sec_a), str(sec_b), "is a SECRET key file"),
        # a public key file (0644) given as the secret: said so, not "chmod 600" (issue 24)
        (str(pub_a), key_b.decode(), "is a public key, not the secret one"),
        (str(sec_a), key_a.decode(), "this host's own public key"),
        (str(sec_a), "short", "neither a 40-character z85 public key nor a key file"),
        (str(tmp_path / "nope"), key_b.decode(), "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=match):
            keys.load(keyed(tmp_path, secret, peer).keys)
    os.chmod(sec_a, 0o644)
    with pytest.raises(ConfigError, match=r"readable by others.*chmod 600"):
        keys.load(keyed(tmp_path, str(sec_a), key_b.decode()).keys)


def test_insecure_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    cfg = replace(Config(), keys=KeysConfig(insecure=True))
    assert keys.load(cfg.keys) is None
    assert any(r.levelname == "WARNING" and "INSECURE" in r.message for r in caplog.records)
    with pytest.raises(ConfigError, match="insecure = true but keys are set"):
        keys.load(replace(Config(), keys=KeysConfig(secret_key="x", insecure=True)).keys)


def test_keys_section_round_trips_through_toml() -> None:
    import tomllib

    cfg = replace(Config(), keys=KeysConfig("/k/a.key_secret", 'we"ird', True))
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"\[keys\].insecure: must be true or false"):
        from_dict({"keys": {"insecure": 1}})
