"""Host configuration: TOML files read into frozen dataclasses, with clear errors.

Every section and key is listed here with its default and its allowed range;
docs/configuration.md documents them.  Unknown sections or keys, wrong types and values
out of range are errors that name the file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


def _range(lo: float, hi: float) -> dict[str, Any]:
    return {"range": (lo, hi)}


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


# A pair's and a node's name are parts of file names (the arbiter's slots, the standby
# image in /dev/shm): one path component, printable, not hidden.
_FILENAME = {"filename": True}


@dataclass(frozen=True)
class PairConfig:
    name: str = field(default="mirror", metadata={**_range(1, 64), **_FILENAME})  # length
    generation: int = field(default=1, metadata=_range(1, 2**62))


@dataclass(frozen=True)
class NodeConfig:
    name: str = field(default="host", metadata={**_range(1, 64), **_FILENAME})
    state_dir: str = "/var/lib/mirror"


@dataclass(frozen=True)
class LinkConfig:
    host: str = "127.0.0.1"
    data_port: int = field(default=7400, metadata=_range(1, 65535))
    heartbeat_port: int = field(default=7401, metadata=_range(1, 65535))
    # with keys, where the secondary takes the sealed pages (0: a port the system picks,
    # named in its WELCOME under CURVE); docs/security.md "What is encrypted"
    bulk_port: int = field(default=0, metadata=_range(0, 65535))
    heartbeat_interval_ms: int = field(default=100, metadata=_range(5, 10000))
    peer_host: str = ""  # where a promoted node finds its returning peer's standby (default: host)
    pair_timeout_s: int = field(default=30, metadata=_range(1, 3600))  # HELLO unanswered: fail


@dataclass(frozen=True)
class CheckpointConfig:
    epoch_ms: int = field(default=50, metadata=_range(10, 1000))
    max_in_flight: int = field(default=2, metadata=_range(1, 16))
    scan: str = field(default="auto", metadata=_choices("auto", "log", "hashed", "exact"))
    threads: int = field(default=2, metadata=_range(1, 64))
    encoding: str = field(default="raw", metadata=_choices("raw", "delta"))
    precopy_chunk_mib: int = field(default=32, metadata=_range(1, 4096))
    verify_slices: int = field(default=64, metadata=_range(0, 1 << 20))  # 0: no safety net
    # the throttle: a guest dirtying faster than the pair replicates is slowed so that each
    # checkpoint's pause fits this budget (and its bytes what the pair commits in an
    # epoch); 0: no throttle
    max_pause_ms: int = field(default=0, metadata=_range(0, 10_000))
    # send while the guest runs (with the dirty-page log, raw encoding): at early_send_at_pct
    # of the time from the resume to the next stop (and, with early_sends = N, at N points
    # evenly spread up to it) the pages
    # written so far go to the standby as an uncommitted part of the epoch, so the pause
    # carries only what was written since; skipped when the previous epoch had fewer than
    # early_send_min_pages dirty pages or the window of checkpoints in flight is full (on by
    # default; without the log or with delta encoding it is off, status early_send.note why)
    early_send: bool = True
    early_send_at_pct: int = field(default=60, metadata=_range(10, 95))
    early_sends: int = field(default=1, metadata=_range(1, 4))
    early_send_min_pages: int = field(default=256, metadata=_range(0, 1 << 30))


@dataclass(frozen=True)
class GuestConfig:
    kind: str = field(default="synthetic", metadata=_choices("synthetic", "qemu", "libvirt"))
    ram_mib: int = field(default=256, metadata=_range(1, 1 << 20))
    dirty_pages_per_s: int = field(default=20000, metadata=_range(0, 10**8))
    outputs_per_s: int = field(default=200, metadata=_range(1, 100_000))
    shape: str = field(default="uniform", metadata=_choices("uniform", "hot", "sequential"))
    hot_pct: int = field(default=10, metadata=_range(1, 100))
    seed: int = field(default=1, metadata=_range(0, 2**63 - 1))
    fill_pct: int = field(default=50, metadata=_range(0, 100))
    # the guest writes pages only until its Nth output, then only emits (0: always)
    dirty_outputs: int = field(default=0, metadata=_range(0, 2**63 - 1))


@dataclass(frozen=True)
class QemuConfig:
    """A QEMU guest (guest.kind = "qemu"); guest.ram_mib is its RAM.  Both hosts of a
    pair must run the same QEMU version and machine configuration."""

    binary: str = "qemu-system-x86_64"
    accel: str = field(default="tcg", metadata=_choices("tcg", "kvm"))
    machine: str = field(default="q35", metadata=_range(1, 64))
    vcpus: int = field(default=1, metadata=_range(1, 64))
    kernel: str = ""  # the guest kernel (`mirror image build` makes one)
    initrd: str = ""
    append: str = "console=ttyS0 quiet mirror.ip=10.0.0.10/24"
    mac: str = field(default="52:54:00:12:34:56", metadata=_range(17, 17))
    tap: str = field(default="", metadata=_range(0, 15))  # "": the NIC reaches no network
    bridge: str = field(default="", metadata=_range(0, 15))


@dataclass(frozen=True)
class LibvirtConfig:
    """A libvirt domain (guest.kind = "libvirt"); guest.ram_mib must be its RAM.  The
    primary attaches to the running domain; the secondary runs a paused standby of it."""

    domain: str = field(default="", metadata=_range(0, 200))  # the domain's name
    connect: str = field(default="qemu:///system", metadata=_range(1, 1000))  # libvirt URI
    # how mirror sends QMP: through libvirt (untainted) or a monitor socket of its own
    # that the domain's XML adds with <qemu:commandline> -qmp (tainted custom-argv)
    qmp: str = field(default="socket", metadata=_choices("libvirt", "socket"))
    qmp_socket: str = ""  # "socket": its path as this host sees it ("": from the XML)
    standby_xml: str = ""  # secondary: the domain XML of the standby ("": the domain here)
    tap: str = field(default="", metadata=_range(0, 15))  # where released frames go
    bridge: str = field(default="", metadata=_range(0, 15))
    # the domain's autostart once promoted here (its autostart before it was paired)
    autostart: bool = False
    # a domain paired live (`mirror pair --live`): private anonymous RAM (no <memoryBacking>)
    # is read from QEMU's process and its dirty-page log made inside QEMU by injection
    # (mirror/guests/procram.py); false: such a domain is refused (`--prepare` and a restart)
    private_ram: bool = False
    # its one writable disk, replicated through mirror's disk server (mirror/guests/
    # libvirtdisk.py): the NBD export's size in bytes, which both hosts must agree on, and
    # the disk's virtual size; the host agent sets both at pairing (0: from the image)
    disk_bytes: int = field(default=0, metadata=_range(0, 1 << 60))
    disk_virtual: int = field(default=0, metadata=_range(0, 1 << 60))


@dataclass(frozen=True)
class DiskConfig:
    """The guest's disk (QEMU guests): a raw image served by mirror's disk server and
    replicated per checkpoint to the secondary.  size_mib = 0: no disk."""

    size_mib: int = field(default=0, metadata=_range(0, 1 << 24))
    image: str = ""  # the raw image on this host ("": state_dir/disk.img)
    port: int = field(default=7402, metadata=_range(1, 65535))  # the secondary's disk stream
    journal_mib: int = field(default=256, metadata=_range(64, 1 << 20))
    workers: int = field(default=4, metadata=_range(1, 64))
    stall_ms: int = field(default=5000, metadata=_range(100, 600_000))
    # while the primary's disk runs on the secondary's storage: how often it tries its own
    probe_ms: int = field(default=1000, metadata=_range(10, 600_000))
    # a call on the primary's own image that has not returned in this long: the image hangs,
    # and the disk fails over to the secondary's replica as for an I/O error (0: no deadline)
    hang_ms: int = field(default=2000, metadata=_range(0, 600_000))


@dataclass(frozen=True)
class ArbiterConfig:
    # the storage both hosts share (an NFS mount, a shared disk): no default, as a local
    # folder on each host would let both run the guest (require_arbiter)
    dir: str = ""
    etcd: str = ""  # http://HOST:PORT: slots and claims on etcd instead of in dir
    # the etcd arbiter's keys are under PREFIX/PAIR/
    etcd_prefix: str = field(default="/mirror/arbiter", metadata=_range(1, 200))
    heartbeat_interval_ms: int = field(default=100, metadata=_range(5, 10000))
    silent_after_ms: int = field(default=500, metadata=_range(10, 600_000))
    fence_after_ms: int = field(default=2000, metadata=_range(50, 3_600_000))


@dataclass(frozen=True)
class OutputConfig:
    observer: str = "127.0.0.1:7500"  # HOST:PORT that receives released outputs

    def address(self) -> tuple[str, int]:
        return parse_hostport(self.observer, "output.observer")


@dataclass(frozen=True)
class KeysConfig:
    """The interconnect's CurveZMQ keys (docs/security.md): this host's secret key file
    (`mirror keygen` writes one) and the peer's public key, a file or its 40-character
    z85 text.  ``insecure``: no keys, no encryption (experiments only)."""

    secret_key: str = ""
    peer_public_key: str = ""
    insecure: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT where the role serves Prometheus metrics (/metrics); "" serves none
    listen: str = "127.0.0.1:9470"
    # a unix socket (absolute path) where the role hands its metrics to the host agent,
    # which serves every pair's on its one port ([agent] metrics_listen); "": none
    socket: str = ""

    def address(self) -> tuple[str, int] | None:
        if self.socket and not self.socket.startswith("/"):
            raise ConfigError(f"metrics.socket must be an absolute path, got {self.socket!r}")
        return parse_hostport(self.listen, "metrics.listen") if self.listen else None


LOG_KINDS = ("journal", "syslog")
LOG_SOCKETS = {"journal": "/run/systemd/journal/socket", "syslog": "/dev/log"}


def parse_log_sink(text: str, where: str) -> tuple[str, str] | None:
    """A log sink: "" (none), "journal" or "syslog" (their usual sockets), or
    "journal:/PATH" / "syslog:/PATH" (a unix datagram socket); (kind, path) or None."""
    if not text:
        return None
    kind, sep, path = text.partition(":")
    if kind in LOG_KINDS and (not sep or path.startswith("/")):
        return kind, path or LOG_SOCKETS[kind]
    raise ConfigError(
        f'{where} must be "", "journal", "syslog", "journal:/PATH" or "syslog:/PATH", '
        f"got {text!r}"
    )


@dataclass(frozen=True)
class LogConfig:
    """Where the role also sends its log lines, with the pair as a field (the host agent
    sets it from [agent] log): journald's native socket or syslog; "": stderr only."""

    sink: str = ""

    def target(self) -> tuple[str, str] | None:
        return parse_log_sink(self.sink, "log.sink")


