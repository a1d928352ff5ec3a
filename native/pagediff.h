/*
 * pagediff: the native page-diff engine of mirror.
 *
 * Everything works on whole pages of PD_PAGE_SIZE bytes in buffers that map
 * guest RAM.  Functions return 0 (or a non-negative count) on success and a
 * negative PD_E* code on error; they never write outside the buffers whose
 * sizes they are given.  Scans take a thread count: the range is split into
 * contiguous slices, one per thread (a thread that cannot be started leaves
 * its slice to the caller's thread).
 *
 * The block between cdef-begin and cdef-end is read verbatim by the cffi
 * build script (native/build_pagediff.py), so it must stay plain C
 * declarations: no preprocessor directives inside it.
 */
#ifndef MIRROR_PAGEDIFF_H
#define MIRROR_PAGEDIFF_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
enum {
    PD_PAGE_SIZE = 4096,
    PD_HASH_SIZE = 16,
    PD_MAX_THREADS = 64
};

/* Error codes (negative return values). */
enum {
    PD_EINVAL = -1,    /* an argument is out of its domain */
    PD_EBOUNDS = -2,   /* a page index is outside the image */
    PD_ECORRUPT = -3,  /* an encoded page or page list is malformed */
    PD_ENOSPC = -4     /* the output buffer is too small */
};

/* How one page travels. */
enum {
    PD_KIND_RAW = 0,   /* PD_PAGE_SIZE bytes of content */
    PD_KIND_ZERO = 1,  /* an all-zero page: no payload */
    PD_KIND_DELTA = 2  /* XOR against the previous content, zero-run encoded */
};

/* Exact scan: compare ram with shadow page by page.  Writes the indices of
 * the pages that differ, ascending, to dirty (room for npages entries) and
 * returns how many.  With update_shadow, the shadow copy of each dirty page
 * is refreshed from ram. */
int64_t pd_scan_exact(const uint8_t *ram, uint8_t *shadow, uint64_t npages,
                      int update_shadow, uint32_t *dirty, int nthreads);

/* Hashed scan: compare a 128-bit XXH3 hash of each page with table
 * (PD_HASH_SIZE bytes a page) and update the table.  dirty may be NULL to
 * only (re)build the table; the return value is then still the count. */
int64_t pd_scan_hashed(const uint8_t *ram, uint8_t *table, uint64_t npages,
                       uint32_t *dirty, int nthreads);

/* Gather the listed pages of ram into out: zero pages become PD_KIND_ZERO
 * and take no room, every other page is copied whole (PD_KIND_RAW).
 * kinds and lens receive one entry per listed page; sums (may be NULL) the
 * XXH3-64 checksum of each page as copied, taken while it is in cache.
 * Returns the bytes written. */
int64_t pd_gather(const uint8_t *ram, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *kinds, uint32_t *lens, uint64_t *sums,
                  uint8_t *out, uint64_t out_cap);

/* Encode the listed pages of ram for sending: zero pages as PD_KIND_ZERO,
 * pages whose delta against shadow is smaller than a page as PD_KIND_DELTA
 * (when use_delta), the rest raw.  kinds and lens receive one entry per
 * page.  The shadow of each listed page is then set to its new content.
 * Returns the bytes written to out. */
int64_t pd_encode_pages(const uint8_t *ram, uint8_t *shadow, uint64_t npages,
                        const uint32_t *idx, uint64_t n, int use_delta,
                        uint8_t *kinds, uint32_t *lens,
                        uint8_t *out, uint64_t out_cap);

/* Apply encoded pages (from pd_gather or pd_encode_pages) to image.  The
 * whole batch is validated first (indices, kinds, lengths, every delta
 * stream); on any error nothing is written.  lens may be NULL when no page
 * is PD_KIND_DELTA (lengths then follow from the kinds). */
int pd_apply_pages(uint8_t *image, uint64_t npages, const uint32_t *idx,
                   uint64_t n, const uint8_t *kinds, const uint32_t *lens,
                   const uint8_t *data, uint64_t data_len);

