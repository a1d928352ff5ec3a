"""Messages of the interconnect: msgpack headers plus raw frames, validated on receipt.

A message is a zmq multipart: frame 0 is a msgpack map with a kind ``k``;
page-carrying messages add raw frames.  Everything a peer sends is untrusted:
:func:`decode` checks every field's type and range and the sizes of the raw
frames against the header, and raises :class:`WireError` (nothing applied)
on the first thing wrong.  Page contents are verified later, by per-page
checksums, when the standby stages them.

    HELLO       {k, version, pair, generation, node, ram_bytes, session, guest, page_size}
    WELCOME     {k, version, pair, generation, node, committed, session, bulk_port}
    PAGES       {k, session, seq, epoch, part, final, count, data_len, state_len, state_sum,
                 outputs, frames}
                + frames: index (u32 LE), kinds (u8), lens (u32 LE), checksums (u64 LE),
                          state, then the page data in len(frames) frames, frame i holding
                          the encodings of the next frames[i] pages
    ACK         {k, session, epoch, part}
    REJECT      {k, session, answers, seq, epoch, part, reason}
    HEARTBEAT   {k, node, seq, committed, session}
    BYE         {k, session, node, reason}  the primary stops on purpose: do not promote
    HANDOVER    {k, session, node, epoch}   planned switchover: go on from checkpoint epoch

Sessions: the primary picks a random ``session`` (1..2^63-1) for each HELLO; the
standby's WELCOME echoes it, and every later message of either side carries it.
A message of another session (a stale frame, a leftover from an earlier
pairing) is dropped by whoever receives it.  A REJECT says which message it
answers: ``answers`` is that message's kind, ``seq`` the PAGES message's send
number (the primary numbers every PAGES it sends, resends included), so that
the primary acts only on the answer to something it still waits for.

PAGES with epoch 0 are parts of the pre-copy (applied as they come: nothing
is committed yet); epoch N >= 1 is checkpoint N, whose ``final`` part
commits it (checkpoints are sent as one part today).  Page data travels in
frames of about DATA_FRAME bytes: zmq moves those at several times the rate
of one frame of many megabytes (measured: 2.8 against 0.6 GB/s on loopback).
Per-page checks of kinds against lengths are the native staging's (before
anything is applied), so that decoding never loops over pages in Python.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from itertools import accumulate
from typing import Any

import msgpack

from mirror.replication.pagediff import PAGE_SIZE, EncodedPages, PageKind, checksum_bytes

PROTOCOL_VERSION = 5  # 2: HELLO carries the guest's fingerprint; 3: sessions, REJECT answers;
# 4: WELCOME names the port of the sealed pages (mirror.replication.pagecrypt); 5: a
# checkpoint may come in parts, the early ones (final false) sent while the guest runs
# and committed only with the final one, whose ``part`` counts them
MAX_HEADER = 1 << 20
MAX_NAME = 128
MAX_PAGES = 1 << 32
MAX_OUTPUTS = 1 << 20
MAX_PAYLOAD = 1 << 16
MAX_STATE = 256 << 20  # device state (QEMU's is a few MiB)
MAX_SESSION = (1 << 63) - 1
DATA_FRAME = 1 << 20


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    PAGES = 3
    ACK = 4
    REJECT = 5
    HEARTBEAT = 6
    BYE = 7
    HANDOVER = 8


class WireError(ValueError):
    """A frame that does not follow the protocol: rejected, nothing applied."""


class VersionMismatch(WireError):
    """The peer speaks another protocol version."""


@dataclass(frozen=True)
class Hello:
    pair: str
    generation: int
    node: str
    ram_bytes: int
    session: int
    guest: str = "synthetic"  # the guest's kind and configuration; both hosts must agree
    page_size: int = PAGE_SIZE
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Welcome:
    pair: str
    generation: int
    node: str
    committed: int
    session: int
    bulk_port: int = 0  # where PAGES go sealed, off CURVE (0: on the data socket)
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Pages:
    """A batch of pages (a pre-copy part or a checkpoint) and its frames.

    Pre-copy (epoch 0): parts 0, 1, ... each committed and acknowledged on its own.  A
    checkpoint (epoch >= 1): zero or more early parts (``final`` false, parts 0..k-1, raw
    pages only, no state or outputs), sent while the guest runs the epoch, then the final
    part (``part`` = k, the number of early parts before it) with the device state and the
    outputs; the standby stages the early parts and commits them, then the final one,
    only when the final part arrives and all k verified."""

    epoch: int
    part: int
    final: bool
    index: array[int]
    kinds: bytes | memoryview
    lens: array[int]
    checksums: array[int]
    data: list[bytes | memoryview]  # data frames
    frame_pages: list[int]  # pages whose encodings each data frame holds
    state: bytes | memoryview
    state_sum: int
    outputs: list[tuple[int, bytes]]
    session: int = 0
    seq: int = 0  # the primary's send number of this message (a resend gets a new one)

    @property
    def count(self) -> int:
        return len(self.index)

    @property
    def data_len(self) -> int:
        return sum(len(f) for f in self.data)

    def slices(self) -> list[tuple[int, int, bytes | memoryview]]:
        """(first page, end page, data frame) of each data frame."""
        out, at = [], 0
        for n, frame in zip(self.frame_pages, self.data, strict=True):
            out.append((at, at + n, frame))
            at += n
        return out

    @classmethod
    def of(
        cls,
        epoch: int,
        batch: EncodedPages,
        checksums: array[int] | None = None,
        *,
        part: int = 0,
        final: bool = True,
        state: bytes = b"",
        outputs: list[tuple[int, bytes]] | None = None,
    ) -> Pages:
        """A PAGES message carrying an encoded batch (and device state, outputs); the
        page checksums are ``checksums`` or else the batch's own."""
        if checksums is None:
            checksums = batch.checksums
        if checksums is None:
            raise ValueError("a PAGES message needs the checksum of every page")
        frames, counts = split_data(batch.data, batch.lens)
        sums = checksum_bytes(state) if state else 0
        return cls(
            epoch,
            part,
            final,
            batch.index,
            batch.kinds,
            batch.lens,
            checksums,
            frames,
            counts,
            state,
            sums,
            outputs or [],
        )