@dataclass(frozen=True)
class Config:
    pair: PairConfig = PairConfig()
    node: NodeConfig = NodeConfig()
    link: LinkConfig = LinkConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    guest: GuestConfig = GuestConfig()
    qemu: QemuConfig = QemuConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    disk: DiskConfig = DiskConfig()
    output: OutputConfig = OutputConfig()
    arbiter: ArbiterConfig = ArbiterConfig()
    keys: KeysConfig = KeysConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    @property
    def state_dir(self) -> Path:
        return Path(self.node.state_dir)

    @property
    def disk_image(self) -> Path:
        return Path(self.disk.image) if self.disk.image else self.state_dir / "disk.img"


def parse_hostport(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT with a port in 1..65535, got {text!r}")
    return host.strip("[]"), int(port)


def _check_value(cls: type, f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    want = get_type_hints(cls)[f.name]
    if want is bool and type(value) is not bool:
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    if want is int and (type(value) is not int):
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    if want is str and type(value) is not str:
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    if isinstance(value, str) and "\0" in value:
        raise ConfigError(f"{where}: must not contain a NUL character, got {value!r}")
    if f.metadata.get("filename") and (
        not value.isprintable() or "/" in value or "\\" in value or value.startswith(".")
    ):
        raise ConfigError(
            f"{where}: is part of file names: printable characters, no '/' or '\\', not "
            f"starting with '.', got {value!r}"
        )
    if "range" in f.metadata:
        lo, hi = f.metadata["range"]
        measured = len(value) if isinstance(value, str) else value
        if not lo <= measured <= hi:
            what = "length" if isinstance(value, str) else "value"
            raise ConfigError(f"{where}: {what} must be within {lo}..{hi}, got {value!r}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ConfigError(
            f"{where}: must be one of {', '.join(f.metadata['choices'])}, got {value!r}"
        )
    return value


def _section(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}"
        )
    return cls(**{k: _check_value(cls, fields[k], v, f"{where}.{k}") for k, v in table.items()})


def from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = get_type_hints(Config)
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}"
        )
    cfg = Config(
        **{
            name: _section(hints[name], table, f"{source}: [{name}]")
            for name, table in data.items()
        }
    )
    if cfg.link.data_port == cfg.link.heartbeat_port:
        raise ConfigError(
            f"{source}: [link] data_port and heartbeat_port must differ, "
            f"both are {cfg.link.data_port}"
        )
    if cfg.link.bulk_port and cfg.link.bulk_port in (cfg.link.data_port, cfg.link.heartbeat_port):
        raise ConfigError(
            f"{source}: [link] bulk_port {cfg.link.bulk_port} is also the data or heartbeat "
            f"port: pick another, or 0 (a port the system picks)"
        )
    if cfg.disk.size_mib and cfg.guest.kind != "qemu":
        raise ConfigError(
            f"{source}: [disk] size_mib = {cfg.disk.size_mib}: a disk needs guest.kind = "
            f'"qemu" (got {cfg.guest.kind!r}); set size_mib = 0 for no disk'
        )
    if cfg.guest.kind == "libvirt" and not cfg.libvirt.domain:
        raise ConfigError(
            f'{source}: guest.kind = "libvirt" needs [libvirt] domain = "NAME" (the domain '
            f"to mirror)"
        )
    if cfg.disk.size_mib and cfg.disk.port in (cfg.link.data_port, cfg.link.heartbeat_port):
        raise ConfigError(
            f"{source}: [disk] port {cfg.disk.port} is also a [link] port: pick another"
        )
    cfg.output.address()
    check_key_prefix(cfg.arbiter.etcd_prefix, f"{source}: [arbiter] etcd_prefix")
    cfg.metrics.address()
    cfg.log.target()
    return cfg


