"""A real standby process fed by a test driver that speaks the protocol as a primary would.

The driver keeps its own RAM and shadow and builds checkpoints with the
page-diff engine, so it can damage one on purpose: the standby must reject
it, reset the session, and keep the image exactly at the last commit.
"""

from __future__ import annotations

import random
from array import array
from pathlib import Path

import msgpack
import pytest

from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.link import Endpoint, Link
from tests.integration.conftest import Pair

PS = pd.PAGE_SIZE


class Driver:
    def __init__(self, pair: Pair) -> None:
        cfg = pair.cfg_b
        self.cfg = cfg
        self.link = Link.client(
            Endpoint("127.0.0.1", cfg.link.data_port, cfg.link.heartbeat_port), "driver"
        )
        self.npages = (cfg.guest.ram_mib << 20) // PS
        self.ram = pd.alloc_pages(self.npages)
        self.shadow = pd.alloc_pages(self.npages)
        self.rnd = random.Random(5)
        self.epoch = 0

    def hello(self, **change: object) -> wire.Message:
        h = wire.Hello(self.cfg.pair.name, self.cfg.pair.generation, "driver", self.npages * PS)
        fields = {**h.__dict__, **change}
        self.link.send(wire.Hello(**fields))  # type: ignore[arg-type]
        return self.reply()

    def reply(self) -> wire.Message:
        msg = self.link.recv(10)
        assert msg is not None, "the standby did not answer"
        return msg

    def build(self, epoch: int, pages: range | list[int] | None = None) -> wire.Pages:
        if pages is None:  # a checkpoint: some pages changed since the last one
            for p in self.rnd.sample(range(self.npages), 40):
                off = self.rnd.randrange(PS - 8)
                self.ram[p * PS + off : p * PS + off + 8] = self.rnd.randbytes(8)
            pages = pd.scan_exact(self.ram, self.shadow)
        else:
            pd.scan_exact(self.ram, self.shadow)
        batch = pd.gather(self.shadow, pages)
        sums = pd.checksums(self.shadow, batch.index)
        state = b"device-state-%d" % epoch
        return wire.Pages.of(epoch, batch, sums, state=state, outputs=[(epoch, b"out")])

    def send(self, msg: wire.Pages) -> wire.Message:
        self.link.send(msg)
        return self.reply()

    def send_frames(self, frames: list[bytes]) -> wire.Message:
        self.link.data.send_multipart(frames)
        return self.reply()


def image_of(pair: Pair) -> bytes:
    return Path(f"/dev/shm/mirror-{pair.cfg_b.pair.name}-hostB-standby.img").read_bytes()


@pytest.fixture
def driver(pair: Pair):  # type: ignore[no-untyped-def]
    pair.start_secondary()
    d = Driver(pair)
    yield d
    d.link.close()


def test_corrupt_and_truncated_checkpoints_leave_the_last_commit(
    pair: Pair, driver: Driver
) -> None:
    assert isinstance(driver.hello(), wire.Welcome)
    driver.ram[:] = random.Random(1).randbytes(len(driver.ram))
    assert driver.send(driver.build(0, range(driver.npages))) == wire.Ack(0, 0)
    for epoch in (1, 2, 3):
        assert driver.send(driver.build(epoch)) == wire.Ack(epoch, 0)
    at_3 = bytes(driver.ram)
    assert image_of(pair) == at_3

    good = driver.build(4)
    frames = [bytes(f) for f in wire.encode(good)]

    # one flipped bit in the page data: the per-page checksum catches it
    bad = list(frames)
    data = bytearray(bad[6])  # the first data frame
    data[len(data) // 2] ^= 0x10
    bad[6] = bytes(data)
    reply = driver.send_frames(bad)
    assert isinstance(reply, wire.Reject) and "does not verify" in reply.reason
    assert image_of(pair) == at_3

    # the session was reset: pages without a new HELLO are refused
    reply = driver.send(good)
    assert isinstance(reply, wire.Reject) and "no session" in reply.reason
    assert image_of(pair) == at_3

    # a truncated checkpoint (the data frame cut short) is a malformed frame
    assert driver.hello() == wire.Welcome(pair.cfg_b.pair.name, 1, "hostB", 3)
    cut = list(frames)
    cut[6] = frames[6][: len(frames[6]) - 100]
    reply = driver.send_frames(cut)
    assert isinstance(reply, wire.Reject) and "malformed frame" in reply.reason
    # a frame missing altogether
    assert isinstance(driver.hello(), wire.Welcome)
    reply = driver.send_frames(frames[:-1])
    assert isinstance(reply, wire.Reject) and "7" in reply.reason
    # a damaged device state
    assert isinstance(driver.hello(), wire.Welcome)
    st = list(frames)
    st[5] = b"Device-state-4"
    reply = driver.send_frames(st)
    assert isinstance(reply, wire.Reject) and "device state" in reply.reason
    assert image_of(pair) == at_3
    assert (pair.root / "hostB" / "committed.state").read_bytes() == b"device-state-3"

    # the intact checkpoint commits after a new HELLO
    assert driver.hello() == wire.Welcome(pair.cfg_b.pair.name, 1, "hostB", 3)
    assert driver.send(good) == wire.Ack(4, 0)
    assert image_of(pair) == bytes(driver.ram)
    assert (pair.root / "hostB" / "committed.state").read_bytes() == b"device-state-4"

    # out of order: checkpoint 6 before 5
    driver.build(5)
    reply = driver.send(driver.build(6))
    assert isinstance(reply, wire.Reject) and "out of order" in reply.reason


def test_wrong_version_pair_generation_size_and_guest_are_refused(
    pair: Pair, driver: Driver
) -> None:
    head = {
        "k": 1,
        "version": 99,
        "pair": pair.cfg_b.pair.name,
        "generation": 1,
        "node": "driver",
        "ram_bytes": driver.npages * PS,
        "page_size": PS,
    }
    reply = driver.send_frames([msgpack.packb(head)])
    assert isinstance(reply, wire.Reject)
    assert "peer speaks protocol version 99, this node speaks version 2" in reply.reason
    for change, words in [
        ({"pair": "other"}, "is not this standby's pair"),
        ({"generation": 0}, "older than this standby's"),
        ({"ram_bytes": PS * 8}, "does not match this standby's"),
        ({"guest": "qemu 7.2.22 machine=q35"}, "same QEMU version and machine configuration"),
    ]:
        reply = driver.hello(**change)
        assert isinstance(reply, wire.Reject) and words in reply.reason, reply
    # garbage frames get a reject, not a crash; the standby then still serves
    assert isinstance(driver.send_frames([b"\xc1garbage"]), wire.Reject)
    assert isinstance(driver.hello(), wire.Welcome)
    sums = array("Q")
    empty = wire.Pages(1, 0, True, array("I"), b"", array("I"), sums, [], [], b"", 0, [])
    assert driver.send(empty) == wire.Ack(1, 0)
