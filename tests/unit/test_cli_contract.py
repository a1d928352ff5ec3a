"""The `mirror` command's contract over every command (issue 24): exit codes 0/1/2/3/130,
``--json``'s one JSON object on stdout for every outcome (bad options included), ``-v``
and ``--log-json`` anywhere, ``--version``, the bash completion and the manual page
generated from the parsers, the keys keygen prints."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mirror.cli import app, host, manual, output
from mirror.cli.app import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
LEAVES = [(path, p) for path, p, _ in manual.tree(build_parser())
          if path and not manual._subcommands(p)]


def _json_flag(p: argparse.ArgumentParser) -> bool:
    return any("--json" in a.option_strings for a in p._actions)


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0)


def test_every_command_is_covered() -> None:
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"status", "list", "demo", "pool status", "pool vm add", "keys reload",
            "completion", "man", "pair"} <= names
    assert sum(_json_flag(p) for _, p in LEAVES) >= 12  # status, list, demo, every pool one


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_a_bad_option_is_exit_2_and_json_under_json(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit([*path, "--bogusflag"]) == output.ERROR
    out = capsys.readouterr()
    assert out.out == "" and "error:" in out.err and "Traceback" not in out.err
    if not _json_flag(dict(LEAVES)[path]):
        return
    for argv in ([*path, "--json", "--bogusflag"], ["--bogusflag", *path, "--json"]):
        assert _exit(argv) == output.ERROR
        out = capsys.readouterr()
        obj = json.loads(out.out)  # one object, nothing else on stdout
        assert obj["ok"] is False and obj["exit"] == 2, obj
        assert "--bogusflag" in obj["error"] or "required" in obj["error"], obj
        assert obj["usage"].startswith("usage: mirror")
        assert "error:" in out.err


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_v_and_log_json_go_after_the_command_too(path: tuple[str, ...]) -> None:
    """Each command's parser takes -v and --log-json and leaves the value given before
    the command alone (SUPPRESS)."""
    p = dict(LEAVES)[path]
    acts = {s: a for a in p._actions for s in a.option_strings}
    for flag in ("-v", "--log-json"):
        assert flag in acts and acts[flag].default is argparse.SUPPRESS, (path, flag)


def test_v_anywhere_parses() -> None:
    ap = build_parser()
    for argv, v, lj in [(["status", "-v"], True, False), (["-v", "status"], True, False),
                        (["status"], False, False), (["list", "--json", "--log-json", "-v"],
                                                     True, True),
                        (["pool", "status", "-v"], True, False),
                        (["--log-json", "primary", "--config", "x"], False, True),
                        (["primary", "--config", "x", "--log-json"], False, True)]:
        args = ap.parse_args(argv)
        assert (args.verbose, args.log_json) == (v, lj), argv


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"mirror \d+\.\d+\S*\n", out), out
    assert out.split()[1] == app.version()


def _status_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[node]\nname = "hostB"\nstate_dir = "{tmp_path}"\n')
    return cfg


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_status_with_no_report_is_not_running_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(_status_config(tmp_path))
    rc, out, err = _run(capsys, "status", "--config", cfg)
    assert rc == output.NOT_RUNNING and out == ""
    assert err.startswith("mirror: error: not running: no role has reported") and \
        len(err.splitlines()) == 1
    rc, out, _ = _run(capsys, "status", "--config", cfg, "--json")
    obj = json.loads(out)
    assert rc == 3 and obj["exit"] == 3 and obj["running"] is False and obj["ok"] is False
    (tmp_path / "status.json").write_text("{not json")  # unreadable: an error
    rc, out, err = _run(capsys, "status", "--config", cfg, "--json")
    assert rc == 2 and json.loads(out)["exit"] == 2 and "cannot read" in err


def test_list_json_is_one_object(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`mirror list --json` (and `status --json` with neither DOMAIN nor --config) gives
    one JSON object, as every --json answer: {"ok": true, "pairs": [...]}."""
    pairs = [{"pair": "web", "role": "primary", "peer": "hostB", "generation": 1}]
    monkeypatch.setattr(host, "ask", lambda args, op, fields=None, **kw: {"pairs": pairs})
    for argv in (["list", "--json"], ["status", "--json"]):
        rc, out, err = _run(capsys, *argv)
        assert rc == 0 and json.loads(out) == {"ok": True, "pairs": pairs}, argv
        assert err == ""


def test_errors_are_json_under_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status", "--config", str(tmp_path / "none.toml"), "--json"],
                 ["list", "--agent-config", str(tmp_path / "none.toml"), "--json"],
                 ["status", "web", "--agent-config", str(tmp_path / "none.toml"), "--json"]):
        rc, out, err = _run(capsys, *argv)
        obj = json.loads(out)
        assert rc == 2 and obj == {"ok": False, "error": obj["error"], "exit": 2}, argv
        assert err == f"mirror: error: {obj['error']}\n"
    rc, out, err = _run(capsys, "status", "--config", str(tmp_path / "none.toml"))
    assert rc == 2 and out == "" and err.startswith("mirror: error: cannot read config")
    assert _exit(["pool", "--json", "--bogusflag"]) == 2  # before the pool command too
    out = capsys.readouterr()
    assert json.loads(out.out)["exit"] == 2 and "error:" in out.err