def split_data(
    data: bytes | memoryview, lens: array[int]
) -> tuple[list[bytes | memoryview], list[int]]:
    """Cut page data into frames of about DATA_FRAME bytes at page boundaries."""
    view = memoryview(data)
    ends = list(accumulate(lens))
    frames: list[bytes | memoryview] = []
    counts: list[int] = []
    page = start = 0
    while page < len(ends):
        stop = max(bisect_right(ends, start + DATA_FRAME, lo=page), page + 1)
        end = ends[stop - 1]
        frames.append(view[start:end])
        counts.append(stop - page)
        page, start = stop, end
    return frames, counts


@dataclass(frozen=True)
class Ack:
    session: int
    epoch: int
    part: int


@dataclass(frozen=True)
class Reject:
    """The standby refuses one message: ``answers`` its kind, ``seq`` its send number
    (PAGES), ``epoch`` and ``part`` what it carried; ``session`` the session it came in
    (for a HELLO: the session it proposed)."""

    session: int
    answers: int
    seq: int
    epoch: int
    part: int
    reason: str


@dataclass(frozen=True)
class Bye:
    """The primary stops on purpose: its silence from now on is not a failure."""

    session: int
    node: str
    reason: str


@dataclass(frozen=True)
class Handover:
    """A planned switchover: the primary is paused at checkpoint ``epoch``, which the
    standby holds and which has been acknowledged; the standby is to go on from it."""

    session: int
    node: str
    epoch: int


@dataclass(frozen=True)
class Heartbeat:
    node: str
    seq: int
    committed: int
    session: int = 0  # the sender's current session (0: none)


Message = Hello | Welcome | Pages | Ack | Reject | Heartbeat | Bye | Handover
_LE = sys.byteorder == "little"


def _u(arr: array[int]) -> bytes | memoryview:
    if _LE:
        return memoryview(arr).cast("B")
    other = array(arr.typecode, arr)
    other.byteswap()
    return other.tobytes()


