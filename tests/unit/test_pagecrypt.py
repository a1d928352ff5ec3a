"""The pages' sealing (mirror.replication.pagecrypt, native/pagecrypt.c): a whole message
opens to exactly what was sealed; a flipped bit, a replayed or reordered part, a dropped
part and a wrong key are each refused, and nothing of a refused message is handed on."""

from __future__ import annotations

import os
from array import array

import pytest
import zmq

from mirror.replication import pagecrypt, wire
from mirror.replication import pagediff as pd
from mirror.replication.keys import LinkKeys
from mirror.replication.pagecrypt import Opener, SealError, sealed_messages

PS = pd.PAGE_SIZE
KEY = bytes(range(32))


def pages(n: int = 600, seq: int = 5, epoch: int = 9) -> wire.Pages:
    """A PAGES message of ``n`` random pages: data frames of about 1 MiB, so several."""
    data = os.urandom(n * PS)
    lens = array("I", [PS] * n)
    frames, counts = wire.split_data(data, lens)
    index = array("I", range(n))
    sums = array("Q", (pd.checksum_bytes(data[i * PS : (i + 1) * PS]) for i in range(n)))
    state = b"device state"
    return wire.Pages(epoch, 0, True, index, bytes(n), lens, sums, frames, counts, state,
                      pd.checksum_bytes(state), [(1, b"out")], session=77, seq=seq)  # fmt: skip


def parts(msg: wire.Pages, key: bytes = KEY) -> list[list[bytes]]:
    """The zmq messages as the standby receives them (each frame its own bytes)."""
    return [[bytes(f) for f in m] for m in sealed_messages(key, msg.seq, wire.encode(msg))]


def take_all(opener: Opener, msgs: list[list[bytes]], ident: bytes = b"A") -> list[memoryview]:
    out = None
    for i, m in enumerate(msgs):
        got = opener.take(ident, [bytearray(f) for f in m])
        assert (got is None) == (i < len(msgs) - 1)
        out = got
    assert out is not None
    return out


def test_a_sealed_message_opens_to_what_was_sent_and_hides_it() -> None:
    msg = pages()
    sealed = parts(msg)
    assert len(sealed) == 1 + len(msg.data) and len(msg.data) >= 3
    for (_prefix, body), plain in zip(sealed[1:], msg.data, strict=True):
        assert len(body) == len(plain) + pagecrypt.TAG and bytes(plain)[:64] not in body
    assert b"device state" not in sealed[0][1] and b"out" not in sealed[0][1]
    got = wire.decode(take_all(Opener(KEY), sealed))
    assert isinstance(got, wire.Pages)
    assert (got.epoch, got.seq, got.session, got.outputs) == (9, 5, 77, [(1, b"out")])
    assert b"".join(bytes(f) for f in got.data) == b"".join(bytes(f) for f in msg.data)
    assert bytes(got.state) == b"device state" and list(got.checksums) == list(msg.checksums)


@pytest.mark.parametrize("where", ["head", "data", "prefix", "tag"])
def test_a_flipped_bit_is_refused(where: str) -> None:
    msg = pages()
    sealed = parts(msg)
    at, frame, byte = {"head": (0, 1, 10), "data": (2, 1, 5000), "prefix": (2, 0, 6),
                       "tag": (-1, 1, -1)}[where]  # fmt: skip
    bad = bytearray(sealed[at][frame])
    bad[byte] ^= 0x10
    sealed[at][frame] = bytes(bad)
    opener = Opener(KEY)
    with pytest.raises(SealError) as e:
        take_all(opener, sealed)
    if where == "head":
        assert e.value.refused is None and "does not verify" in str(e.value)
    else:  # the head verified: the standby may name the checkpoint in a REJECT
        assert e.value.refused == (77, 5, 9, 0) and "checkpoint 9 part 0" in str(e.value)
    # nothing half-assembled is left: the next sending (a new send number) goes through
    assert isinstance(wire.decode(take_all(opener, parts(pages(seq=6)))), wire.Pages)


