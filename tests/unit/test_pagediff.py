"""The native page-diff engine against the pure-Python reference."""

from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.replication import pagediff as pd
from tests.unit import pagediff_reference as ref

PS = pd.PAGE_SIZE

# (page, offset, byte) edits; offsets include both ends of a page on purpose
edits = st.lists(
    st.tuples(
        st.integers(0, 15),
        st.one_of(st.sampled_from([0, 1, PS - 2, PS - 1]), st.integers(0, PS - 1)),
        st.integers(0, 255),
    ),
    max_size=40,
)


def filled(npages: int, seed: int, zero_pages: frozenset[int] = frozenset()) -> bytes:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(npages * PS))
    for p in zero_pages:
        data[p * PS : (p + 1) * PS] = bytes(PS)
    return bytes(data)


def mapped(content: bytes) -> pd.mmap.mmap:
    buf = pd.alloc_pages(len(content) // PS)
    buf[:] = content
    return buf


def apply_edits(buf: pd.mmap.mmap, npages: int, changes: list[tuple[int, int, int]]) -> None:
    for page, off, val in changes:
        buf[(page % npages) * PS + off] = val


@settings(max_examples=150, deadline=None)
@given(
    npages=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    changes=edits,
    zeros=st.frozensets(st.integers(0, 15), max_size=4),
)
def test_exact_scan_equals_reference(npages, seed, changes, zeros):
    base = filled(npages, seed, frozenset(z for z in zeros if z < npages))
    ram, shadow = mapped(base), mapped(base)
    apply_edits(ram, npages, changes)
    expected = ref.dirty(ram, shadow)
    assert list(pd.scan_exact(ram, shadow, update_shadow=False)) == expected
    assert bytes(shadow) == base  # not updated
    assert list(pd.scan_exact(ram, shadow)) == expected
    assert bytes(shadow) == bytes(ram)
    assert list(pd.scan_exact(ram, shadow)) == []


@settings(max_examples=150, deadline=None)
@given(npages=st.integers(1, 16), seed=st.integers(0, 2**32), changes=edits)
def test_hashed_scan_equals_reference(npages, seed, changes):
    base = filled(npages, seed)
    ram = mapped(base)
    table = bytearray(pd.hash_table_size(len(ram)))
    assert list(pd.scan_hashed(ram, table)) == list(range(npages))  # empty table: all new
    assert list(pd.scan_hashed(ram, table)) == []
    apply_edits(ram, npages, changes)
    assert list(pd.scan_hashed(ram, table)) == ref.dirty(ram, base)
    assert list(pd.scan_hashed(ram, table)) == []


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
def test_threaded_scans_equal_reference(threads):
    npages = 5000  # enough for several slices of the minimum size
    base = filled(npages, 7)
    ram, shadow = mapped(base), mapped(base)
    table = bytearray(pd.hash_table_size(len(ram)))
    pd.scan_hashed(ram, table, threads=threads)
    rnd = random.Random(threads)
    touched = sorted({0, npages - 1, 1023, 1024, 2500, *rnd.sample(range(npages), 300)})
    for p in touched:
        ram[p * PS + rnd.randrange(PS)] ^= 0xFF
    assert list(pd.scan_hashed(ram, table, threads=threads)) == touched
    assert list(pd.scan_exact(ram, shadow, threads=threads)) == touched
    assert bytes(shadow) == bytes(ram)
    assert pd.memcmp_ceiling(ram, mapped(base), threads=threads) == len(touched)


def test_gather_and_apply_round_trip_with_zero_pages():
    npages = 12
    base = filled(npages, 3, frozenset({0, 5, 11}))
    ram = mapped(base)
    dirty = [0, 2, 5, 9, 11]
    batch = pd.gather(ram, dirty)
    assert [pd.PageKind(k) for k in batch.kinds] == [
        pd.PageKind.ZERO,
        pd.PageKind.RAW,
        pd.PageKind.ZERO,
        pd.PageKind.RAW,
        pd.PageKind.ZERO,
    ]
    assert len(batch.data) == 2 * PS
    assert list(batch.lens) == [0, PS, 0, PS, 0]
    assert batch.checksums == pd.checksums(ram, dirty)  # taken as each page is copied
    image = mapped(filled(npages, 99))
    pd.apply_encoded(image, batch)
    for p in range(npages):
        page = image[p * PS : (p + 1) * PS]
        assert (page == base[p * PS : (p + 1) * PS]) == (p in dirty)


@settings(max_examples=100, deadline=None)
@given(npages=st.integers(1, 16), seed=st.integers(0, 2**32), changes=edits, delta=st.booleans())
def test_encode_pages_then_apply_reproduces_ram(npages, seed, changes, delta):
    base = filled(npages, seed)
    ram, shadow, image = mapped(base), mapped(base), mapped(base)
    apply_edits(ram, npages, changes)
    ram[0:PS] = bytes(PS)  # a page that became zero
    dirty = pd.scan_exact(ram, shadow, update_shadow=False)
    batch = pd.encode_pages(ram, shadow, dirty, delta=delta)
    assert bytes(shadow) == bytes(ram)
    kinds = set(batch.kinds)
    if not delta:
        assert pd.PageKind.DELTA not in kinds
    pd.apply_encoded(image, batch)
    assert bytes(image) == bytes(ram)
    assert pd.checksums(image, dirty) == pd.checksums(ram, dirty)


def test_small_changes_travel_as_small_deltas():
    base = filled(4, 1)
    ram, shadow = mapped(base), mapped(base)
    ram[PS + 100 : PS + 108] = b"12345678"
    ram[3 * PS : 4 * PS] = random.Random(5).randbytes(PS)  # a rewrite: raw
    batch = pd.encode_pages(ram, shadow, [1, 3])
    assert list(batch.kinds) == [pd.PageKind.DELTA, pd.PageKind.RAW]
    assert batch.lens[0] <= 12
    assert len(batch.data) == batch.lens[0] + PS


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    changes=st.lists(
        st.tuples(st.integers(0, PS - 1), st.binary(min_size=1, max_size=300)), max_size=12
    ),
)
def test_delta_round_trip(seed, changes):
    old = filled(1, seed)
    new = bytearray(old)
    for off, blob in changes:
        blob = blob[: PS - off]
        new[off : off + len(blob)] = blob
    enc = pd.delta_encode(old, new)
    if enc is None:
        return  # not smaller than a page: sent raw
    assert ref.decode(old, enc) == bytes(new)
    page = bytearray(old)
    pd.delta_decode(page, enc)
    assert page == new


