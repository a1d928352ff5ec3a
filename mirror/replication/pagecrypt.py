"""The checkpoint stream's sealing: PAGES messages under AES-256-GCM, off CurveZMQ.

With keys, a pair's control messages (HELLO, WELCOME, acks, REJECTs, BYE, HANDOVER,
heartbeats) travel on the CurveZMQ sockets of mirror.replication.link; the PAGES
messages (pre-copy parts and checkpoints: nearly every byte the pair sends) travel on a
socket of their own without CURVE, each part sealed here, in the native engine
(native/pagecrypt.c: OpenSSL's AES-256-GCM, with AES-NI/VAES where the CPU has them),
under a key of the pairing session that both hosts derive on their own
(:func:`page_key`: the disk stream's derivation, mirror.replication.disk.session_key,
with a label of its own).  docs/security.md says why and what it costs.

A PAGES message of send number ``seq`` (the primary's, new for every sending, resends
included) goes as 1 + K zmq messages, each ``[prefix, sealed]``: the head (part 0: the
message's header, page list, checksums and device state, every byte of it encrypted)
and then its K page-data frames (parts 1..K).  The prefix (magic, head or data, seq,
part, K) is the associated data; the nonce is (seq, part), built in C; the key is new
for each session.  So the standby (:class:`Opener`) refuses, before anything of it is
decoded, let alone applied: a part with a bit flipped (its tag), a part under another
key (another session, another pair, a stranger), a message whose send number is not
above the last one it opened (a replay), and a data part that is not the next one of
the message it assembles (reordered, dropped, or of another message: its nonce is the
expected part's, so its tag fails).  Each part is sealed just before zmq takes it and
opened as soon as it is in, so the cipher runs beside the transfer on both sides: the
sealing never runs inside the checkpoint's pause (the engine sends after the resume).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from mirror._pagediff import ffi, lib
from mirror.replication.disk import session_key
from mirror.replication.keys import LinkKeys
from mirror.replication.wire import WireError

STREAM = b"mirror checkpoint pages 1"  # the key's label in the shared derivation
MAGIC = b"MPG1"
PREFIX = struct.Struct("<4sBQII")  # magic, HEAD or DATA, seq, part, data parts (K)
HEAD, DATA = 0, 1
TAG = int(lib.PC_TAG_SIZE)
SMALL_FRAMES = 6  # header, index, kinds, lens, checksums, state: the head's plaintext
_LEN = struct.Struct("<Q")
_raw = ffi.new_allocator(should_clear_after_alloc=False)  # sealed frames: no memset


class SealError(WireError):
    """A sealed part refused (nothing of it used).  ``refused``: (session, seq, epoch,
    part) of the message whose head had verified, so that the standby can REJECT it and
    the primary send it again; None when nothing of it could be believed."""

    def __init__(self, msg: str, refused: tuple[int, int, int, int] | None = None) -> None:
        super().__init__(msg)
        self.refused = refused


def page_key(keys: LinkKeys, pair: str, generation: int, session: int) -> bytes:
    """The pages' key of one pairing session (32 bytes): HMAC-SHA256 of X25519(this
    host's secret key, the peer's public key) over this label, the pair, the generation
    and the interconnect session: what only the pair's two hosts can compute."""
    return session_key(keys.secret, keys.peer, pair, generation, session, stream=STREAM)


def _u8(b: bytes) -> Any:
    return ffi.from_buffer("uint8_t[]", b)


def seal(key: bytes, seq: int, part: int, aad: bytes, data: bytes | memoryview) -> Any:
    """``data`` sealed (a new buffer: ciphertext, then the 16-byte tag)."""
    n = len(data)
    out = _raw("uint8_t[]", n + TAG)
    src = ffi.from_buffer("uint8_t[]", data) if n else ffi.NULL
    if lib.pc_seal(_u8(key), seq, part, _u8(aad), len(aad), src, n, out):
        raise SealError("cannot seal a checkpoint part (OpenSSL failed)")
    return ffi.buffer(out)


def open_in_place(key: bytes, seq: int, part: int, aad: bytes, buf: Any) -> memoryview:
    """The plaintext of a sealed part, opened where it lies (``buf``: what zmq received,
    ciphertext and tag); SealError if its tag does not verify."""
    view = memoryview(buf)
    if len(view) < TAG:
        raise SealError(f"a sealed part of {len(view)} bytes is shorter than its tag")
    n = len(view) - TAG
    p = ffi.from_buffer("uint8_t[]", view)  # zmq's own copy of the frame: ours to write
    rc = lib.pc_open(_u8(key), seq, part, _u8(aad), len(aad), p, n)
    if rc == lib.PC_FORGED:
        raise SealError("does not verify")
    if rc:
        raise SealError("cannot open a checkpoint part (OpenSSL failed)")
    return view[:n]