def test_internal_error_and_interrupt_under_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = str(_status_config(tmp_path))

    def boom(*a: Any) -> int:
        raise ZeroDivisionError("x")

    monkeypatch.setattr(app.status, "run", boom)
    rc, out, err = _run(capsys, "status", "--config", cfg, "--json")
    assert rc == 2 and json.loads(out)["error"].startswith("internal error: ZeroDivisionError")
    assert "run it again with -v" in err and "Traceback" not in err
    rc, out, err = _run(capsys, "status", "--config", cfg, "--json", "-v")  # -v after it
    assert rc == 2 and "Traceback" in err

    def stop(*a: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(app.status, "run", stop)
    rc, out, err = _run(capsys, "status", "--config", cfg, "--json")
    assert rc == 130 and json.loads(out) == {"ok": False, "error": "interrupted", "exit": 130}


def test_the_demo_says_when_it_did_not_hold() -> None:
    from mirror.cli.demo import held

    good = {"observer_gaps": 0, "observer_duplicates": 0, "observer_interleaved": False}
    assert held(good, None) is None
    assert held({**good, "failover_ms": 300.0}, 2.0) is None
    assert held({**good, "observer_gaps": 3}, None) == "3 outputs lost (gaps)"
    assert "repeated" in str(held({**good, "observer_duplicates": 1}, None))
    assert "did not promote" in str(held(good, 2.0))


def test_demo_options_not_given_are_none() -> None:
    """--run-on 3 is given (not the default); --ram-mib unset leaves --config's."""
    ap = build_parser()
    assert ap.parse_args(["demo"]).run_on is None
    assert ap.parse_args(["demo", "--run-on", "3"]).run_on == 3.0
    assert ap.parse_args(["demo"]).ram_mib is None


def test_the_qemu_demo_takes_ram_mib_from_config(tmp_path: Path) -> None:
    from dataclasses import replace

    from mirror.cli.demo import qemu_base
    from mirror.config import Config

    cfg = tmp_path / "demo.toml"
    cfg.write_text("[guest]\nram_mib = 96\n[checkpoint]\nepoch_ms = 40\n")
    default = replace(Config(), guest=replace(Config().guest, ram_mib=128))
    ap = build_parser()
    given = qemu_base(ap.parse_args(["demo", "--guest", "qemu", "--config", str(cfg)]), default)
    assert given.guest.ram_mib == 96 and given.checkpoint.epoch_ms == 40
    over = qemu_base(ap.parse_args(["demo", "--guest", "qemu", "--config", str(cfg),
                                    "--ram-mib", "64"]), default)
    assert over.guest.ram_mib == 64
    assert qemu_base(ap.parse_args(["demo", "--guest", "qemu"]), default).guest.ram_mib == 128


def test_keygen_prints_absolute_paths_that_work_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mirror.config import load
    from mirror.replication import keys

    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, "keygen", "--dir", "keys", "--name", "hostA")
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("on this host:"))
    secret = line.split("=", 1)[1].strip().strip('"')
    assert Path(secret).is_absolute() and Path(secret) == tmp_path / "keys/hostA.key_secret"
    peer = next(x for x in out.splitlines() if x.startswith("on its peer:"))
    cfg = tmp_path / "role.toml"
    cfg.write_text(f"[keys]\n{line.split(':', 1)[1].strip().removeprefix('[keys] ')}\n"
                   f"{peer.split(':', 1)[1].strip().removeprefix('[keys] ')}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the printed configuration works from another directory
    loaded = load(cfg)
    public, _ = keys.load_secret(Path(loaded.keys.secret_key))
    assert keys.parse_public(loaded.keys.peer_public_key) == public


def test_the_public_key_given_as_secret_says_so(tmp_path: Path) -> None:
    from mirror.config import ConfigError
    from mirror.replication import keys

    pub, _, _ = keys.generate(tmp_path, "hostA")
    os.chmod(pub, 0o644)  # as keygen leaves it: for the peer
    with pytest.raises(ConfigError, match=r"is a public key, not the secret one: give the "
                       r"\.key_secret file .* \(hostA\.key_secret\)"):
        keys.load_secret(pub)


def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = tmp_path / "mirror.bash"
    script.write_text(manual.bash_completion(build_parser()))
    probe = r'''source "$1"
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _mirror; echo "${COMPREPLY[*]}"; }
t mirror po; t mirror pool ho; t mirror pool host add x --m; t mirror demo --guest q
t mirror -v sta; t mirror status --j; t mirror image ""; t mirror completion ""
'''
    run = subprocess.run([bash, "-c", probe, "probe", str(script)], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.splitlines() == ["pool", "host", "--mem", "qemu", "status", "--json",
                                       "build", "bash"]
    assert subprocess.run([sys.executable, "-m", "mirror", "completion", "bash"],
                          capture_output=True, text=True).stdout == script.read_text()


def test_the_manual_page_names_every_command_and_option() -> None:
    page = manual.manpage(build_parser(), app.version())
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS"):
        assert f".SH {section}\n" in page
    for path, p in LEAVES:  # every command and each of its options
        assert f".SS {' '.join(path)}\n".replace("-", "\\-") in page, path
        for a in p._actions:
            if a.option_strings and a.dest not in ("help", "verbose", "log_json"):
                assert manual._roff(a.option_strings[-1]) in page, (path, a.option_strings)
    run = subprocess.run([sys.executable, "-m", "mirror", "man"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == page
    groff = shutil.which("groff")
    if groff:
        run = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z"], input=page,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stderr == "", run.stderr


def test_the_exit_code_table_is_the_contract() -> None:
    """docs/operating.md's table lists exactly the codes mirror.cli.output defines."""
    text = (ROOT / "docs/operating.md").read_text()
    table = text.split("### Exit codes and --json", 1)[1].split("\n#", 1)[0]
    codes = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert codes == {output.OK, output.FAILED, output.ERROR, output.NOT_RUNNING,
                     output.INTERRUPTED} == {c for c, _ in manual.EXIT_CODES}