def test_identical_page_delta_is_one_zero_run():
    page = filled(1, 2)
    assert pd.delta_encode(page, page) == bytes([0x80, 0x20])  # ULEB128 of 4096


def test_page_of_changes_is_not_delta_encoded():
    old = filled(1, 1)
    assert pd.delta_encode(old, bytes(b ^ 0xFF for b in old)) is None


def _decode_in_guarded_page(enc: bytes, content: bytes) -> tuple[bool, bytes]:
    """Decode into the middle page of three and check the guard pages survive."""
    buf = bytearray(b"\xaa" * PS + content + b"\x55" * PS)
    view = memoryview(buf)[PS : 2 * PS]
    try:
        pd.delta_decode(view, enc)
        ok = True
    except pd.CorruptEncoding:
        ok = False
    assert buf[:PS] == b"\xaa" * PS and buf[2 * PS :] == b"\x55" * PS
    return ok, bytes(buf[PS : 2 * PS])


@settings(max_examples=500, deadline=None)
@given(enc=st.binary(max_size=64))
def test_decoder_on_random_bytes_agrees_with_reference(enc):
    content = filled(1, 4)
    ok, after = _decode_in_guarded_page(enc, content)
    expected = ref.decode(content, enc)
    assert ok == (expected is not None)
    assert after == (expected if ok else content)  # a rejected delta changes nothing


@settings(max_examples=500, deadline=None)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_decoder_on_mutated_deltas_agrees_with_reference(seed, data):
    rnd = random.Random(seed)
    old = filled(1, seed)
    new = bytearray(old)
    for _ in range(rnd.randrange(1, 8)):
        off = rnd.randrange(PS)
        blob = rnd.randbytes(min(rnd.randrange(1, 200), PS - off))
        new[off : off + len(blob)] = blob
    enc = bytearray(pd.delta_encode(old, new) or b"")
    op = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if op == "flip" and enc:
        enc[rnd.randrange(len(enc))] ^= 1 << rnd.randrange(8)
    elif op == "truncate":
        del enc[rnd.randrange(len(enc) + 1) :]
    elif op == "extend":
        enc += rnd.randbytes(rnd.randrange(1, 5))
    elif enc:
        at = rnd.randrange(len(enc))
        enc[at:at] = rnd.randbytes(rnd.randrange(1, 4))
    ok, after = _decode_in_guarded_page(bytes(enc), old)
    expected = ref.decode(old, bytes(enc))
    assert ok == (expected is not None)
    assert after == (expected if ok else old)


@pytest.mark.parametrize(
    "enc",
    [
        b"",  # nothing
        b"\x80",  # truncated varint
        b"\x80\x80\x01",  # overlong varint
        b"\x80\x00",  # non-minimal varint
        b"\x81\x20",  # zero run past the page end (4097)
        b"\x10\x05abc",  # non-zero run longer than the input
        b"\x00\x00",  # empty non-zero run
        b"\x80\x20\x00",  # trailing byte after the page
        b"\x05\x01x\x00\x01y",  # zero run of 0 after the start
        b"\x7f\x80\x20" + b"x" * 4096,  # non-zero run past the page end
    ],
)
def test_malformed_deltas_are_rejected_and_change_nothing(enc):
    content = filled(1, 8)
    ok, after = _decode_in_guarded_page(enc, content)
    assert not ok and after == content


