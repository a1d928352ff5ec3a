"""The interconnect's CurveZMQ keys: a key pair per host, the peer's public key.

`mirror keygen` writes a host's pair as two files in the ZeroMQ certificate
format (what ``zmq.auth.load_certificate`` reads): ``NAME.key`` (the public
key, for the peer) and ``NAME.key_secret`` (both keys, mode 0600, never to
leave the host).  The configuration's ``[keys]`` names this host's secret
file and the peer's public key (its file or its 40-character z85 text).
docs/security.md says what they protect.
"""

from __future__ import annotations

import binascii
import datetime
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from mirror.config import ConfigError, KeysConfig

log = logging.getLogger("mirror.replication.keys")
Z85_KEY_LEN = 40  # a 32-byte key in z85


@dataclass(frozen=True)
class LinkKeys:
    """This host's CurveZMQ key pair and the one peer key it admits (all z85)."""

    public: bytes
    secret: bytes
    peer: bytes


def fingerprint(key: bytes) -> str:
    """A short, printable name of a public key (z85 or raw): SHA-256 of the raw key."""
    raw = z85.decode(key) if len(key) == Z85_KEY_LEN else key
    return hashlib.sha256(raw).hexdigest()[:16]


def valid_z85(text: bytes) -> bool:
    if len(text) != Z85_KEY_LEN:
        return False
    try:
        return len(z85.decode(text)) == 32
    except (ValueError, KeyError, binascii.Error, TypeError):
        return False


def generate(directory: Path, name: str) -> tuple[Path, Path, bytes]:
    """Write a new key pair ``directory/name.key`` and ``.key_secret`` (0600); refuses
    to overwrite either.  Returns both paths and the public key (z85)."""
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ConfigError(f"key name must be a plain file name, got {name!r}")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--dir {directory} is not a directory: name a directory for the keys")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ConfigError(f"cannot make the key directory {directory}: {e.strerror}") from None
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for p in (pub_path, sec_path):
        if p.exists() or p.is_symlink():
            raise ConfigError(f"{p} already exists: remove it first, or choose another --name")
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    head = f"#   mirror interconnect key {name}, made {now} by `mirror keygen`\n"
    body_pub = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    body_sec = body_pub + f'    secret-key = "{secret.decode()}"\n'
    warn = "#   SECRET: keep this file on its host only (mode 0600)\n"
    try:
        _write_new(sec_path, (head + warn + body_sec).encode(), 0o600)
        _write_new(pub_path, (head + body_pub).encode(), 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write a key file in {directory}: {e.strerror}") from None
    return pub_path, sec_path, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_cert(path: Path, what: str) -> tuple[bytes | None, bytes | None]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    if len(raw) > 64 << 10:
        raise ConfigError(f"{what}: {path} is {len(raw)} bytes, not a key file")
    public = secret = None
    for line in raw.splitlines():
        line = line.strip()
        for key in (b"public-key", b"secret-key"):
            if line.startswith(key) and b"=" in line:
                value = line.split(b"=", 1)[1].strip(b" \t'\"")
                if not valid_z85(value):
                    raise ConfigError(f"{what}: {path} holds a malformed {key.decode()}")
                if key == b"public-key":
                    public = value
                else:
                    secret = value
    return public, secret


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a secret key file; it must be readable by its owner only."""
    what = "[keys] secret_key"
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    public, secret = _read_cert(path, what)  # first: a public key is no secret to guard
    if public is None or secret is None:
        if public is not None:
            raise ConfigError(
                f"{what}: {path} is a public key, not the secret one: give the .key_secret "
                f"file `mirror keygen` wrote ({path.with_suffix('.key_secret').name})"
            )
        raise ConfigError(
            f"{what}: {path} holds no secret key (give the .key_secret file `mirror keygen` "
            f"wrote, not the public .key)"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"{what}: {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"run `chmod 600 {path}` (and make new keys if others may have read it)"
        )
    if zmq.curve_public(secret) != public:
        raise ConfigError(f"{what}: {path}: its public key does not match its secret key")
    return public, secret


def parse_public(text: str, base: Path | None = None) -> bytes:
    """The z85 public key in ``text``: its 40-character z85 form, or a key file's path."""
    what = "[keys] peer_public_key"
    path = Path(text) if base is None else base / text
    # a 40-character path is valid z85 too: an existing file is a file
    if valid_z85(text.encode()) and not path.exists():
        return text.encode()
    if not path.exists():
        raise ConfigError(
            f"{what}: {text!r} is neither a 40-character z85 public key nor a key file"
        )
    public, secret = _read_cert(path, what)
    if secret is not None:
        raise ConfigError(
            f"{what}: {path} is a SECRET key file; give the peer's public key (its .key file)"
        )
    if public is None:
        raise ConfigError(f"{what}: {path} holds no public key")
    return public


HOW = (
    "make a key pair on each host with `mirror keygen --dir /etc/mirror --name HOST`, then "
    'set [keys] secret_key = "/etc/mirror/HOST.key_secret" and peer_public_key = the '
    "other host's public key (its .key file or the key `mirror keygen` printed there); "
    "or, for experiments only, [keys] insecure = true"
)


def load(k: KeysConfig) -> LinkKeys | None:
    """The keys the ``[keys]`` section ``k`` names (None: insecure, logged loudly).  A
    ConfigError says what is missing or wrong and how to make keys."""
    if k.insecure:
        if k.secret_key or k.peer_public_key:
            raise ConfigError(
                "[keys] insecure = true but keys are set too: remove one or the other"
            )
        log.warning(
            "INSECURE: [keys] insecure = true: the interconnect is neither authenticated nor "
            "encrypted; any process that reaches its ports can pair, read the guest's RAM and "
            "take over the standby.  For experiments only."
        )
        return None
    if not k.secret_key or not k.peer_public_key:
        missing = " and ".join(
            n for n, v in (("secret_key", k.secret_key), ("peer_public_key", k.peer_public_key))
            if not v
        )  # fmt: skip
        raise ConfigError(f"[keys] {missing} not set: the interconnect needs keys; {HOW}")
    public, secret = load_secret(Path(k.secret_key))
    peer = parse_public(k.peer_public_key)
    if peer == public:
        raise ConfigError(
            "[keys] peer_public_key is this host's own public key: give the other host's"
        )
    return LinkKeys(public, secret, peer)