def test_a_wrong_key_is_refused() -> None:
    with pytest.raises(SealError, match="not sealed under this session's key"):
        take_all(Opener(bytes(32)), parts(pages()))
    # the keys of two sessions differ; those of the two hosts of one session agree
    (pa, sa), (pb, sb) = zmq.curve_keypair(), zmq.curve_keypair()
    ka, kb = LinkKeys(public=pa, secret=sa, peer=pb), LinkKeys(public=pb, secret=sb, peer=pa)
    one = pagecrypt.page_key(ka, "pair", 3, 11)
    assert one == pagecrypt.page_key(kb, "pair", 3, 11)
    assert one != pagecrypt.page_key(ka, "pair", 3, 12) != pagecrypt.page_key(ka, "pair", 4, 11)
    with pytest.raises(SealError):
        take_all(Opener(pagecrypt.page_key(kb, "pair", 3, 12)), parts(pages(), one))


def test_a_replayed_message_is_refused() -> None:
    opener = Opener(KEY)
    first = parts(pages(seq=5))
    take_all(opener, first)
    with pytest.raises(SealError, match="not above the last one opened"):
        take_all(opener, first)  # the same sending again
    take_all(opener, parts(pages(seq=7)))
    with pytest.raises(SealError, match="replayed or reordered"):
        take_all(opener, parts(pages(seq=6)))  # an older sending after a newer one


def test_a_replayed_reordered_or_dropped_data_part_is_refused() -> None:
    msg = pages()
    for name, shuffle in {
        "reordered": lambda s: [s[0], s[2], s[1], *s[3:]],
        "replayed": lambda s: [s[0], s[1], s[1], *s[2:]],
        "dropped": lambda s: [s[0], *s[2:]],
    }.items():
        sealed = shuffle(parts(msg))
        with pytest.raises(SealError, match="does not verify") as e:
            take_all(Opener(KEY), sealed)
        assert e.value.refused == (77, 5, 9, 0), name
    # a part of another sending (same key, other send number) in the middle
    other = parts(pages(seq=6))
    sealed = parts(msg)
    sealed[2] = other[2]
    with pytest.raises(SealError, match="does not verify"):
        take_all(Opener(KEY), sealed)


def test_a_part_from_another_connection_is_not_taken_into_the_message() -> None:
    opener = Opener(KEY)
    sealed = parts(pages())
    assert opener.take(b"A", sealed[0]) is None
    with pytest.raises(SealError, match="no message being received"):
        opener.take(b"stranger", sealed[1])
    for i, m in enumerate(sealed[1:], 1):  # the primary's message goes on undisturbed
        got = opener.take(b"A", m)
        assert (got is None) == (i < len(sealed) - 1)
    with pytest.raises(SealError, match="not a sealed checkpoint part"):
        opener.take(b"stranger", [b"garbage"])


def test_the_native_seal_refuses_a_wrong_nonce_and_zeroes_what_it_refused() -> None:
    data = os.urandom(5000)
    sealed = bytearray(pagecrypt.seal(KEY, 1, 2, b"aad", data))
    assert bytes(pagecrypt.open_in_place(KEY, 1, 2, b"aad", bytearray(sealed))) == data
    for seq, part, aad in ((2, 2, b"aad"), (1, 3, b"aad"), (1, 2, b"aaD")):
        buf = bytearray(sealed)
        with pytest.raises(SealError):
            pagecrypt.open_in_place(KEY, seq, part, aad, buf)
        assert buf[:5000] == bytes(5000)


def test_the_pages_port_is_configured_apart_from_the_others() -> None:
    from mirror.config import ConfigError, from_dict

    assert from_dict({}).link.bulk_port == 0  # the system picks one
    assert from_dict({"link": {"bulk_port": 7405}}).link.bulk_port == 7405
    for bad in (7400, 7401):
        with pytest.raises(ConfigError, match=r"bulk_port .* is also the data or heartbeat"):
            from_dict({"link": {"bulk_port": bad}})
    with pytest.raises(ConfigError):
        from_dict({"link": {"bulk_port": 70000}})
