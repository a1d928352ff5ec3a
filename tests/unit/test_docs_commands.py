"""Every `mirror ...` command the docs show names commands and options the command line
has: a renamed command or option (or a choice no longer offered) fails here, with the
page and the line (issue 24)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mirror.cli.app import build_parser
from mirror.cli.manual import tree

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", "docs/operating.md", "docs/host-agent.md", "docs/observing.md",
         "docs/failover.md", "docs/guests.md", "docs/demos.md", "docs/install.md",
         "docs/pool.md", "docs/troubleshooting.md", "docs/security.md",
         "docs/configuration.md", "docs/testing.md"]
PREFIX = re.compile(r"^(?:\$ )?(?:sudo )?(?:\S*/bin/)?mirror (?=\S)")
INLINE = re.compile(r"`((?:sudo )?(?:\S*/bin/)?mirror [^`]+)`")


def shown(page: str) -> list[tuple[int, str]]:
    """(line number, command) of every `mirror ...` in ``page``: inline code spans and
    the lines of fenced code blocks."""
    found: list[tuple[int, str]] = []
    fenced = False
    for n, line in enumerate((ROOT / page).read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            text = line.strip()
            if PREFIX.match(text):
                found.append((n, text))
        else:
            found += [(n, m.group(1)) for m in INLINE.finditer(line)]
    return found


def _parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    return {path: p for path, p, _ in tree(build_parser())}


PARSERS = _parsers()
GLOBAL = {"-v", "--verbose", "--log-json", "--version", "-h", "--help"}


def words(command: str) -> list[str]:
    """The words of a command as the docs write it: no shell after it, no brackets."""
    text = command.replace("\\|", "|")
    text = re.split(r"\s#|\s&&|;|\s&|\s>|\s2>|\s\|\s|\s<", text + " ")[0]
    text = PREFIX.sub("", text.strip())
    return [w for w in re.split(r"[\s\[\](){}]+", text) if w and w not in ("...", "…")]


def check(command: str) -> list[str]:
    """What in ``command`` the parser does not have (empty: all of it is there)."""
    ws = words(command)
    if not ws or ws[0].endswith(":"):  # an output line (`mirror: error: ...`)
        return []
    paths: list[tuple[str, ...]] = [()]
    i = 0
    while i < len(ws):  # the command path: words that name a command (a|b: either)
        alts = ws[i].split("|")
        nxt = [(*p, a) for p in paths for a in alts if (*p, a) in PARSERS]
        if len(nxt) != len(paths) * len(alts):
            break
        paths, i = nxt, i + 1
    problems = []
    if paths == [()]:
        return [f"no command {ws[0]!r}"] if not ws[0].startswith("-") else []
    for path in paths:
        p = PARSERS[path]
        opts = {s: a for a in p._actions for s in a.option_strings}
        if i < len(ws) and ws[i].isupper():  # `mirror pool COMMAND --etcd`: any of them
            opts = {s: a for q, sub in PARSERS.items() if q[:len(path)] == path
                    for a in sub._actions for s in a.option_strings}
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions) and \
                i < len(ws) and not ws[i].startswith("-") and ws[i].islower() \
                and ws[i].isalpha():
            problems.append(f"mirror {' '.join(path)}: no command {ws[i]!r}")
        for j in range(i, len(ws)):
            w = ws[j].split("=", 1)[0]
            for flag in w.split("|"):
                if not re.fullmatch(r"--?[a-z][a-z0-9-]*", flag):
                    continue
                a = opts.get(flag)
                if a is None:
                    if flag not in GLOBAL:
                        problems.append(f"mirror {' '.join(path)}: no option {flag}")
                    continue
                if a.choices and a.nargs != 0 and j + 1 < len(ws):
                    for value in ws[j + 1].split("|"):
                        if re.fullmatch(r"[a-z][a-z-]*", value) and value not in a.choices:
                            problems.append(f"mirror {' '.join(path)} {flag}: no choice "
                                            f"{value!r}")
    return problems


def test_the_check_finds_a_renamed_option_and_command() -> None:
    assert check("mirror status --config F --json") == []
    assert check("mirror status|failover DOMAIN [--timeout S]") == \
        ["mirror status: no option --timeout"]
    assert check("mirror pool vm add web --memory 1") == ["mirror pool vm add: no option --memory"]
    assert check("mirror demo --guest qemu|vmware") == ["mirror demo --guest: no choice 'vmware'"]
    assert check("mirror frobnicate") == ["no command 'frobnicate'"]
    assert check("mirror pool vms add x") == ["mirror pool: no command 'vms'"]
    assert check("mirror: error: no agent") == []
    assert check("mirror pool COMMAND --etcd URL") == []
    assert check("mirror pool COMMAND --etc URL") == ["mirror pool: no option --etc"]


@pytest.mark.parametrize("page", PAGES)
def test_every_command_the_docs_show_exists(page: str) -> None:
    commands = shown(page)
    problems = [f"{page}:{n}: `{c}`: {why}" for n, c in commands for why in check(c)]
    assert not problems, "\n".join(problems)


def test_every_command_the_docs_show_takes_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`mirror CMD ... --help` for each command path the pages show: it parses (exit 0)."""
    from mirror.cli.app import main

    paths = set()
    for page in PAGES:
        for _, c in shown(page):
            ws = words(c)
            path: tuple[str, ...] = ()
            for w in ws:
                if (*path, w) not in PARSERS:
                    break
                path = (*path, w)
            if path:
                paths.add(path)
    assert len(paths) > 20, paths  # the pages show most commands
    for path in sorted(paths):
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0, path
        assert capsys.readouterr().out.startswith(f"usage: mirror {' '.join(path)}")
