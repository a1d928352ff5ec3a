"""The output-commit buffer: nothing leaves before its epoch is acknowledged."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from mirror.config import CheckpointConfig
from mirror.guests.base import GuestOutput
from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.checkpoint import CheckpointEngine
from mirror.replication.outputs import ObserverSink, OutputBuffer


def out(seq: int) -> GuestOutput:
    return GuestOutput(seq, b"p%d" % seq, 0.0)


def test_outputs_are_released_only_through_the_acked_epoch():
    sent: list[int] = []
    buf = OutputBuffer(lambda outs: sent.extend(o.seq for o in outs))
    buf.add(out(1))
    buf.add(out(2))
    assert buf.close_epoch() == [(1, b"p1"), (2, b"p2")]  # epoch 1 captured
    buf.add(out(3))
    assert buf.close_epoch() == [(3, b"p3")]  # epoch 2 captured
    buf.add(out(4))  # epoch 3, running
    assert buf.release_through(0) == 0 and sent == []
    assert buf.release_through(1) == 2 and sent == [1, 2]
    assert buf.held == 2
    assert buf.release_through(1) == 0  # an ack repeated releases nothing again
    assert buf.release_through(2) == 1 and sent == [1, 2, 3]
    assert buf.held == 1 and buf.released == 3


def test_acks_out_of_order_release_in_order():
    sent: list[int] = []
    buf = OutputBuffer(lambda outs: sent.extend(o.seq for o in outs))
    for seq in range(1, 7):
        buf.add(out(seq))
        if seq % 2 == 0:
            buf.close_epoch()
    buf.release_through(3)
    buf.release_through(1)
    assert sent == [1, 2, 3, 4, 5, 6]


def test_observer_sink_writes_one_line_per_output():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        while chunk := conn.recv(4096):
            got.extend(chunk)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    sink = ObserverSink("127.0.0.1", port)
    sink([out(1), out(2)])
    sink.close()
    t.join(5)
    server.close()
    assert got == b"1 p1\n2 p2\n"


def test_going_unprotected_releases_the_held_outputs_before_any_new_one():
    """The guest's thread adds while the held outputs are being released: a found race
    (under load, the observer saw output 220 before the held 63..219)."""
    sent: list[int] = []
    entered, go_on = threading.Event(), threading.Event()

    def slow_sink(outs: list[GuestOutput]) -> None:
        if len(outs) > 1:  # the held ones
            entered.set()
            go_on.wait(5)
        sent.extend(o.seq for o in outs)

    buf = OutputBuffer(slow_sink)
    for s in range(1, 6):
        buf.add(out(s))
    releasing = threading.Thread(target=buf.go_unprotected)
    releasing.start()
    assert entered.wait(5)
    adder = threading.Thread(target=buf.add, args=(out(6),))
    adder.start()
    adder.join(0.2)
    assert sent == []  # output 6 waits for the held ones
    go_on.set()
    releasing.join(5)
    adder.join(5)
    assert sent == [1, 2, 3, 4, 5, 6]


def test_an_epoch_not_yet_ended_is_never_released():
    sent: list[int] = []
    buf = OutputBuffer(lambda outs: sent.extend(o.seq for o in outs))
    buf.add(out(1))
    buf.close_epoch()  # epoch 1 ended; epoch 2 runs
    buf.add(out(2))
    with pytest.raises(ValueError, match="has not ended"):
        buf.release_through(2)
    assert sent == [] and buf.held == 2
    assert buf.release_through(1) == 1 and sent == [1]


class _Guest:
    """Just what the engine touches in a checkpoint: RAM, pause/resume, a state."""

    kind = "synthetic"
    disk = None

    def __init__(self, npages: int) -> None:
        self.ram = pd.alloc_pages(npages)

    def pause(self) -> None: ...
    def resume(self) -> None: ...

    def save_state(self) -> bytes:
        return b"state"


class _Link:
    def __init__(self) -> None:
        self.sent: list[wire.Message] = []
        self.committed = [0]
        self.session = [0]

    def send(self, msg: wire.Message) -> None:
        self.sent.append(msg)


def test_the_engine_refuses_an_ack_of_a_checkpoint_it_never_sent(caplog):
    sent: list[int] = []
    outputs = OutputBuffer(lambda outs: sent.extend(o.seq for o in outs))
    guest, link = _Guest(16), _Link()
    engine = CheckpointEngine(
        guest, link, CheckpointConfig(scan="hashed"), outputs,  # type: ignore[arg-type]
        pair="p", generation=1, node="a",
    )  # fmt: skip
    engine.session = 7
    outputs.add(out(1))
    engine.checkpoint()  # checkpoint 1 (epoch 1's output) sent
    outputs.add(out(2))  # epoch 2, in no checkpoint
    assert [m.epoch for m in link.sent] == [1]  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING):
        engine.on_reply(wire.Ack(7, 2, 0))  # a checkpoint never sent
        engine.on_reply(wire.Ack(7, 1000, 0))
    assert sent == [] and engine.acked == 0 and outputs.held == 2
    assert engine.bogus_acks == 2 and link.committed[0] == 0
    assert '"event": "ack-refused"' in caplog.text
    engine.on_reply(wire.Ack(7, 1, 0))  # the real one still counts
    assert sent == [1] and engine.acked == 1 and 1 not in engine.in_flight


def test_a_domain_paired_live_passes_its_outputs_until_the_first_checkpoint():
    """`mirror pair --live`: before the first checkpoint nothing protects the guest (as
    before pairing), so its outputs pass as they come; from hold() (the first checkpoint's
    pause) each waits for its checkpoint."""
    sent: list[int] = []
    buf = OutputBuffer(lambda outs: sent.extend(o.seq for o in outs))
    buf.passing = True
    buf.add(out(1))
    buf.add(out(2))
    assert sent == [1, 2] and buf.held == 0
    buf.hold()
    assert buf.close_epoch() == []  # the first checkpoint carries none of them
    buf.add(out(3))
    assert sent == [1, 2] and buf.held == 1
    buf.close_epoch()
    assert buf.release_through(2) == 1 and sent == [1, 2, 3]
