"""The primary's side of early parts (checkpoint.early_send): what a resend sends and in
which order, what an ack lets go; and the early parts on the wire."""

from __future__ import annotations

from array import array
from typing import Any

from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.inflight import CheckpointRecord, InFlight
from mirror.replication.outputs import OutputBuffer

PS = pd.PAGE_SIZE


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[wire.Message] = []
        self.session = [0]
        self.committed = [0]

    def send(self, msg: wire.Message) -> None:
        self.sent.append(msg)


class FakeGuest:
    ram = bytearray(16 * PS)
    disk = None


def pages(epoch: int, part: int, final: bool, first: int) -> wire.Pages:
    ram = pd.alloc_pages(16)
    ram[first * PS : first * PS + 3] = b"abc"
    batch = pd.gather(ram, [first, first + 1])
    return wire.Pages.of(epoch, batch, part=part, final=final,
                         state=b"s" if final else b"")  # fmt: skip


def engine() -> tuple[InFlight, FakeLink]:
    link = FakeLink()
    e = InFlight(FakeGuest(), link, OutputBuffer(lambda outs: None), pair="p",  # type: ignore[arg-type]
                 generation=1, node="a", fingerprint="synthetic")  # fmt: skip
    e.session = 7
    return e, link


def record(epoch: int) -> CheckpointRecord:
    return CheckpointRecord(epoch, 0, 0, 0, 0, 0, 1.0, 2, 2 * PS, 0)


def test_a_resend_sends_each_epoch_s_early_parts_before_its_final_part() -> None:
    e, link = engine()
    e.in_flight[4] = (pages(4, 1, True, 0), record(4))
    e.early_parts[4] = [pages(4, 0, False, 2)]
    e.early_parts[5] = [pages(5, 0, False, 4), pages(5, 1, False, 6)]  # the running epoch
    e.sent_epoch = 4
    for _ in range(5):  # epochs 1..5 ended (closed in their pauses)
        e.outputs.close_epoch()
    e.resend()
    got: list[Any] = [(m.epoch, m.part, m.final) for m in link.sent]  # type: ignore[union-attr]
    assert got == [(4, 0, False), (4, 1, True), (5, 0, False), (5, 1, False)]
    seqs = [m.seq for m in link.sent]  # type: ignore[union-attr]
    assert seqs == sorted(seqs) and all(m.session == 7 for m in link.sent)  # type: ignore[union-attr]
    # the ack of 4 lets its early parts go, not those of the running epoch
    e.on_reply(wire.Ack(7, 4, 1))
    assert e.acked == 4 and list(e.early_parts) == [5] and not e.in_flight


def test_early_parts_on_the_wire() -> None:
    m = pages(3, 2, False, 8)
    back = wire.decode(wire.encode(m))
    assert isinstance(back, wire.Pages)
    assert (back.epoch, back.part, back.final, list(back.index)) == (3, 2, False, [8, 9])
    assert wire.PROTOCOL_VERSION == 5
    empty = wire.Pages(3, 0, False, array("I"), b"", array("I"), array("Q"), [], [], b"", 0, [])
    back = wire.decode(wire.encode(empty))
    assert isinstance(back, wire.Pages) and back.count == 0 and not back.final
