"""Typed wrapper over the native page-diff engine (native/pagediff.c).

Buffers are anything that exposes the buffer protocol (mmap of a RAM file,
bytearray, memoryview, numpy array) and are passed to C without copying.
RAM, shadow and image buffers must be page-aligned and a whole number of
pages; use :func:`alloc_pages` to get one.  Every C error code becomes a
:class:`PageDiffError` naming what was wrong.  The C calls release the GIL.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from mirror._pagediff import ffi, lib
from mirror.guests.procram import ProcessRam

PAGE_SIZE: int = lib.PD_PAGE_SIZE
HASH_SIZE: int = lib.PD_HASH_SIZE
MAX_THREADS: int = lib.PD_MAX_THREADS

Buffer = Any  # an object with the buffer protocol


class PageKind(IntEnum):
    """How one page travels in a checkpoint."""

    RAW = lib.PD_KIND_RAW
    ZERO = lib.PD_KIND_ZERO
    DELTA = lib.PD_KIND_DELTA


class PageDiffError(ValueError):
    """A bad argument or malformed input given to the page-diff engine."""


class CorruptEncoding(PageDiffError):
    """Encoded pages that do not decode: nothing was written."""


_ERRORS = {
    lib.PD_EINVAL: "invalid argument",
    lib.PD_EBOUNDS: "page index outside the image",
    lib.PD_ECORRUPT: "malformed encoded page data",
    lib.PD_ENOSPC: "output buffer too small",
}


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    cls = CorruptEncoding if rc == lib.PD_ECORRUPT else PageDiffError
    raise cls(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def alloc_pages(npages: int) -> mmap.mmap:
    """Anonymous, page-aligned, zero-filled memory of ``npages`` pages."""
    if npages < 1:
        raise PageDiffError(f"npages must be at least 1, got {npages}")
    return mmap.mmap(-1, npages * PAGE_SIZE)


def _view(obj: Buffer, name: str, *, writable: bool = False) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise PageDiffError(
            f"{name} must support the buffer protocol, got {type(obj).__name__}"
        ) from None
    if not view.c_contiguous:
        raise PageDiffError(f"{name} must be C-contiguous")
    if writable and view.readonly:
        raise PageDiffError(f"{name} is read-only but must be written to")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _pages(obj: Buffer, name: str, *, writable: bool = False) -> tuple[Any, int]:
    """A page-aligned whole-page buffer as (cdata, npages)."""
    view = _view(obj, name, writable=writable)
    if view.nbytes == 0 or view.nbytes % PAGE_SIZE:
        raise PageDiffError(
            f"{name} is {view.nbytes} bytes, not a positive multiple of the page size {PAGE_SIZE}"
        )
    ptr = ffi.from_buffer("uint8_t[]", view, require_writable=writable)
    addr = int(ffi.cast("uintptr_t", ptr))
    if addr % PAGE_SIZE:
        raise PageDiffError(
            f"{name} starts at 0x{addr:x}, which is not aligned to the page size "
            f"{PAGE_SIZE}; map it with mmap or alloc_pages()"
        )
    return ptr, view.nbytes // PAGE_SIZE


def _bytes(obj: Buffer, name: str, *, writable: bool = False) -> tuple[Any, int]:
    view = _view(obj, name, writable=writable)
    return ffi.from_buffer("uint8_t[]", view, require_writable=writable), view.nbytes


def _threads(threads: int) -> int:
    if not 1 <= threads <= MAX_THREADS:
        raise PageDiffError(f"threads must be 1..{MAX_THREADS}, got {threads}")
    return threads


def _index(dirty: Sequence[int] | array[int], npages: int) -> tuple[Any, int]:
    arr = dirty if isinstance(dirty, array) and dirty.typecode == "I" else array("I", dirty)
    for i in (arr[0], arr[-1]) if len(arr) else ():
        if i >= npages:
            raise PageDiffError(f"page index {i} is outside the image of {npages} pages")
    return ffi.from_buffer("uint32_t[]", arr), len(arr)


def hash_table_size(ram_bytes: int) -> int:
    """Bytes of hash table that a hashed scan of ``ram_bytes`` of RAM needs."""
    return (ram_bytes // PAGE_SIZE) * HASH_SIZE


def scan_exact(
    ram: Buffer, shadow: Buffer, *, update_shadow: bool = True, threads: int = 1
) -> array[int]:
    """Indices of the pages where ``ram`` differs from ``shadow``, ascending.

    With ``update_shadow`` the shadow copy of each dirty page is refreshed.
    """
    ram_p, npages = _pages(ram, "ram")
    sh_p, sh_pages = _pages(shadow, "shadow", writable=True)
    if sh_pages != npages:
        raise PageDiffError(f"shadow has {sh_pages} pages but ram has {npages}")
    out = array("I", bytes(4 * npages))
    n = _check(
        lib.pd_scan_exact(
            ram_p,
            sh_p,
            npages,
            int(update_shadow),
            ffi.from_buffer("uint32_t[]", out),
            _threads(threads),
        ),
        "exact scan",
    )
    del out[n:]
    return out


def scan_hashed(ram: Buffer, table: Buffer, *, threads: int = 1) -> array[int]:
    """Indices of the pages whose 128-bit hash differs from ``table``; updates it."""
    if isinstance(ram, ProcessRam):  # a part at a time, through a buffer of ours
        found = array("I")
        scratch = alloc_pages(min(_CHUNK, ram.npages))
        for first in range(0, ram.npages, _CHUNK):
            count = min(_CHUNK, ram.npages - first)
            ram.read_range(first, count, scratch)
            part = memoryview(table)[first * HASH_SIZE : (first + count) * HASH_SIZE]
            found.extend(i + first for i in scan_hashed(
                memoryview(scratch)[: count * PAGE_SIZE], part, threads=threads))
        return found
    ram_p, npages = _pages(ram, "ram")
    tab_p, tab_len = _bytes(table, "hash table", writable=True)
    if tab_len != npages * HASH_SIZE:
        raise PageDiffError(
            f"hash table is {tab_len} bytes but {npages} pages need "
            f"{npages * HASH_SIZE} ({HASH_SIZE} a page)"
        )
    out = array("I", bytes(4 * npages))
    n = _check(
        lib.pd_scan_hashed(
            ram_p, tab_p, npages, ffi.from_buffer("uint32_t[]", out), _threads(threads)
        ),
        "hashed scan",
    )
    del out[n:]
    return out


@dataclass(frozen=True)
class EncodedPages:
    """A batch of pages ready to send: kinds and lengths per page, one payload."""

    index: array[int]
    kinds: bytes
    lens: array[int]
    data: bytes | memoryview  # a view into the caller's ``out`` buffer when one was given
    checksums: array[int] | None = None  # XXH3-64 of each page's content, when computed

    @property
    def raw_bytes(self) -> int:
        return len(self.index) * PAGE_SIZE


def _out_buffer(out: Buffer | None, n: int) -> tuple[Any, Any]:
    """The caller's reusable output buffer (checked for room), or a new one."""
    if out is None:
        out = bytearray(n * PAGE_SIZE)
    elif len(out) < n * PAGE_SIZE:
        raise PageDiffError(f"out is {len(out)} bytes but {n} pages may need {n * PAGE_SIZE}")
    return out, ffi.from_buffer("uint8_t[]", out, require_writable=True)


