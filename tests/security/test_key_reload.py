"""Key rotation without restarting the secondary: host A gets a new key pair, B is given
its public key, and a SIGHUP (or `mirror keys reload`) makes B's running standby admit
the new key and refuse the old one (real processes, CurveZMQ on loopback)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from mirror.replication import keys
from tests.integration.conftest import Pair
from tests.security.strangers import Stranger
from tests.security.test_strangers import endpoint


def reload(cfg_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror", "keys", "reload", "--config", str(cfg_path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def protected(host: object, acked: int = 5) -> object:
    s = host.status()  # type: ignore[attr-defined]
    return s and s["protection"] == "protected" and s["acked"] >= acked and s


def refused(pair: Pair, b: object, link_keys: keys.LinkKeys) -> None:
    """A process holding ``link_keys`` gets no answer from B to anything, and B logs the
    refusal of that key."""
    stranger = Stranger(endpoint(pair), pair.cfg_a.pair.name, pair.cfg_a.guest.ram_mib << 20,
                        link_keys).start()  # fmt: skip
    try:
        pair.wait("B refusing the key", lambda: keys.fingerprint(link_keys.public)
                  in b.log_path.read_text())  # type: ignore[attr-defined]  # fmt: skip
        time.sleep(1.0)
    finally:
        stranger.stop()
    assert stranger.rounds > 0 and stranger.replies == []


def test_sighup_admits_the_rotated_key_and_refuses_the_old(pair: Pair, tmp_path: Path) -> None:
    b = pair.start_secondary()
    a = pair.start_primary()
    pair.wait("A protected", lambda: protected(a))
    old = keys.load(pair.cfg_a.keys)
    assert old is not None
    # rotation on A: a new key pair; B's configured peer key file gets its public key
    new_pub, new_sec, new_key = keys.generate(tmp_path / "rotated", "hostA-2")
    _, new_secret = keys.load_secret(new_sec)
    a.stop()  # A's role restarts with its new key (BYE: B stands down, not promoting)
    pair.hosts.remove(a)
    peer_file = Path(pair.cfg_b.keys.peer_public_key)
    peer_file.write_bytes(new_pub.read_bytes())
    # B runs with the keys it started with: A's new key is refused at the transport
    refused(pair, b, keys.LinkKeys(new_key, new_secret, old.peer))
    b.signal(signal.SIGHUP)
    pair.wait("B's reload", lambda: '"event": "keys-reloaded"' in b.log_path.read_text())
    assert '"changed": true' in b.log_path.read_text()
    # now the old key is refused, and A with its new key pairs: protected again
    refused(pair, b, keys.LinkKeys(old.public, old.secret, old.peer))
    pair.cfg_a = replace(pair.cfg_a, keys=replace(pair.cfg_a.keys, secret_key=str(new_sec)))
    a2 = pair.start_primary()
    pair.wait("A protected with its new key", lambda: protected(a2), timeout=60)
    assert b.proc.poll() is None

    # `mirror keys reload`: a bad file changes nothing (one line, exit 2), a good one
    # that did not change is "unchanged"; the pair stays protected all along
    good = peer_file.read_bytes()
    peer_file.write_bytes(b"not a key\n")
    run = reload(b.config_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("mirror: error: keys not reloaded"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    peer_file.write_bytes(good)
    run = reload(b.config_path)
    assert run.returncode == 0 and "keys reloaded (unchanged)" in run.stdout, run.stderr
    assert keys.fingerprint(new_key) in run.stdout
    before = a2.status()["acked"]  # type: ignore[index]
    pair.wait("checkpoints go on", lambda: protected(a2, before + 5))
