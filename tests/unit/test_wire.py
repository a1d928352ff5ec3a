"""Wire validation: every message round-trips; random or damaged frames give WireError only."""

from __future__ import annotations

import contextlib
from array import array

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.replication import pagediff as pd
from mirror.replication import wire
from mirror.replication.wire import Ack, Bye, Heartbeat, Hello, Pages, Reject, Welcome, WireError

PS = pd.PAGE_SIZE


def pages_msg(n_raw: int = 2, n_zero: int = 1, state: bytes = b"state") -> Pages:
    kinds = bytes([pd.PageKind.RAW] * n_raw + [pd.PageKind.ZERO] * n_zero)
    lens = array("I", [PS] * n_raw + [0] * n_zero)
    data, frame_pages = wire.split_data(bytes(n_raw * PS), lens)
    return Pages(
        epoch=7,
        part=0,
        final=True,
        index=array("I", range(len(kinds))),
        kinds=kinds,
        lens=lens,
        checksums=array("Q", range(len(kinds))),
        data=data,
        frame_pages=frame_pages,
        state=state,
        state_sum=pd.checksum_bytes(state),
        outputs=[(1, b"x"), (2, b"")],
        session=77,
        seq=3,
    )


MESSAGES = [
    Hello("pair-a", 3, "hostA", 64 * PS, 77),
    Welcome("pair-a", 3, "hostB", 12, 77),
    pages_msg(),
    pages_msg(0, 0, b""),
    Ack(77, 5, 0),
    Reject(77, wire.Kind.PAGES, 3, 5, 0, "checksum"),
    Heartbeat("hostA", 99, 5, 77),
    Bye(77, "hostA", "stopped by its operator"),
    wire.Handover(77, "hostA", 9),
]


def normalized(m: wire.Message) -> object:
    if isinstance(m, Pages):
        return (
            m.session,
            m.seq,
            m.epoch,
            m.part,
            m.final,
            list(m.index),
            bytes(m.kinds),
            list(m.lens),
            list(m.checksums),
            [bytes(d) for d in m.data],
            m.frame_pages,
            bytes(m.state),
            m.state_sum,
            m.outputs,
        )
    return m


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = [bytes(f) for f in wire.encode(msg)]
    assert normalized(wire.decode(frames)) == normalized(msg)


def test_wrong_version_names_both_versions():
    head = msgpack.packb(
        {
            "k": 1,
            "version": 1,
            "pair": "p",
            "generation": 1,
            "node": "a",
            "ram_bytes": PS,
            "page_size": PS,
        }
    )
    with pytest.raises(
        wire.VersionMismatch, match="peer speaks protocol version 1, this node speaks version 5"
    ):
        wire.decode([head])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"count": 4}, "data frames hold 3 pages, header says 4"),
        ({"data_len": 5}, "header says 5"),
        ({"state_len": 1}, "state frame is 5 bytes"),
        ({"epoch": -1}, "'epoch' must be an integer"),
        ({"final": 1}, "'final' must be a boolean"),
        ({"outputs": [[1]]}, "malformed output entry"),
        ({"extra": 1}, "unexpected"),
        ({"k": 42}, "unknown message kind 42"),
    ],
)
def test_bad_pages_header_fields(change, match):
    frames = [bytes(f) for f in wire.encode(pages_msg())]
    head = msgpack.unpackb(frames[0])
    head.update(change)
    with pytest.raises(WireError, match=match):
        wire.decode([msgpack.packb(head), *frames[1:]])


def test_page_lengths_must_match_kinds():
    frames = [bytes(f) for f in wire.encode(pages_msg())]
    frames[3] = array("I", [PS, 17, 0]).tobytes()
    with pytest.raises(
        WireError, match="data frame 0 is 8192 bytes, its 3 pages' lengths add up to 4113"
    ):
        wire.decode(frames)
    frames = [bytes(f) for f in wire.encode(pages_msg())]
    frames[2] = bytes([0, 0, 7])
    with pytest.raises(WireError, match="unknown encoding 7"):
        wire.decode(frames)


def test_missing_frames():
    frames = [bytes(f) for f in wire.encode(pages_msg())]
    with pytest.raises(WireError, match="PAGES has 6 frames, its header announces 7"):
        wire.decode(frames[:-1])
    with pytest.raises(WireError, match="ACK has 2 frames"):
        wire.decode([bytes(wire.encode(Ack(77, 1, 0))[0]), b"x"])


def test_page_count_is_bounded_before_anything_is_allocated():
    """A PAGES header announcing more pages than the pair's RAM holds is refused from the
    header alone (the 4 MiB message that made the standby allocate 1.1 GiB)."""
    frames = [bytes(f) for f in wire.encode(pages_msg())]
    with pytest.raises(WireError, match=r"'count' must be an integer in 0\.\.2"):
        wire.decode(frames, max_pages=2)
    assert isinstance(wire.decode(frames, max_pages=3), Pages)


def test_sessions_and_answers_are_checked():
    for change, match in [
        ({"session": 0}, "'session' must be an integer in 1.."),
        ({"session": 1 << 63}, "'session' must be an integer"),
    ]:
        head = msgpack.unpackb(wire.encode(MESSAGES[0])[0])
        head.update(change)
        with pytest.raises(WireError, match=match):
            wire.decode([msgpack.packb(head)])
    head = msgpack.unpackb(wire.encode(MESSAGES[5])[0])
    head["answers"] = 99
    with pytest.raises(WireError, match=r"'answers' must be an integer in 1\.\.8"):
        wire.decode([msgpack.packb(head)])


@settings(max_examples=400, deadline=None)
@given(frames=st.lists(st.binary(max_size=200), min_size=0, max_size=8))
def test_random_frames_never_escape_as_other_errors(frames):
    with contextlib.suppress(WireError):
        wire.decode(frames)


@settings(max_examples=600, deadline=None)
@given(which=st.sampled_from(range(len(MESSAGES))), data=st.data())
def test_mutated_frames_are_rejected_or_decode_consistently(which, data):
    frames = [bytearray(f) for f in wire.encode(MESSAGES[which])]
    i = data.draw(st.integers(0, len(frames) - 1))
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup"]))
    f = frames[i]
    if op == "flip" and f:
        pos = data.draw(st.integers(0, len(f) - 1))
        f[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del f[data.draw(st.integers(0, len(f))) :]
    elif op == "extend":
        f += data.draw(st.binary(min_size=1, max_size=9))
    elif op == "drop":
        del frames[i]
    else:
        frames.insert(i, bytearray(f))
    try:
        msg = wire.decode([bytes(x) for x in frames])
    except WireError:
        return
    # whatever still decodes is self-consistent: re-encoding gives it back
    assert normalized(wire.decode([bytes(x) for x in wire.encode(msg)])) == normalized(msg)