def _payload(out: Buffer, size: int, reused: bool) -> bytes | memoryview:
    return memoryview(out)[:size] if reused else bytes(out[:size])


def gather(
    ram: Buffer, dirty: Sequence[int] | array[int], *, out: Buffer | None = None
) -> EncodedPages:
    """Copy the listed pages of ``ram`` into one buffer; zero pages become flags.
    Each page's checksum is taken as it is copied (``checksums``).

    Pass a reusable ``out`` (room for every listed page) to avoid an
    allocation and a copy: the result's ``data`` is then a view into it.

    RAM of another process (:class:`ProcessRam`) is read into ``out`` first (one
    ``process_vm_readv``), then gathered there in place: still one copy of each page.
    """
    if isinstance(ram, ProcessRam):
        return _gather_process(ram, dirty, out)
    ram_p, npages = _pages(ram, "ram")
    idx_p, n = _index(dirty, npages)
    kinds = bytearray(n)
    lens = array("I", bytes(4 * n))
    sums = array("Q", bytes(8 * n))
    buf, buf_p = _out_buffer(out, n)
    size = _check(
        lib.pd_gather(
            ram_p,
            npages,
            idx_p,
            n,
            ffi.from_buffer("uint8_t[]", kinds),
            ffi.from_buffer("uint32_t[]", lens),
            ffi.from_buffer("uint64_t[]", sums),
            buf_p,
            len(buf),
        ),
        "gather",
    )
    data = _payload(buf, size, out is not None)
    return EncodedPages(array("I", idx_p), bytes(kinds), lens, data, sums)


