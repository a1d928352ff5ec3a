"""A primary facing the wrong peer: something keyless on the standby's ports (a peer left
with ``insecure = true``, or another program), or a standby that does not admit its key.
It fails with a clear error in bounded time (``link.pair_timeout_s``), stops on SIGTERM
at any moment, leaves nothing behind, and pairs as soon as the right standby listens."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from mirror.lab.demo import Host
from tests.integration.conftest import Pair, shm_files
from tests.security.strangers import stranger_keys


@contextmanager
def keyless_listener(pair: Pair) -> Iterator[None]:
    """zmq sockets without CURVE bound on the standby's data and heartbeat ports."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = []
    try:
        for port in (pair.cfg_b.link.data_port, pair.cfg_b.link.heartbeat_port):
            s = ctx.socket(zmq.ROUTER)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(f"tcp://127.0.0.1:{port}")
            socks.append(s)
        yield
    finally:
        for s in socks:
            s.close()
        ctx.term()


def short_timeout(pair: Pair, seconds: int) -> None:
    pair.cfg_a = replace(pair.cfg_a, link=replace(pair.cfg_a.link, pair_timeout_s=seconds))


def exits(host: Host, within: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = host.proc.wait(within)
    except Exception:
        pytest.fail(f"{host.name} still runs after {within} s:\n{host.log_tail()}")
    return code, time.monotonic() - t0


def pairing(host: Host) -> bool:
    st = host.status()
    return st is not None and st.get("phase") == "pairing"


def test_a_keyless_listener_fails_pairing_in_bounded_time(pair: Pair, pair_name: str) -> None:
    short_timeout(pair, 4)
    with keyless_listener(pair):
        a = pair.start_primary()
        pair.wait("the primary pairing", lambda: pairing(a))
        code, took = exits(a, 15)
    log = a.log_path.read_text()
    assert code == 2, log
    assert "completed a CURVE handshake" in log and "insecure = true" in log, log
    assert "Traceback" not in log
    assert not shm_files(pair_name), "the guest's RAM file was left behind"
    print(f"keyless listener: the primary exited {code} {took:.1f} s after it began pairing")


def test_sigterm_stops_a_primary_stuck_pairing(pair: Pair, pair_name: str) -> None:
    with keyless_listener(pair):
        a = pair.start_primary()
        pair.wait("the primary pairing", lambda: pairing(a))
        time.sleep(3)  # past the first HELLO's send: the next one finds no connection
        a.proc.send_signal(signal.SIGTERM)
        code, took = exits(a, 5)
    assert code == 0, a.log_tail()
    assert not shm_files(pair_name), "the guest's RAM file was left behind"
    assert "Traceback" not in a.log_path.read_text()
    print(f"SIGTERM while pairing: exited {code} in {took:.2f} s")


def test_a_standby_with_another_peer_key_fails_pairing(pair: Pair, tmp_path: Path) -> None:
    short_timeout(pair, 4)
    other = stranger_keys(tmp_path / "other", b"")  # B admits this key, not A's
    pair.cfg_b = replace(
        pair.cfg_b,
        keys=replace(pair.cfg_b.keys, peer_public_key=other.public.decode()),
    )
    b = pair.start_secondary()
    a = pair.start_primary()
    code, _ = exits(a, 30)
    assert code == 2 and "completed a CURVE handshake" in a.log_path.read_text(), a.log_tail()
    assert b.proc.poll() is None, "the standby must live on"


def test_pairs_once_the_right_standby_replaces_a_keyless_listener(pair: Pair) -> None:
    with keyless_listener(pair):
        a = pair.start_primary()
        pair.wait("the primary pairing", lambda: pairing(a))
        time.sleep(3)  # several HELLOs refused by the handshake
    pair.start_secondary()
    pair.wait(
        "the pair protected",
        lambda: (a.status() or {}).get("protection") == "protected",
        timeout=25,
    )

