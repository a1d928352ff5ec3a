"""A real standby process fed by a test driver that speaks the protocol as a primary would.

The driver keeps its own RAM and shadow and builds checkpoints with the
page-diff engine, so it can damage one on purpose: the standby must reject
that message (and only it), keep its session, and keep the image exactly at
the last commit.  The driver holds the primary's keys (host A's): it is the
authenticated peer; tests/security/ tries the same without them.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from mirror.replication import keys, wire
from mirror.replication import pagediff as pd
from mirror.replication.link import Endpoint, Link
from tests.integration.conftest import Pair

PS = pd.PAGE_SIZE


class Driver:
    def __init__(self, pair: Pair, link_keys: keys.LinkKeys | None = None) -> None:
        cfg = pair.cfg_b
        self.cfg = cfg
        self.link = Link.client(
            Endpoint("127.0.0.1", cfg.link.data_port, cfg.link.heartbeat_port),
            "driver",
            keys=keys.load(pair.cfg_a.keys) if link_keys is None else link_keys,
        )
        self.npages = (cfg.guest.ram_mib << 20) // PS
        self.ram = pd.alloc_pages(self.npages)
        self.shadow = pd.alloc_pages(self.npages)
        self.rnd = random.Random(5)
        self.epoch = 0
        self.session = 0
        self.seq = 0

    def hello(self, **change: object) -> wire.Message:
        session = self.rnd.randrange(1, 1 << 63)
        h = wire.Hello(
            self.cfg.pair.name, self.cfg.pair.generation, "driver", self.npages * PS, session
        )
        fields = {**h.__dict__, **change}
        self.link.send(wire.Hello(**fields))  # type: ignore[arg-type]
        reply = self.reply()
        if isinstance(reply, wire.Welcome):
            assert reply.session == session
            self.session = session
            self.link.session[0] = session  # its heartbeats count for this session only
        return reply

    def reply(self, timeout: float = 10) -> wire.Message:
        msg = self.link.recv(timeout)
        assert msg is not None, "the standby did not answer"
        return msg

    def no_reply(self, timeout: float = 0.5) -> None:
        assert self.link.recv(timeout) is None, "the standby answered a frame it must drop"

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

    def stamp(self, msg: wire.Pages, session: int | None = None) -> wire.Pages:
        self.seq += 1
        return replace(msg, session=self.session if session is None else session, seq=self.seq)

    def send(self, msg: wire.Pages) -> wire.Message:
        self.link.send(self.stamp(msg))
        return self.reply()

    def frames(self, msg: wire.Pages, session: int | None = None) -> list[bytes]:
        return [bytes(f) for f in wire.encode(self.stamp(msg, session))]

    def send_frames(self, frames: list[bytes]) -> wire.Message:
        self.link.data.send_multipart(frames)
        return self.reply()

    def ack(self, epoch: int) -> wire.Ack:
        return wire.Ack(self.session, epoch, 0)


def image_of(pair: Pair) -> bytes:
    return Path(f"/dev/shm/mirror-{pair.cfg_b.pair.name}-hostB-standby.img").read_bytes()


def committed_state(pair: Pair) -> bytes:
    return (pair.root / "hostB" / "committed.state").read_bytes()


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
    assert driver.send(driver.build(0, range(driver.npages))) == driver.ack(0)
    for epoch in (1, 2, 3):
        assert driver.send(driver.build(epoch)) == driver.ack(epoch)
    at_3 = bytes(driver.ram)
    assert image_of(pair) == at_3

    good = driver.build(4)
    frames = driver.frames(good)

    # one flipped bit in the page data: the per-page checksum catches it; the REJECT
    # names the message (its send number) and the session goes on
    bad = list(frames)
    data = bytearray(bad[6])  # the first data frame
    data[len(data) // 2] ^= 0x10
    bad[6] = bytes(data)
    reply = driver.send_frames(bad)
    assert isinstance(reply, wire.Reject) and "does not verify" in reply.reason
    assert (reply.session, reply.answers, reply.seq, reply.epoch) == (
        driver.session, wire.Kind.PAGES, driver.seq, 4,
    )  # fmt: skip
    assert image_of(pair) == at_3

    # a truncated checkpoint (the data frame cut short) is a malformed frame: dropped
    cut = list(frames)
    cut[6] = frames[6][: len(frames[6]) - 100]
    driver.link.data.send_multipart(cut)
    driver.no_reply()
    # a frame missing altogether, an empty message part, garbage: dropped likewise
    for junk in (frames[:-1], [b""], [b"\xc1garbage"], [b"\x80"]):
        driver.link.data.send_multipart(junk)
        driver.no_reply(0.2)
    # a damaged device state
    st = list(frames)
    st[5] = b"Device-state-4"
    reply = driver.send_frames(st)
    assert isinstance(reply, wire.Reject) and "device state" in reply.reason
    assert image_of(pair) == at_3
    assert committed_state(pair) == b"device-state-3"

    # the intact checkpoint, of another session or of none: dropped, nothing changes
    for other in (driver.session ^ 1, 0):
        driver.link.data.send_multipart(driver.frames(good, other))
        driver.no_reply()
    assert image_of(pair) == at_3
    # an empty pre-copy part in the same generation: refused, the commit stays
    empty = wire.Pages(0, 0, True, array("I"), b"", array("I"), array("Q"), [], [], b"", 0, [])
    reply = driver.send(empty)
    assert isinstance(reply, wire.Reject) and "pre-copy refused" in reply.reason
    assert image_of(pair) == at_3
    assert committed_state(pair) == b"device-state-3"

    # the intact checkpoint commits in the same session, no new HELLO needed
    assert driver.send(good) == driver.ack(4)
    assert image_of(pair) == bytes(driver.ram)
    assert committed_state(pair) == b"device-state-4"
    # a resend of what it holds is acknowledged again, and changes nothing
    assert driver.send(good) == driver.ack(4)
    assert committed_state(pair) == b"device-state-4"

    # out of order: checkpoint 6 before 5
    five = driver.build(5)
    reply = driver.send(driver.build(6))
    assert isinstance(reply, wire.Reject) and "out of order" in reply.reason
    assert driver.send(five) == driver.ack(5)


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
    driver.link.data.send_multipart([msgpack.packb(head)])
    driver.no_reply()  # another version: logged by the standby, not answered
    log = (pair.root / "hostB" / "agent.log").read_text()
    assert "peer speaks protocol version 99, this node speaks version 5" in log
    for change, words in [
        ({"pair": "other"}, "wrong pair"),
        ({"generation": 0}, "not the current generation"),
        ({"generation": 7}, "not the current generation"),  # a HELLO cannot raise it
        ({"ram_bytes": PS * 8}, "guest RAM size differs"),
        ({"guest": "qemu 7.2.22 machine=q35"}, "QEMU version or machine configuration"),
    ]:
        reply = driver.hello(**change)
        assert isinstance(reply, wire.Reject) and words in reply.reason, reply
        assert reply.answers == wire.Kind.HELLO
        # a REJECT says nothing about the pair: its name, node, generation, RAM
        for secret in (pair.cfg_b.pair.name, "hostB", str(driver.npages * PS)):
            assert secret not in reply.reason
    # garbage frames get no answer, not a crash; the standby then still serves
    driver.link.data.send_multipart([b"\xc1garbage"])
    driver.no_reply()
    welcome = driver.hello()
    assert isinstance(welcome, wire.Welcome) and welcome.generation == 1
    sums = array("Q")
    empty = wire.Pages(1, 0, True, array("I"), b"", array("I"), sums, [], [], b"", 0, [])
    assert driver.send(empty) == driver.ack(1)