def _gather_process(
    ram: ProcessRam, dirty: Sequence[int] | array[int], out: Buffer | None
) -> EncodedPages:
    index = dirty if isinstance(dirty, array) and dirty.typecode == "I" else array("I", dirty)
    _index(index, ram.npages)
    if out is None:
        out = alloc_pages(max(1, len(index)))
    buf, _ = _out_buffer(out, len(index))
    if index:
        ram.read_pages(index, buf)
    local = gather(memoryview(buf)[: max(1, len(index)) * PAGE_SIZE], range(len(index)), out=buf)
    return EncodedPages(array("I", index), local.kinds, local.lens, local.data, local.checksums)


_CHUNK = 8192  # pages read at a time from another process's RAM (32 MiB)


def encode_pages(
    ram: Buffer,
    shadow: Buffer,
    dirty: Sequence[int] | array[int],
    *,
    delta: bool = True,
    out: Buffer | None = None,
) -> EncodedPages:
    """Encode the listed pages (zero flag, delta against ``shadow``, or raw).

    The shadow copy of each listed page is then set to its new content, so
    ``shadow`` must hold exactly what the receiver's image holds.  ``out``
    works as for :func:`gather`.
    """
    ram_p, npages = _pages(ram, "ram")
    sh_p, sh_pages = _pages(shadow, "shadow", writable=True)
    if sh_pages != npages:
        raise PageDiffError(f"shadow has {sh_pages} pages but ram has {npages}")
    idx_p, n = _index(dirty, npages)
    kinds = bytearray(n)
    lens = array("I", bytes(4 * n))
    buf, buf_p = _out_buffer(out, n)
    size = _check(
        lib.pd_encode_pages(
            ram_p,
            sh_p,
            npages,
            idx_p,
            n,
            int(delta),
            ffi.from_buffer("uint8_t[]", kinds),
            ffi.from_buffer("uint32_t[]", lens),
            buf_p,
            len(buf),
        ),
        "encode pages",
    )
    return EncodedPages(array("I", idx_p), bytes(kinds), lens, _payload(buf, size, out is not None))


def apply_pages(
    image: Buffer,
    index: Sequence[int] | array[int],
    kinds: Buffer,
    lens: Sequence[int] | array[int] | None,
    data: Buffer,
) -> None:
    """Write encoded pages into ``image``: all of them, or (on any error) none."""
    img_p, npages = _pages(image, "image", writable=True)
    idx_arr = index if isinstance(index, array) and index.typecode == "I" else array("I", index)
    kinds_p, nk = _bytes(kinds, "kinds")
    if nk != len(idx_arr):
        raise PageDiffError(f"{nk} kinds for {len(idx_arr)} pages")
    lens_p = ffi.NULL
    if lens is not None:
        lens_arr = lens if isinstance(lens, array) and lens.typecode == "I" else array("I", lens)
        if len(lens_arr) != len(idx_arr):
            raise PageDiffError(f"{len(lens_arr)} lengths for {len(idx_arr)} pages")
        lens_p = ffi.from_buffer("uint32_t[]", lens_arr)
    data_p, data_len = _bytes(data, "data")
    _check(
        lib.pd_apply_pages(
            img_p,
            npages,
            ffi.from_buffer("uint32_t[]", idx_arr),
            len(idx_arr),
            kinds_p,
            lens_p,
            data_p,
            data_len,
        ),
        "apply pages",
    )


def apply_encoded(image: Buffer, pages: EncodedPages) -> None:
    """Apply a batch from :func:`gather` or :func:`encode_pages` to ``image``."""
    apply_pages(image, pages.index, pages.kinds, pages.lens, pages.data)