/* Delta of one page: XOR of old and new, written as alternating runs
 * (ULEB128 zero-run length, ULEB128 non-zero-run length, the XORed bytes).
 * Returns the encoded length, or PD_ENOSPC if it would exceed out_cap. */
int64_t pd_delta_encode(const uint8_t *old_page, const uint8_t *new_page,
                        uint8_t *out, uint64_t out_cap);

/* Check that enc is a well-formed delta of exactly one page. */
int pd_delta_validate(const uint8_t *enc, uint64_t len);

/* Apply a delta to page in place.  Validates first: on error the page is
 * left untouched. */
int pd_delta_decode(uint8_t *page, const uint8_t *enc, uint64_t len);

/* Stage a batch for an atomic commit: validate it like pd_apply_pages, then
 * build the new content of every delta page in scratch (room for n pages)
 * and check every page's new content against checksums (XXH3-64, one per
 * page).  Writes nothing to image.  Returns 0, or PD_ECORRUPT with
 * *bad_page set to the position in the batch of the first page that failed. */
int pd_stage_pages(const uint8_t *image, uint64_t npages, const uint32_t *idx,
                   uint64_t n, const uint8_t *kinds, const uint32_t *lens,
                   const uint8_t *data, uint64_t data_len,
                   const uint64_t *checksums, uint8_t *scratch,
                   uint64_t *bad_page);

/* Commit a batch that pd_stage_pages accepted (with the same arguments). */
void pd_commit_staged(uint8_t *image, const uint32_t *idx, uint64_t n,
                      const uint8_t *kinds, const uint32_t *lens,
                      const uint8_t *data, const uint8_t *scratch);

/* XXH3-64 of any byte string (device state, whole frames). */
uint64_t pd_checksum_bytes(const uint8_t *buf, uint64_t len);

/* The synthetic guest's CPU: one tick dirties `pages` pages chosen by shape
 * (0 uniform, 1 hot set of hot_pages pages taking 90% of writes,
 * 2 sequential), then reads a page chosen by its RNG and returns an output
 * payload that depends on what it read.  regs = {seq, rng, cursor}; seq
 * counts outputs.  Deterministic: the same RAM and regs give the same ticks. */
uint64_t pd_synth_tick(uint8_t *ram, uint64_t npages, uint64_t *regs,
                       uint32_t pages, int shape, uint64_t hot_pages);

/* Boot-time content: pct% of the pages filled from seed, the rest zero. */
void pd_synth_fill(uint8_t *ram, uint64_t npages, uint64_t seed, int pct);

/* 64-bit XXH3 checksum of each listed page, for end-to-end verification. */
int pd_checksum_pages(const uint8_t *base, uint64_t npages,
                      const uint32_t *idx, uint64_t n, uint64_t *out);

/* Ceilings for the benchmarks: a plain page-by-page memcmp of two buffers
 * (returns the count of differing pages) and a plain read pass over a
 * buffer (returns a fold of its words so that the read is not elided). */
int64_t pd_memcmp_pages(const uint8_t *a, const uint8_t *b, uint64_t npages,
                        int nthreads);
int64_t pd_read_pass(const uint8_t *buf, uint64_t npages, int nthreads,
                     uint64_t *fold);

/* Set the hash table entries (as the hashed scan computes them) of the
 * listed pages of base. */
int pd_hash_pages(const uint8_t *base, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *table);

/* The same for a batch made by pd_gather (kinds RAW or ZERO; data holds the
 * raw pages one after another): the table then describes what was sent. */
int pd_hash_gathered(uint8_t *table, uint64_t npages, const uint32_t *idx,
                     uint64_t n, const uint8_t *kinds, const uint8_t *data,
                     uint64_t data_len);

/* Compare pages [start, end) of ram with the table without changing it:
 * writes the indices that differ to differ (room for end - start) and
 * returns how many. */
int64_t pd_hash_verify(const uint8_t *ram, const uint8_t *table,
                       uint64_t npages, uint64_t start, uint64_t end,
                       uint32_t *differ);

/* Which SIMD flavour the hashed scan and the read pass use: "avx2" or "sse2". */
const char *pd_simd_flavour(void);
/* cdef-end */

#endif
