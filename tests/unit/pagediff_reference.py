"""A small pure-Python reference of the page-diff engine, for property tests.

Slow and obvious on purpose: the C engine must agree with it exactly.
"""

from __future__ import annotations

PS = 4096


def pages(buf: bytes | bytearray | memoryview) -> list[bytes]:
    data = bytes(buf)
    return [data[i : i + PS] for i in range(0, len(data), PS)]


def dirty(ram: bytes | memoryview, shadow: bytes | memoryview) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(pages(ram), pages(shadow), strict=True)) if a != b]


def _uleb(enc: bytes, pos: int) -> tuple[int, int] | None:
    if pos >= len(enc):
        return None
    b0 = enc[pos]
    if b0 < 0x80:
        return b0, pos + 1
    if pos + 1 >= len(enc):
        return None
    b1 = enc[pos + 1]
    if b1 & 0x80 or b1 == 0:
        return None
    return (b0 & 0x7F) | (b1 << 7), pos + 2


def decode(page: bytes, enc: bytes) -> bytes | None:
    """The page after applying delta ``enc``, or None if ``enc`` is malformed.

    Format: (zero-run, non-zero-run, XORed bytes)*, ending with a zero run
    that reaches the end of the page; run lengths are minimal ULEB128 of at
    most two bytes; a zero run of 0 only at the start; no empty non-zero run.
    """
    out = bytearray(page)
    pos = at = 0
    while at < PS:
        r = _uleb(enc, pos)
        if r is None:
            return None
        z, pos = r
        if z > PS - at or (z == 0 and at > 0):
            return None
        at += z
        if at == PS:
            break
        r = _uleb(enc, pos)
        if r is None:
            return None
        nz, pos = r
        if nz == 0 or nz > PS - at or nz > len(enc) - pos:
            return None
        for j in range(nz):
            out[at + j] ^= enc[pos + j]
        pos += nz
        at += nz
    return bytes(out) if pos == len(enc) else None