def _one_page(obj: Buffer, name: str, *, writable: bool = False) -> Any:
    ptr, size = _bytes(obj, name, writable=writable)
    if size != PAGE_SIZE:
        raise PageDiffError(f"{name} is {size} bytes; a page is {PAGE_SIZE}")
    return ptr


def delta_encode(old: Buffer, new: Buffer) -> bytes | None:
    """The delta from ``old`` to ``new`` (one page each), or None if not smaller."""
    out = bytearray(PAGE_SIZE - 1)
    rc = lib.pd_delta_encode(
        _one_page(old, "old page"),
        _one_page(new, "new page"),
        ffi.from_buffer("uint8_t[]", out),
        len(out),
    )
    if rc == lib.PD_ENOSPC:
        return None
    return bytes(out[: _check(rc, "delta encode")])


def delta_decode(page: Buffer, enc: Buffer) -> None:
    """Apply a delta to ``page`` in place; a malformed delta leaves it untouched."""
    enc_p, enc_len = _bytes(enc, "delta")
    _check(
        lib.pd_delta_decode(_one_page(page, "page", writable=True), enc_p, enc_len), "delta decode"
    )


def checksums(base: Buffer, dirty: Sequence[int] | array[int]) -> array[int]:
    """A 64-bit XXH3 checksum of each listed page of ``base``."""
    base_p, npages = _pages(base, "buffer")
    idx_p, n = _index(dirty, npages)
    out = array("Q", bytes(8 * n))
    _check(
        lib.pd_checksum_pages(base_p, npages, idx_p, n, ffi.from_buffer("uint64_t[]", out)),
        "checksum",
    )
    return out


def memcmp_ceiling(a: Buffer, b: Buffer, *, threads: int = 1) -> int:
    """Benchmark ceiling: plain page-by-page memcmp; returns the differing count."""
    a_p, na = _pages(a, "a")
    b_p, nb = _pages(b, "b")
    if na != nb:
        raise PageDiffError(f"buffers differ in size: {na} and {nb} pages")
    return _check(lib.pd_memcmp_pages(a_p, b_p, na, _threads(threads)), "memcmp")


def read_ceiling(buf: Buffer, *, threads: int = 1) -> int:
    """Benchmark ceiling: one plain read pass; returns an OR-fold of the words."""
    p, npages = _pages(buf, "buffer")
    fold = ffi.new("uint64_t *")
    _check(lib.pd_read_pass(p, npages, _threads(threads), fold), "read pass")
    return int(fold[0])


def simd_flavour() -> str:
    """The instruction set the hashed scan uses on this CPU ("avx2" or "sse2")."""
    return str(ffi.string(lib.pd_simd_flavour()).decode())


def checksum_bytes(buf: Buffer) -> int:
    """XXH3-64 of a byte string (device state, whole frames)."""
    p, n = _bytes(buf, "buffer")
    return int(lib.pd_checksum_bytes(p, n))


class StagedBatch:
    """A verified batch of pages, ready to commit to its image in one step.

    Made by :func:`stage_pages`; holds references to the received frames
    and the delta pages already decoded into scratch memory.
    """

    def __init__(self, image_p: Any, args: tuple[Any, ...], keep: tuple[Any, ...]) -> None:
        self._image_p = image_p
        self._args = args
        self._keep = keep  # the buffers the cdata pointers point into
        self.committed = False

    def commit(self) -> None:
        if self.committed:
            raise PageDiffError("this batch was already committed")
        lib.pd_commit_staged(self._image_p, *self._args)
        self.committed = True