def require_arbiter(arbiter: ArbiterConfig, where: str) -> None:
    """A configuration that runs a pair's role (or a host agent's pairs) names its arbiter:
    ``[arbiter] dir`` (storage both hosts share) or ``[arbiter] etcd``.  There is no
    default: a local folder on each host is two arbiters, and both hosts would win."""
    if not arbiter.dir and not arbiter.etcd:
        raise ConfigError(
            f"{where}: [arbiter] dir is not set: name the storage both hosts share (an NFS "
            f"mount or a shared disk), or set [arbiter] etcd; there is no default, as a "
            f"local folder on each host would let both run the guest"
        )


def check_key_prefix(text: str, where: str) -> str:
    """An etcd key prefix: ``/`` then letters, digits, ``.``, ``_``, ``-`` and ``/`` (no
    empty segment).  Returns it with exactly one trailing ``/``."""
    body = text.strip("/")
    if not text.startswith("/") or not body or "//" in text.rstrip("/") or len(text) > 200 \
            or not all(c.isascii() and (c.isalnum() or c in "._-/") for c in body):
        raise ConfigError(
            f"{where}: bad etcd key prefix {text!r}: expected /NAME[/NAME...] of letters, "
            f"digits, '.', '_', '-' (e.g. /mirror/pool-b/)"
        )
    return "/" + body + "/"


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): "
            f"TOML files are UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return from_dict(data, str(path))


