"""A pair as the host agent keeps it: its definition, and the files of its directory.

One directory per pair under ``STATE_DIR/pairs/PAIR/``:

- ``definition.json``: the pair (its guest, this host's role, the peer, the generation,
  the link's ports and address), rewritten atomically whenever it changes;
- ``mirror.toml``: the role's configuration, made from the definition before each start
  (:func:`role_config`);
- ``original.xml`` (the primary's host, libvirt guests): the domain's definition before
  pairing, which ``mirror unpair`` defines again; ``standby.xml`` (the secondary's): the
  definition the standby runs from;
- ``role/``: the role's state directory (its status.json, control socket, lock, and
  ``metrics.sock``, where the host agent reads its metrics); ``role.log``: its stderr
  (ROLE_LOG_MAX bytes at most: then it is moved to ``role.log.1``, one copy kept).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mirror.config import AgentConfig, Config, ConfigError, from_dict
from mirror.guests import domaincheck
from mirror.guests.libvirt import qmp_socket_in
from mirror.ha import agentmetrics, logsink
from mirror.ha.peerlink import PeerAddress
from mirror.hoststate import private_dir, read_json, write_atomic

log = logging.getLogger("mirror.ha.hostagent")  # the host agent's log, as before the split

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # a pair's name: a file name
KINDS = ("libvirt", "synthetic")


class AgentError(RuntimeError):
    """A request cannot be carried out; the message says why and what to do."""


@dataclass
class PairDef:
    """One pair as this host agent keeps it (``definition.json``)."""

    pair: str
    kind: str  # "libvirt" or "synthetic"
    role: str  # what this host runs for it now: "primary" or "secondary"
    peer: str
    generation: int = 1
    data_port: int = 0
    heartbeat_port: int = 0
    disk_port: int = 0
    domain: str = ""
    connect: str = ""
    autostart: bool = False  # the domain's autostart before pairing (restored by unpair)
    guest: dict[str, Any] = field(default_factory=dict)  # synthetic: ram_mib, ... observer
    live: bool = False  # paired live (`mirror pair --live`): private RAM read from QEMU
    state: str = "active"  # "pairing", "active", "failed: ..."
    progress: list[str] = field(default_factory=list)

    @staticmethod
    def load(path: Path) -> PairDef:
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a pair definition")
        known = set(PairDef.__dataclass_fields__)
        return PairDef(**{k: v for k, v in d.items() if k in known})


def check_name(pair: str) -> str:
    if not NAME.match(pair):
        raise AgentError(
            f"{pair!r} cannot name a pair: 1..64 letters, digits, '.', '_', '+', '-', not "
            f"starting with a punctuation mark"
        )
    return pair


def save(pdir: Path, d: PairDef) -> None:
    """Write ``d`` to ``pdir/definition.json`` (the directory made private first)."""
    private_dir(pdir)
    write_atomic(pdir / "definition.json", json.dumps(asdict(d), indent=1).encode())


def load_all(pairs_dir: Path) -> dict[str, PairDef]:
    """Every pair defined under ``pairs_dir`` (made if missing); what is not a pair's
    definition, or defines another pair than its directory's, is logged and skipped."""
    defs: dict[str, PairDef] = {}
    private_dir(pairs_dir)
    for p in sorted(pairs_dir.iterdir()):
        try:
            d = PairDef.load(p / "definition.json")
            check_name(d.pair)
        except (OSError, ValueError, TypeError, AgentError) as e:
            log.warning("ignoring %s: not a pair definition (%s)", p, e)
            continue
        if d.pair != p.name:
            log.warning("ignoring %s: it defines pair %r", p, d.pair)
            continue
        defs[d.pair] = d
    return defs


