"""End to end with a QEMU guest writing its disk: strangers' HELLOs on B's disk port,
sent while the pair is live, wait there when A dies.  Before the stream was under the
pair's keys one such HELLO was taken at A's death, B won the claim and then could not
promote its replica ("the replica holds no committed checkpoint"): the guest ran
nowhere.  Now B promotes, its disk is A's at the checkpoint B committed, and the guest
goes on writing on B."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.disk import streamwire as sw
from tests.qemu.conftest import guest_image, no_leftovers, pair_factory, pair_name  # noqa: F401
from tests.qemu.test_qemu_disk import (
    disk_pair,
    disk_status,
    promoted_disk_equals,
    start_with_snapshots,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


def test_strangers_hellos_queued_during_the_pair_do_not_stop_the_failover(
    pair_factory: Any,  # noqa: F811
    guest_image: Path,  # noqa: F811
) -> None:
    p = disk_pair(pair_factory, guest_image)
    socks: list[socket.socket] = []
    try:
        snaps = {h: p.root / f"snap{h}" for h in ("A", "B")}
        a, b = start_with_snapshots(p, snaps)
        p.wait("A protected, the guest writing its disk",
               lambda: (a.status() or {}).get("phase") == "protected"
               and disk_status(p.root / "hostA").get("writes", 0) >= 20, 180)  # fmt: skip
        size, port = p.cfg_b.disk.size_mib << 20, p.cfg_b.disk.port
        for how in ("plain", "wrongkey", "wrongkey"):
            s = socket.create_connection((p.cfg_b.link.host, port), timeout=5)
            if how == "plain":  # the HELLO of the old protocol (what the stranger sent)
                text = f"{p.cfg_b.pair.name} 1 01 copy".encode()
                s.sendall(sw.rec(sw.HELLO, 0, size, len(text)) + text)
            else:  # a well-formed HELLO under a key not the pair's
                text = f"{p.cfg_b.pair.name} 01 copy aes-256-gcm {os.urandom(32).hex()}".encode()
                s.sendall(sw.rec(sw.HELLO, 1, size, len(text) + 32) + text + os.urandom(32))
            with contextlib.suppress(OSError):
                s.sendall(sw.rec(sw.SYNC_DONE, 1))
            socks.append(s)
        a.signal(signal.SIGKILL)  # host A dies, the HELLOs still waiting
        a.proc.wait()
        p.wait("B promoted", lambda: (b.status() or {}).get("role") == "primary", 30, [b])
        committed = promoted_disk_equals(p, b, snaps["B"], snaps["A"])
        assert committed >= 1
        assert disk_status(p.root / "hostB")["refused_connections"] >= 3
        p.wait("B's guest writing", lambda: disk_status(p.root / "hostB").get("writes", 0) > 5,
               30, [b])  # fmt: skip
    finally:
        for s in socks:
            s.close()
        p.close()