def test_apply_pages_is_all_or_nothing():
    base = filled(4, 1)
    ram, shadow, image = mapped(base), mapped(base), mapped(base)
    ram[10] = ram[10] ^ 1
    ram[2 * PS + 7] ^= 1
    batch = pd.encode_pages(ram, shadow, [0, 2])
    assert list(batch.kinds) == [pd.PageKind.DELTA, pd.PageKind.DELTA]
    bad = bytearray(batch.data)
    bad[-1] = 0xFF  # make the second delta's run overrun: the first must not be applied
    broken = [
        (batch.index, batch.kinds, batch.lens, bytes(bad[:-1])),  # short data
        (batch.index, batch.kinds, batch.lens, batch.data + b"x"),  # trailing data
        (batch.index, bytes([0, 9]), batch.lens, batch.data),  # unknown kind
        (array("I", [0, 4]), batch.kinds, batch.lens, batch.data),  # index out of range
        (batch.index, batch.kinds, array("I", [batch.lens[0], 0]), batch.data),  # lens off
    ]
    for index, kinds, lens, data in broken:
        with pytest.raises(pd.PageDiffError):
            pd.apply_pages(image, index, kinds, lens, data)
        assert bytes(image) == base
    pd.apply_encoded(image, batch)
    assert bytes(image) == bytes(ram)


def test_wrapper_errors_name_the_values():
    ram = pd.alloc_pages(4)
    with pytest.raises(pd.PageDiffError, match="5000 bytes, not a positive multiple"):
        pd.scan_exact(bytearray(5000), ram)
    with pytest.raises(pd.PageDiffError, match="shadow has 2 pages but ram has 4"):
        pd.scan_exact(ram, pd.alloc_pages(2))
    with pytest.raises(pd.PageDiffError, match="shadow is read-only"):
        pd.scan_exact(ram, bytes(len(ram)))
    with pytest.raises(pd.PageDiffError, match="not aligned to the page size"):
        big = pd.alloc_pages(5)
        pd.scan_exact(memoryview(big)[8 : 8 + 4 * PS], ram)
    with pytest.raises(pd.PageDiffError, match="hash table is 10 bytes but 4 pages need 64"):
        pd.scan_hashed(ram, bytearray(10))
    with pytest.raises(pd.PageDiffError, match=r"threads must be 1\.\.64, got 0"):
        pd.scan_exact(ram, pd.alloc_pages(4), threads=0)
    with pytest.raises(pd.PageDiffError, match="page index 4 is outside the image of 4 pages"):
        pd.gather(ram, [1, 4])
    with pytest.raises(pd.PageDiffError, match="must support the buffer protocol, got str"):
        pd.scan_exact("ram", ram)
    with pytest.raises(pd.PageDiffError, match="image is read-only"):
        pd.apply_pages(bytes(PS), [0], b"\x01", None, b"")
    with pytest.raises(pd.PageDiffError, match="old page is 10 bytes"):
        pd.delta_encode(bytes(10), bytes(PS))


def test_scan_of_a_shared_file_mapping(tmp_path):
    """Guest RAM is a file mapping; the engine reads it in place."""
    import mmap

    path = tmp_path / "ram"
    path.write_bytes(filled(8, 5))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
        shadow = mapped(bytes(ram))
        with path.open("r+b") as g:  # another writer, as the hypervisor would be
            g.seek(3 * PS + 17)
            g.write(b"!")
        assert list(pd.scan_exact(ram, shadow)) == [3]


def test_stage_verifies_every_page_before_commit_writes_any():
    base = filled(6, 11, frozenset({4}))
    ram, shadow, image = mapped(base), mapped(base), mapped(base)
    ram[PS + 9] ^= 0x55  # a small change: a delta page
    ram[2 * PS : 3 * PS] = filled(1, 12)  # a rewrite: a raw page
    ram[3 * PS : 4 * PS] = bytes(PS)  # now zero
    dirty = pd.scan_exact(ram, shadow, update_shadow=False)
    sums = pd.checksums(ram, dirty)
    batch = pd.encode_pages(ram, shadow, dirty)
    assert sorted(batch.kinds) == [pd.PageKind.RAW, pd.PageKind.ZERO, pd.PageKind.DELTA]
    for pos in range(3):  # a wrong checksum on any page: refused, image untouched
        bad = array("Q", sums)
        bad[pos] ^= 1
        with pytest.raises(pd.CorruptEncoding, match=f"page {dirty[pos]} \\(position {pos}"):
            pd.stage_pages(image, batch.index, batch.kinds, batch.lens, batch.data, bad)
        assert bytes(image) == base
    staged = pd.stage_pages(image, batch.index, batch.kinds, batch.lens, batch.data, sums)
    assert bytes(image) == base  # staging writes nothing
    staged.commit()
    assert bytes(image) == bytes(ram)
    with pytest.raises(pd.PageDiffError, match="already committed"):
        staged.commit()