def to_toml(cfg: Config) -> str:
    """The TOML text of ``cfg`` (every key written out)."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            v = getattr(getattr(cfg, section.name), f.name)
            if isinstance(v, bool):
                lines.append(f"{f.name} = {str(v).lower()}")
            elif isinstance(v, str):
                lines.append(f"{f.name} = {json.dumps(v)}")
            else:
                lines.append(f"{f.name} = {v}")
        lines.append("")
    return "\n".join(lines)


# -- the host agent's configuration (`mirror agent`, /etc/mirror/agent.toml) ---------------------


@dataclass(frozen=True)
class AgentSection:
    """The host agent (`mirror agent`): who it is, where it keeps its pairs, where peers
    reach it."""

    node: str = field(default="host", metadata={**_range(1, 64), **_FILENAME})
    state_dir: str = "/var/lib/mirror/agent"  # control.sock, agent.lock, pairs/PAIR/
    address: str = "127.0.0.1"  # this host's interconnect address (peers' host agents and pairs)
    port: int = field(default=7600, metadata=_range(1, 65535))  # the host agents' interconnect
    pair_ports_from: int = field(default=7610, metadata=_range(1, 65535))  # pairs' link ports
    pair_ports_to: int = field(default=7699, metadata=_range(1, 65535))
    connect: str = field(default="qemu:///system", metadata=_range(1, 256))  # libvirt URI
    bridge: str = field(default="", metadata=_range(0, 15))  # where guests' frames go
    # where the files a peer's standby XML names may be (":"-separated; state_dir too)
    domain_dirs: str = field(
        default="/var/lib/libvirt:/var/log/libvirt:/run/libvirt:/var/cache/libvirt:"
        "/var/lib/mirror:/var/cache/mirror",
        metadata=_range(1, 4096),
    )
    # HOST:PORT where the host agent serves every pair's metrics (/metrics, each series with
    # its pair's label); "" serves none
    metrics_listen: str = "127.0.0.1:9470"
    # where the roles also log, with the pair as a field: "auto" (journald's socket when
    # it exists, else /dev/log, else nowhere), "journal", "syslog", "journal:/PATH",
    # "syslog:/PATH", or "none" (only STATE_DIR/pairs/PAIR/role.log)
    log: str = "auto"


@dataclass(frozen=True)
class AgentKeys:
    secret_key: str = ""  # this host's secret key file (`mirror keygen`)


@dataclass(frozen=True)
class PeerConfig:
    """A host whose host agent this one works with (``[peers.NAME]``)."""

    address: str = ""  # its interconnect address
    port: int = field(default=7600, metadata=_range(1, 65535))  # its host agent's port
    public_key: str = ""  # its public key: its .key file or the 40-character z85 text


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection = AgentSection()
    keys: AgentKeys = AgentKeys()
    arbiter: ArbiterConfig = ArbiterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    peers: dict[str, PeerConfig] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return Path(self.agent.state_dir)


DEFAULT_AGENT_CONFIG = "/etc/mirror/agent.toml"


def agent_from_dict(data: dict[str, Any], source: str = "<agent config>") -> AgentConfig:
    known = {"agent": AgentSection, "keys": AgentKeys, "arbiter": ArbiterConfig,
             "checkpoint": CheckpointConfig}
    unknown = sorted(set(data) - {*known, "peers"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(unknown)}; known: "
            f"{', '.join([*known, 'peers'])}"
        )
    parts = {k: _section(cls, data[k], f"{source}: [{k}]") for k, cls in known.items()
             if k in data}
    peers_raw = data.get("peers", {})
    if not isinstance(peers_raw, dict):
        raise ConfigError(f"{source}: [peers] must hold tables [peers.NAME], got {peers_raw!r}")
    peers = {}
    name_field = next(f for f in dataclasses.fields(AgentSection) if f.name == "node")
    for name, table in peers_raw.items():
        _check_value(AgentSection, name_field, name, f"{source}: [peers.{name}] (its name)")
        p = _section(PeerConfig, table, f"{source}: [peers.{name}]")
        if not p.address or not p.public_key:
            raise ConfigError(
                f"{source}: [peers.{name}] needs address and public_key (the peer's .key "
                f"file or its z85 key), got address={p.address!r} public_key={p.public_key!r}"
            )
        peers[name] = p
    cfg = AgentConfig(**parts, peers=peers)
    a = cfg.agent
    if a.pair_ports_to - a.pair_ports_from < 2:
        raise ConfigError(
            f"{source}: [agent] pair_ports_from..pair_ports_to must span at least 3 ports (a "
            f"pair takes 3), got {a.pair_ports_from}..{a.pair_ports_to}"
        )
    if a.pair_ports_from <= a.port <= a.pair_ports_to:
        raise ConfigError(
            f"{source}: [agent] port {a.port} is inside pair_ports_from..pair_ports_to "
            f"({a.pair_ports_from}..{a.pair_ports_to}): pick one outside"
        )
    if a.node in peers:
        raise ConfigError(f"{source}: [peers.{a.node}] is this host itself ([agent] node)")
    relative = [d for d in a.domain_dirs.split(":") if d and not d.startswith("/")]
    if relative:
        raise ConfigError(
            f"{source}: [agent] domain_dirs must list absolute directories separated by "
            f"':', got {', '.join(map(repr, relative))}"
        )
    check_key_prefix(cfg.arbiter.etcd_prefix, f"{source}: [arbiter] etcd_prefix")
    if a.metrics_listen:
        parse_hostport(a.metrics_listen, f"{source}: [agent] metrics_listen")
    if a.log not in ("auto", "none"):
        try:
            parse_log_sink(a.log, "")
        except ConfigError:
            raise ConfigError(
                f'{source}: [agent] log must be "auto", "none", "journal", "syslog", '
                f'"journal:/PATH" or "syslog:/PATH", got {a.log!r}'
            ) from None
    return cfg


def load_agent(path: str | Path) -> AgentConfig:
    """The host agent's configuration file (ConfigError naming the file and key)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the host agent configuration {path}: {e.strerror} (give it with "
            f"--agent-config, see docs/configuration.md)"
        ) from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text: TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return agent_from_dict(data, str(path))
