/*
 * The loops whose speed depends on the vector width.  This file is included
 * by simd_avx2.c and simd_sse2.c, each of which sets the target and
 * PD_SIMD(name) first, so the same source is compiled once per instruction
 * set and pagediff.c picks one at run time (the AVX2 build only on CPUs that
 * have AVX2).  XXH3 is xxHash's, inlined so that it is built for the same
 * target.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <string.h>

#include "pagediff.h"
#include "pagediff_internal.h"

uint64_t PD_SIMD(hash_range)(const uint8_t *ram, uint8_t *table,
                             uint64_t start, uint64_t end, uint32_t *dirty)
{
    uint64_t n = 0;
    for (uint64_t i = start; i < end; i++) {
        if (i + PD_PREFETCH_PAGES < end)
            pd_prefetch_page(ram + (i + PD_PREFETCH_PAGES) * PD_PAGE_SIZE);
        XXH128_hash_t h = XXH3_128bits(ram + i * PD_PAGE_SIZE, PD_PAGE_SIZE);
        uint8_t *slot = table + i * PD_HASH_SIZE;
        uint64_t old[2];
        memcpy(old, slot, sizeof old);
        if (old[0] != h.low64 || old[1] != h.high64) {
            old[0] = h.low64;
            old[1] = h.high64;
            memcpy(slot, old, sizeof old);
            if (dirty)
                dirty[n] = (uint32_t)i;
            n++;
        }
    }
    return n;
}

uint64_t PD_SIMD(checksum)(const uint8_t *page)
{
    return XXH3_64bits(page, PD_PAGE_SIZE);
}

uint64_t PD_SIMD(checksum_bytes)(const uint8_t *buf, uint64_t len)
{
    return XXH3_64bits(buf, (size_t)len);
}

/* Four independent accumulators of the widest vector keep several loads in
 * flight; OR is as cheap as a read gets. */
typedef uint64_t pd_vec __attribute__((vector_size(32), aligned(1)));

uint64_t PD_SIMD(read_range)(const uint8_t *buf, uint64_t start, uint64_t end)
{
    pd_vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const uint8_t *p = buf + start * PD_PAGE_SIZE;
    const uint8_t *stop = buf + end * PD_PAGE_SIZE;
    for (; p < stop; p += 128) {
        pd_vec v0, v1, v2, v3;
        memcpy(&v0, p, 32);
        memcpy(&v1, p + 32, 32);
        memcpy(&v2, p + 64, 32);
        memcpy(&v3, p + 96, 32);
        a0 |= v0;
        a1 |= v1;
        a2 |= v2;
        a3 |= v3;
    }
    a0 |= a1 | a2 | a3;
    return a0[0] | a0[1] | a0[2] | a0[3];
}