def _header(obj: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def encode(msg: Message) -> list[bytes | memoryview]:
    """The frames of ``msg``."""
    if isinstance(msg, Pages):
        head = {
            "k": Kind.PAGES, "session": msg.session, "seq": msg.seq, "epoch": msg.epoch,
            "part": msg.part, "final": msg.final,
            "count": msg.count, "data_len": msg.data_len, "state_len": len(msg.state),
            "state_sum": msg.state_sum, "frames": msg.frame_pages,
            "outputs": [[s, p] for s, p in msg.outputs],
        }  # fmt: skip
        sums = _u(msg.checksums)
        return [_header(head), _u(msg.index), msg.kinds, _u(msg.lens), sums, msg.state, *msg.data]
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise TypeError(f"not a wire message: {msg!r}")
    return [_header({"k": kind, **{f.name: getattr(msg, f.name) for f in fields(msg)}})]


# ---- decoding untrusted frames ----------------------------------------------

_KIND_OF: dict[type, Kind] = {
    Hello: Kind.HELLO, Welcome: Kind.WELCOME, Ack: Kind.ACK, Reject: Kind.REJECT,
    Heartbeat: Kind.HEARTBEAT, Bye: Kind.BYE, Handover: Kind.HANDOVER,
}  # fmt: skip
_FIELDS: dict[Kind, set[str]] = {
    kind: {"k", *(f.name for f in fields(cls))} for cls, kind in _KIND_OF.items()
}
_FIELDS[Kind.PAGES] = {
    "k", "session", "seq", "epoch", "part", "final", "count", "data_len", "state_len",
    "state_sum", "outputs", "frames",
}  # fmt: skip


def _int(h: dict[str, Any], name: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    v = h[name]
    if type(v) is not int or not lo <= v <= hi:
        raise WireError(f"field {name!r} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _str(h: dict[str, Any], name: str) -> str:
    v = h[name]
    if type(v) is not str or not 1 <= len(v) <= MAX_NAME:
        raise WireError(f"field {name!r} must be a string of 1..{MAX_NAME} characters, got {v!r}")
    return v


def _array(frame: bytes | memoryview, typecode: str, count: int, name: str) -> array[int]:
    arr = array(typecode)
    if len(frame) != arr.itemsize * count:
        raise WireError(
            f"{name} frame is {len(frame)} bytes, {count} pages need {arr.itemsize * count}"
        )
    arr.frombytes(frame)
    if not _LE:
        arr.byteswap()
    return arr


def _outputs(v: Any) -> list[tuple[int, bytes]]:
    if type(v) is not list or len(v) > MAX_OUTPUTS:
        raise WireError(f"field 'outputs' must be a list of at most {MAX_OUTPUTS} entries")
    out = []
    for item in v:
        if (
            type(item) is not list
            or len(item) != 2
            or type(item[0]) is not int
            or not 0 <= item[0] < 1 << 63
            or type(item[1]) is not bytes
            or len(item[1]) > MAX_PAYLOAD
        ):
            raise WireError(f"malformed output entry {item!r:.80}")
        out.append((item[0], item[1]))
    return out


def _check_version(h: dict[str, Any]) -> int:
    version = h["version"]
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"peer speaks protocol version {version!r}, this node speaks version {PROTOCOL_VERSION}"
        )
    return PROTOCOL_VERSION


def decode(frames: Sequence[bytes | memoryview], max_pages: int = MAX_PAGES - 1) -> Message:
    """The message in ``frames``, fully validated; raises :class:`WireError`.  A PAGES
    message may carry at most ``max_pages`` pages (the pair's RAM), checked before
    anything is allocated for them."""
    if not frames:
        raise WireError("empty message")
    if len(frames[0]) > MAX_HEADER:
        raise WireError(f"header of {len(frames[0])} bytes exceeds {MAX_HEADER}")
    try:
        h = msgpack.unpackb(
            frames[0],
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_PAYLOAD,
            max_str_len=4096,
            max_array_len=MAX_OUTPUTS,
            max_map_len=32,
        )
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"header is not valid msgpack: {e}") from None
    if type(h) is not dict:
        raise WireError(f"header must be a map, got {type(h).__name__}")
    try:
        kind = Kind(h["k"])
    except (ValueError, KeyError, TypeError):
        raise WireError(f"unknown message kind {h.get('k')!r}") from None
    if kind in (Kind.HELLO, Kind.WELCOME) and "version" in h:
        _check_version(h)  # before the fields: another version has other fields
    if set(h) != _FIELDS[kind]:
        missing, extra = _FIELDS[kind] - set(h), set(h) - _FIELDS[kind]
        raise WireError(
            f"{kind.name} header: missing {sorted(missing)}, unexpected {sorted(map(str, extra))}"
        )
    if kind is not Kind.PAGES and len(frames) != 1:
        raise WireError(f"{kind.name} has {len(frames)} frames, expected 1")
    match kind:
        case Kind.HELLO:
            _check_version(h)
            page_size = _int(h, "page_size", 1)
            if page_size != PAGE_SIZE:
                raise WireError(f"peer uses pages of {page_size} bytes, this node {PAGE_SIZE}")
            ram = _int(h, "ram_bytes", PAGE_SIZE, MAX_PAGES * PAGE_SIZE)
            if ram % PAGE_SIZE:
                raise WireError(f"ram_bytes {ram} is not a multiple of the page size")
            guest = h["guest"]
            if type(guest) is not str or not 1 <= len(guest) <= 1024:
                raise WireError(
                    f"field 'guest' must be a string of 1..1024 characters, got {guest!r:.80}"
                )
            return Hello(
                _str(h, "pair"), _int(h, "generation"), _str(h, "node"), ram,
                _int(h, "session", 1, MAX_SESSION), guest,
            )  # fmt: skip
        case Kind.WELCOME:
            _check_version(h)
            return Welcome(
                _str(h, "pair"), _int(h, "generation"), _str(h, "node"), _int(h, "committed"),
                _int(h, "session", 1, MAX_SESSION), _int(h, "bulk_port", 0, 65535),
            )  # fmt: skip
        case Kind.ACK:
            return Ack(_int(h, "session", 0, MAX_SESSION), _int(h, "epoch"), _int(h, "part"))
        case Kind.REJECT:
            answers = _int(h, "answers", min(Kind), max(Kind))
            return Reject(
                _int(h, "session", 0, MAX_SESSION), answers, _int(h, "seq"), _int(h, "epoch"),
                _int(h, "part"), _reason(h),
            )  # fmt: skip
        case Kind.HEARTBEAT:
            return Heartbeat(
                _str(h, "node"), _int(h, "seq"), _int(h, "committed"),
                _int(h, "session", 0, MAX_SESSION),
            )  # fmt: skip
        case Kind.HANDOVER:
            return Handover(_int(h, "session", 0, MAX_SESSION), _str(h, "node"), _int(h, "epoch"))
        case Kind.BYE:
            return Bye(_int(h, "session", 0, MAX_SESSION), _str(h, "node"), _reason(h))
    return _decode_pages(h, frames, max_pages)


def _reason(h: dict[str, Any]) -> str:
    reason = h["reason"]
    if type(reason) is not str or len(reason) > 1024:
        raise WireError("field 'reason' must be a string of at most 1024 characters")
    return reason


_KINDS = bytes(PageKind)


def _decode_pages(h: dict[str, Any], frames: Sequence[bytes | memoryview], max_pages: int) -> Pages:
    count = _int(h, "count", 0, min(max_pages, MAX_PAGES - 1))
    counts = h["frames"]
    if type(counts) is not list or any(type(c) is not int or c < 1 for c in counts):
        raise WireError(
            f"field 'frames' must be a list of positive page counts, got {counts!r:.80}"
        )
    if len(frames) != 6 + len(counts):
        raise WireError(f"PAGES has {len(frames)} frames, its header announces {6 + len(counts)}")
    if sum(counts) != count:
        raise WireError(f"data frames hold {sum(counts)} pages, header says {count}")
    if type(h["final"]) is not bool:
        raise WireError(f"field 'final' must be a boolean, got {h['final']!r}")
    _, index_f, kinds_f, lens_f, sums_f, state, *data = frames
    if len(kinds_f) != count:
        raise WireError(f"kinds frame is {len(kinds_f)} bytes for {count} pages")
    index = _array(index_f, "I", count, "index")
    lens = _array(lens_f, "I", count, "lens")
    sums = _array(sums_f, "Q", count, "checksums")
    kinds = bytes(kinds_f)
    if kinds.translate(None, _KINDS):
        bad = kinds.translate(None, _KINDS)[0]
        raise WireError(f"page {index[kinds.index(bad)]} has unknown encoding {bad}")
    if count and max(lens) > PAGE_SIZE:
        raise WireError(f"a page encoding of {max(lens)} bytes is longer than a page")
    data_len = _int(h, "data_len", 0, MAX_PAGES * PAGE_SIZE)
    at = 0
    for i, (n, frame) in enumerate(zip(counts, data, strict=True)):
        want = sum(lens[at : at + n])
        if len(frame) != want:
            raise WireError(
                f"data frame {i} is {len(frame)} bytes, its {n} pages' lengths add up to {want}"
            )
        at += n
    if data_len != sum(len(f) for f in data):
        raise WireError(
            f"data frames hold {sum(len(f) for f in data)} bytes, header says {data_len}"
        )
    state_len = _int(h, "state_len", 0, MAX_STATE)
    if state_len != len(state):
        raise WireError(f"state frame is {len(state)} bytes, header says {state_len}")
    return Pages(
        _int(h, "epoch"),
        _int(h, "part"),
        h["final"],
        index,
        kinds,
        lens,
        sums,
        list(data),
        counts,
        state,
        _int(h, "state_sum", 0, (1 << 64) - 1),
        _outputs(h["outputs"]),
        _int(h, "session", 0, MAX_SESSION),
        _int(h, "seq"),
    )
