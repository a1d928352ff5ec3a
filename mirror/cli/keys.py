"""`mirror keygen`: this host's interconnect key pair (CurveZMQ); `mirror keys reload`:
the running role, or this host agent and every role it runs, reads its keys again."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mirror.cli import output
from mirror.cli.args import DEFAULT_AGENT_CONFIG

if TYPE_CHECKING:  # imported by the commands: not by `mirror --help`
    from mirror.config import Config


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "keygen",
        help="write this host's interconnect key pair (CurveZMQ; see docs/security.md)",
    )
    p.add_argument("--dir", default="/etc/mirror", help="where to write it (default /etc/mirror)")
    p.add_argument(
        "--name",
        default=os.uname().nodename,  # socket.gethostname(), without socket
        help="file name: NAME.key (public) and NAME.key_secret (mode 0600); default: "
        "this host's name",
    )

    p = sub.add_parser("keys", help="the running role's interconnect keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser(
        "reload",
        help="make the running role read its [keys] and key files again (as SIGHUP does)",
    )
    k.add_argument("--config", help="the role's configuration (a role run by hand); without "
                   "it: this host agent (`mirror agent`) and every role it runs")
    k.add_argument("--agent-config", default=DEFAULT_AGENT_CONFIG, metavar="F",
                   help=f"without --config: the host agent's configuration (default "
                        f"{DEFAULT_AGENT_CONFIG})")


def keygen(args: argparse.Namespace) -> int:
    from mirror.replication import keys  # zmq

    # absolute paths: a role's configuration reads [keys] secret_key from wherever it runs
    pub, sec, key = keys.generate(Path(args.dir).absolute(), args.name)
    print(f"secret key: {sec} (mode 0600; keep it on this host)")
    print(f"public key: {pub}")
    print(f"public key (z85): {key.decode()}")
    print(f'on this host:  [keys] secret_key = "{sec}"')
    print(f'on its peer:   [keys] peer_public_key = "{key.decode()}"')
    return output.OK


AGENT_RELOAD_WAIT_S = 120.0  # `mirror keys reload` through the host agent: every role's reload


def reload_keys(cfg: Config) -> int:
    """`mirror keys reload --config F`: the running role reads its keys again."""
    from mirror.ha import control, rekey  # zmq

    return print_reload(control.ask(cfg.state_dir, "reload-keys", timeout=rekey.APPLY_WAIT_S + 5))


def print_reload(answer: dict[str, Any]) -> int:
    """The role's (or the host agent's) answer to reload-keys."""
    if not answer.get("reloaded"):
        return output.error(f"keys not reloaded (the keys in use stay): {answer.get('error')}")
    what = "changed: connections made with the old keys end" if answer.get("changed") else (
        "unchanged")  # fmt: skip
    if "peers" in answer:  # the host agent's: its peers' keys and its roles' reloads
        print(f"keys reloaded ({what}); this host's key {answer.get('own_key')} (fingerprint)")
        for name, fp in sorted(dict(answer["peers"]).items()):
            print(f"  peer {name}: {fp}")
        for pair, how in sorted(dict(answer.get("roles") or {}).items()):
            print(f"  pair {pair}: {how}")
        return output.OK
    print(f"keys reloaded ({what}); this host's key {answer.get('own_key')}, the peer's key "
          f"{answer.get('peer_key')} (fingerprints)")  # fmt: skip
    return output.OK
