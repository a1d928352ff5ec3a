"""The rig of the dirty-page log's ground-truth tests: a real `mirror secondary`
process, and here the primary's engine on a real guest (synthetic or QEMU), with
an exact compare against a shadow copy inside each pause (test-only)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from mirror.config import Config, GuestConfig
from mirror.guests.base import Guest, OutputHandler
from mirror.lab.demo import Host, pair_configs, wait_for
from mirror.replication import keys
from mirror.replication import pagediff as pd
from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.link import Endpoint, Link
from mirror.replication.outputs import OutputBuffer
from mirror.replication.standby import SHM


@dataclass
class Rig:
    engine: CheckpointEngine
    guest: Guest
    secondary: Host
    image: Path  # the standby's RAM image
    missing: dict[int, list[int]] = field(default_factory=dict)  # epoch: changed, not sent
    changed_total: int = 0

    def run(self, n: int, epoch_ms: float, *, between: Callable[[int], None] | None = None) -> None:
        """``n`` checkpoints; each checks that every page that really changed since
        the previous pause is in the checkpoint.  The guest stays paused at the last."""
        eng, guest = self.engine, self.guest
        shadow = pd.alloc_pages(eng.npages)
        changed: dict[int, list[int]] = {}
        save = guest.save_state

        def save_state() -> bytes:  # in the pause, after the engine's scan
            changed[eng.epoch + 1] = list(pd.scan_exact(guest.ram, shadow))
            return save()

        guest.save_state = save_state  # type: ignore[method-assign]
        try:
            for i in range(1, n + 1):
                if between:
                    between(i)
                # the engine's window, as run() keeps it: a send buffer is reused only once
                # its checkpoint was acknowledged (SendBuffers), so never more in flight
                window_deadline = time.monotonic() + 30
                while len(eng.in_flight) >= eng.cfg.max_in_flight:
                    assert time.monotonic() < window_deadline, "no ack for 30 s"
                    eng.pump(time.monotonic() + 0.005)
                eng.checkpoint(resume=i < n)
                sent = set(eng.in_flight[eng.epoch][0].index)
                if i > 1:  # the shadow holds RAM as of the previous pause from here on
                    self.changed_total += len(changed[eng.epoch])
                    lost = [p for p in changed[eng.epoch] if p not in sent]
                    if lost:
                        self.missing[eng.epoch] = lost
                eng.pump(time.monotonic() + epoch_ms / 1000)
            deadline = time.monotonic() + 30
            while eng.in_flight and time.monotonic() < deadline:
                eng.pump(time.monotonic() + 0.05)
            assert not eng.in_flight, "the standby did not acknowledge the last checkpoints"
        finally:
            guest.save_state = save  # type: ignore[method-assign]

    def image_differs(self) -> list[int]:
        """Pages where the standby's image is not the (paused) guest's RAM."""
        ram = self.guest.ram
        with open(self.image, "rb") as f:
            img = f.read()
        return [
            p
            for p in range(len(ram) // pd.PAGE_SIZE)
            if img[p * pd.PAGE_SIZE : (p + 1) * pd.PAGE_SIZE]
            != ram[p * pd.PAGE_SIZE : (p + 1) * pd.PAGE_SIZE]
        ]


@contextmanager
def rig(
    base: Config,
    boot: Callable[[Config, Path, OutputHandler], Guest],
    *,
    fingerprint: str = "synthetic",
) -> Iterator[Rig]:
    """A paired, pre-copied engine on a guest made by ``boot(cfg, root, on_output)``.
    The secondary runs a synthetic configuration of the same RAM size: it only
    stores pages (nothing is promoted here)."""
    with tempfile.TemporaryDirectory(prefix="mirror-dirtylog-") as tmp:
        root = Path(tmp)
        base = replace(base, pair=replace(base.pair, name=f"dl{os.getpid()}{root.name[-6:]}"))
        standby_base = replace(base, guest=replace(GuestConfig(), ram_mib=base.guest.ram_mib))
        cfg_a, cfg_b = pair_configs(root, standby_base, "127.0.0.1:9")
        cfg_a = replace(cfg_a, guest=base.guest, qemu=base.qemu, checkpoint=base.checkpoint)
        secondary = Host("hostB", "secondary", cfg_b, root)
        guest: Guest | None = None
        link = None
        engine = None
        try:
            wait_for("the secondary", secondary.status, 60, [secondary])
            outputs = OutputBuffer(lambda outs: None)
            guest = boot(cfg_a, root, outputs.add)
            link = Link.client(
                Endpoint("127.0.0.1", cfg_a.link.data_port, cfg_a.link.heartbeat_port),
                "hostA",
                keys=keys.load(cfg_a.keys),
            )
            engine = CheckpointEngine(
                guest, link, cfg_a.checkpoint, outputs, pair=cfg_a.pair.name, generation=1,
                node="hostA", fingerprint=fingerprint,
            )  # fmt: skip
            engine.handshake()
            guest.resume()
            engine.precopy()
            image = SHM / f"mirror-{cfg_b.pair.name}-{cfg_b.node.name}-standby.img"
            yield Rig(engine, guest, secondary, image)
        finally:
            if engine:
                engine.close()
            if guest:
                guest.stop()
            if link:
                link.close()
            secondary.stop()