def role_config(d: PairDef, cfg: AgentConfig, peers: dict[str, PeerAddress],
                pdir: Path) -> Config:
    """The role's configuration from the definition (this host agent configuration
    ``cfg``, its ``peers``, the pair's directory ``pdir``); ConfigError if this mirror
    cannot run it (a libvirt guest without the libvirt backend)."""
    peer = peers.get(d.peer)
    if peer is None:
        raise AgentError(f"pair {d.pair}: its peer {d.peer!r} is not in [peers]")
    node = cfg.agent.node
    primary = d.role == "primary"
    # the secondary listens on its own address; the primary connects to the peer's,
    # and a promoted secondary looks for its returning peer's standby there too
    data: dict[str, Any] = {
        "pair": {"name": d.pair, "generation": d.generation},
        "node": {"name": node, "state_dir": str(pdir / "role")},
        "link": {
            "host": peer.host if primary else cfg.agent.address,
            "data_port": d.data_port,
            "heartbeat_port": d.heartbeat_port,
            "peer_host": peer.host,
        },
        "checkpoint": asdict(cfg.checkpoint),
        "arbiter": asdict(cfg.arbiter),
        "keys": {"secret_key": str(Path(cfg.keys.secret_key).resolve()),
                 "peer_public_key": peer.public_key.decode()},
        # many pairs per host: each hands its metrics to the host agent, which serves them
        # all on one port (mirror/ha/agentmetrics.py)
        "metrics": {"listen": "", "socket": str(pdir / "role" / agentmetrics.SOCKET)},
        "log": {"sink": logsink.resolve(cfg.agent.log)},
    }
    if d.kind == "synthetic":
        g = dict(d.guest)
        observer = g.pop("observer", None)
        data["guest"] = {"kind": "synthetic", **g}
        if observer:
            data["output"] = {"observer": observer}
    else:
        # the XML this host has of the domain: its own definition (the host it was
        # paired on) or the one its peer sent (the standby's host)
        names = ("original.xml", "standby.xml") if primary else ("standby.xml",
                                                                "original.xml")
        xml_file = next((pdir / n for n in names if (pdir / n).exists()), pdir / names[0])
        xml = xml_file.read_text()
        data["guest"] = {"kind": "libvirt", "ram_mib": domaincheck.check(xml).ram_mib}
        # QMP on the domain's own monitor socket when its XML adds one, else via libvirt
        qmp = "socket" if qmp_socket_in(xml) else "libvirt"
        lv: dict[str, Any] = {"domain": d.domain, "connect": d.connect, "qmp": qmp,
                              "autostart": d.autostart}  # once promoted here
        if cfg.agent.bridge:
            lv["bridge"] = cfg.agent.bridge
            lv["tap"] = f"mir{zlib.crc32(d.pair.encode()) & 0xFFFFFF:06x}"
        if not primary:
            lv["standby_xml"] = str(xml_file)
        if d.live:  # its RAM may be private: read from QEMU, the log made inside it
            lv["private_ram"] = True
        for k in ("disk_bytes", "disk_virtual"):  # its disk's export (libvirt_disk())
            if d.guest.get(k):
                lv[k] = d.guest[k]
        data["libvirt"] = lv
        data["disk"] = {"port": d.disk_port} if d.disk_port else {}
    try:
        return from_dict(data, f"pair {d.pair}'s role configuration")
    except ConfigError as e:
        if d.kind == "libvirt" and "libvirt" in str(e):
            raise AgentError(
                f"this mirror has no libvirt guest backend yet ({e}): libvirt domains "
                f"cannot be paired with it"
            ) from None
        raise


def libvirt_disk(req: dict[str, Any]) -> dict[str, Any]:
    """A libvirt pair's disk (its export's size and its virtual size, in bytes) from a
    request (untrusted: whole numbers, checked like a configuration's)."""
    g: dict[str, Any] = {k: req[k] for k in ("disk_bytes", "disk_virtual") if k in req}
    if not all(type(v) is int for v in g.values()):
        raise AgentError(f"a disk's sizes are whole numbers of bytes: {g}")
    try:
        from_dict({"libvirt": g}, "the domain's disk")
    except ConfigError as e:
        raise AgentError(str(e)) from None
    return g


def synthetic_guest(req: dict[str, Any]) -> dict[str, Any]:
    """A synthetic guest's settings from a request (checked like a configuration's)."""
    names = ("ram_mib", "dirty_pages_per_s", "outputs_per_s")
    g: dict[str, Any] = {k: req[k] for k in names if k in req}
    obs = req.get("observer")
    try:
        from_dict({"guest": g, **({"output": {"observer": obs}} if obs else {})}, "the guest")
    except ConfigError as e:
        raise AgentError(str(e)) from None
    return {**g, **({"observer": obs} if obs else {})}
