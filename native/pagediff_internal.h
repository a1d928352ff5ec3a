/* Declarations shared by pagediff.c and the per-target builds of simd_impl.h. */
#ifndef MIRROR_PAGEDIFF_INTERNAL_H
#define MIRROR_PAGEDIFF_INTERNAL_H
#include <stdint.h>

/* Hardware prefetchers stop at 4 KiB boundaries, so the hashed scan fetches
 * the page this far ahead by hand (measured here: hashed/read-ceiling from
 * about 0.80 to 0.93).  The exact scan does not: with two streams it was
 * slower with it (0.84-0.92 of the memcmp ceiling against 0.92-1.04). */
#ifndef PD_PREFETCH_PAGES
#define PD_PREFETCH_PAGES 2
#endif

static inline void pd_prefetch_page(const uint8_t *page)
{
    for (unsigned off = 0; off < 4096; off += 64)
        __builtin_prefetch(page + off);
}

uint64_t pd_hash_range_base(const uint8_t *ram, uint8_t *table, uint64_t start,
                            uint64_t end, uint32_t *dirty);
uint64_t pd_checksum_base(const uint8_t *page);
uint64_t pd_checksum_bytes_base(const uint8_t *buf, uint64_t len);
uint64_t pd_read_range_base(const uint8_t *buf, uint64_t start, uint64_t end);
#if defined(__x86_64__) || defined(__i386__)
#define PD_HAVE_AVX2_BUILD 1
uint64_t pd_hash_range_avx2(const uint8_t *ram, uint8_t *table, uint64_t start,
                            uint64_t end, uint32_t *dirty);
uint64_t pd_checksum_avx2(const uint8_t *page);
uint64_t pd_checksum_bytes_avx2(const uint8_t *buf, uint64_t len);
uint64_t pd_read_range_avx2(const uint8_t *buf, uint64_t start, uint64_t end);
#endif
#endif