def sealed_messages(
    key: bytes, seq: int, frames: Sequence[bytes | memoryview]
) -> Iterator[list[Any]]:
    """The zmq messages of one PAGES message (its frames as wire.encode makes them) under
    send number ``seq``: the head, then each data frame, each sealed when it is asked
    for (so that zmq sends one while the next is sealed)."""
    small, data = frames[:SMALL_FRAMES], frames[SMALL_FRAMES:]
    head = b"".join(b for f in small for b in (_LEN.pack(len(f)), f))
    prefix = PREFIX.pack(MAGIC, HEAD, seq, 0, len(data))
    yield [prefix, seal(key, seq, 0, prefix, head)]
    for i, frame in enumerate(data, 1):
        prefix = PREFIX.pack(MAGIC, DATA, seq, i, len(data))
        yield [prefix, seal(key, seq, i, prefix, frame)]


def _small_frames(head: memoryview) -> list[memoryview]:
    out, at = [], 0
    while at < len(head):
        if at + _LEN.size > len(head):
            raise WireError("a sealed head ends inside a frame's length")
        (n,) = _LEN.unpack_from(head, at)
        at += _LEN.size
        if n > len(head) - at:
            raise WireError("a sealed head's frame runs past its end")
        out.append(head[at : at + n])
        at += n
    if len(out) != SMALL_FRAMES:
        raise WireError(f"a sealed head holds {len(out)} frames, not {SMALL_FRAMES}")
    return out


def _which(header: memoryview, seq: int) -> tuple[int, int, int, int] | None:
    """(session, seq, epoch, part) of a head that verified, as far as its header says."""
    try:
        h = msgpack.unpackb(header, raw=False, max_str_len=4096, max_bin_len=1 << 16)
        vals = [h.get("session"), seq, h.get("epoch"), h.get("part")]
    except Exception:  # decoded in full (and refused if malformed) by wire.decode later
        return None
    if all(type(v) is int and 0 <= v < 1 << 63 for v in vals):
        return vals[0], vals[1], vals[2], vals[3]
    return None


class Opener:
    """The standby's side of one session: its key, the last send number opened (no
    message at or below it is taken again), and the message being assembled, from one
    connection (zmq ``ident``) at a time."""

    def __init__(self, key: bytes) -> None:
        if len(key) != int(lib.PC_KEY_SIZE):
            raise ValueError("a pages key is 32 bytes")
        self.key = key
        self.last_seq = 0
        self.opened = 0  # parts opened
        self._ident: bytes | None = None
        self._seq = 0
        self._parts = 0
        self._frames: list[memoryview] = []
        self._which: tuple[int, int, int, int] | None = None

    def take(self, ident: bytes, frames: Sequence[Any]) -> list[memoryview] | None:
        """One received zmq message (``[prefix, sealed]``) from connection ``ident``: the
        frames of the whole PAGES message (to wire.decode) once its last part is in, else
        None.  SealError for a part refused (the message it belonged to is dropped)."""
        if len(frames) != 2 or len(frames[0]) != PREFIX.size:
            raise SealError("not a sealed checkpoint part (a stranger, or garbage)")
        magic, kind, seq, part, parts = PREFIX.unpack(bytes(frames[0]))
        if magic != MAGIC or kind not in (HEAD, DATA):
            raise SealError("not a sealed checkpoint part (a stranger, or garbage)")
        aad = bytes(frames[0])
        if kind == HEAD:
            if part != 0:
                raise SealError("a head that is not part 0")
            if seq <= self.last_seq:
                raise SealError(
                    f"send number {seq} refused: not above the last one opened "
                    f"({self.last_seq}): a replayed or reordered message"
                )
            try:
                head = open_in_place(self.key, seq, 0, aad, frames[1])
            except SealError as e:
                raise SealError(
                    f"a checkpoint head (send number {seq}) {e}: damaged, or not sealed "
                    f"under this session's key (another session, or a stranger)"
                ) from None
            self.opened += 1
            self.last_seq = seq  # verified: from now on older sendings are replays
            small = _small_frames(head)
            self._ident, self._seq, self._parts, self._frames = ident, seq, parts, small
            self._which = _which(small[0], seq)
        else:
            if self._ident is None or ident != self._ident:
                raise SealError("a sealed data part of no message being received")
            which = self._which
            expected = len(self._frames) - SMALL_FRAMES + 1
            try:
                if seq != self._seq or part != expected or parts != self._parts:
                    raise SealError("does not verify")  # its nonce is not the expected one
                opened = open_in_place(self.key, seq, expected, aad, frames[1])
            except SealError:
                self._reset()
                what = f"checkpoint {which[2]} part {which[3]}" if which else f"send number {seq}"
                raise SealError(
                    f"{what}: its sealed data part {expected} does not verify (a bit "
                    f"flipped, or a part replayed, reordered or dropped)",
                    which,
                ) from None
            self.opened += 1
            self._frames.append(opened)
        if len(self._frames) - SMALL_FRAMES < self._parts:
            return None
        whole = self._frames
        self._reset()
        return whole

    def _reset(self) -> None:
        self._ident, self._frames, self._which = None, [], None
