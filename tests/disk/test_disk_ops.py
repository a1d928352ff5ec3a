"""Every NBD command the disk server takes is replicated: one epoch of each, then B's
replica equals A's image once that epoch commits."""

from __future__ import annotations

from pathlib import Path

from tests.disk.harness import Harness
from tests.disk.nbd import NbdClient


def test_trim_zeroes_fua_flush_and_large_requests_replicate(tmp_path: Path) -> None:
    h = Harness(tmp_path, size=64 << 20, seed=5)
    try:
        h.sync()
        c = NbdClient(h.a.spec.nbd_path)
        assert c.size == 64 << 20
        c.trim(0, 40 << 20)  # larger than any data request (32 MiB): no data, any size
        c.zeroes(40 << 20, 8 << 20)
        c.write(4096, b"x" * 4096, fua=True)
        c.write(50 << 20, b"y" * (8 << 20))
        c.flush()
        assert c.read(4096, 4096) == b"x" * 4096
        assert c.read(40 << 20, 4096) == bytes(4096)
        c.close()
        assert h.a.barrier(1) is None
        h.b.commit(1)
        assert h.a.status()["peer"]
        assert h.a_img.read_bytes() == h.b_img.read_bytes()
    finally:
        h.close()