def stage_pages(
    image: Buffer,
    index: array[int],
    kinds: Buffer,
    lens: array[int],
    data: Buffer,
    checksums: array[int],
) -> StagedBatch:
    """Validate a batch and verify every page's new content against its checksum.

    Nothing is written to ``image``; :meth:`StagedBatch.commit` writes it.
    Raises :class:`CorruptEncoding` naming the first bad page.
    """
    img_p, npages = _pages(image, "image", writable=True)
    n = len(index)
    kinds_p, nk = _bytes(kinds, "kinds")
    if nk != n or len(lens) != n or len(checksums) != n:
        raise PageDiffError(
            f"batch of {n} pages has {nk} kinds, {len(lens)} lengths, {len(checksums)} checksums"
        )
    idx_p = ffi.from_buffer("uint32_t[]", index)
    lens_p = ffi.from_buffer("uint32_t[]", lens)
    sums_p = ffi.from_buffer("uint64_t[]", checksums)
    data_p, data_len = _bytes(data, "data")
    has_delta = PageKind.DELTA in memoryview(kinds).cast("B")
    scratch = bytearray(n * PAGE_SIZE) if has_delta else bytearray(1)
    scratch_p = ffi.from_buffer("uint8_t[]", scratch)
    bad = ffi.new("uint64_t *")
    rc = lib.pd_stage_pages(
        img_p, npages, idx_p, n, kinds_p, lens_p, data_p, data_len, sums_p, scratch_p, bad
    )
    if rc == lib.PD_ECORRUPT and n:
        pos = int(bad[0])
        raise CorruptEncoding(
            f"stage pages: page {index[pos]} (position {pos} of {n}) does not verify"
        )
    _check(rc, "stage pages")
    return StagedBatch(
        img_p,
        (idx_p, n, kinds_p, lens_p, data_p, scratch_p),
        (image, index, kinds, lens, data, scratch),
    )


def hash_pages(base: Buffer, pages: Sequence[int] | array[int], table: Buffer) -> None:
    """Set the hash-table entries of the listed pages from their content in ``base``
    (as :func:`scan_hashed` would)."""
    base_p, npages = _pages(base, "buffer")
    tab_p, tab_len = _bytes(table, "hash table", writable=True)
    if tab_len != npages * HASH_SIZE:
        raise PageDiffError(f"hash table is {tab_len} bytes but {npages} pages need more")
    idx_p, n = _index(pages, npages)
    _check(lib.pd_hash_pages(base_p, npages, idx_p, n, tab_p), "hash pages")


def hash_gathered(table: Buffer, batch: EncodedPages) -> None:
    """Set the hash-table entries of a batch from :func:`gather` to the content it
    carries, so that the table describes what the receiver will hold."""
    tab_p, tab_len = _bytes(table, "hash table", writable=True)
    npages = tab_len // HASH_SIZE
    idx_p, n = _index(batch.index, npages)
    data_p, data_len = _bytes(batch.data, "data")
    _check(
        lib.pd_hash_gathered(
            tab_p, npages, idx_p, n, ffi.from_buffer("uint8_t[]", batch.kinds), data_p, data_len
        ),
        "hash gathered pages",
    )


def hash_verify(ram: Buffer, table: Buffer, first: int, count: int) -> array[int]:
    """The pages of [first, first + count) whose hash differs from ``table`` (which is
    left as it is)."""
    if isinstance(ram, ProcessRam):
        if not (0 <= first <= first + count <= ram.npages):
            raise PageDiffError(f"pages {first}..{first + count} are outside {ram.npages} pages")
        found = array("I")
        scratch = alloc_pages(max(1, min(_CHUNK, count)))
        for a in range(first, first + count, _CHUNK):
            n = min(_CHUNK, first + count - a)
            ram.read_range(a, n, scratch)
            part = memoryview(table)[a * HASH_SIZE : (a + n) * HASH_SIZE]
            found.extend(i + a for i in hash_verify(
                memoryview(scratch)[: n * PAGE_SIZE], part, 0, n))
        return found
    ram_p, npages = _pages(ram, "ram")
    tab_p, tab_len = _bytes(table, "hash table")
    if tab_len != npages * HASH_SIZE:
        raise PageDiffError(f"hash table is {tab_len} bytes but {npages} pages need more")
    if not (0 <= first <= first + count <= npages):
        raise PageDiffError(f"pages {first}..{first + count} are outside {npages} pages")
    out = array("I", bytes(4 * max(1, count)))
    n = _check(
        lib.pd_hash_verify(
            ram_p, tab_p, npages, first, first + count, ffi.from_buffer("uint32_t[]", out)
        ),
        "hash verify",
    )
    del out[n:]
    return out
