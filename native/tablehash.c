/*
 * The hashed scan's table kept in step with what the standby holds when the
 * dirty pages come from somewhere else (the dirty-page log): hash the pages as
 * they were sent, and compare a slice of RAM with the table without changing it
 * (the log's safety net).  Same hash as the hashed scan (XXH3-128 of the page).
 */
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <string.h>

#include "pagediff.h"

#define PS ((uint64_t)PD_PAGE_SIZE)

static void put(uint8_t *table, uint32_t i, XXH128_hash_t h)
{
    uint64_t v[2] = {h.low64, h.high64};
    memcpy(table + (uint64_t)i * PD_HASH_SIZE, v, sizeof v);
}

int pd_hash_pages(const uint8_t *base, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *table)
{
    if (!base || !table || (n && !idx))
        return PD_EINVAL;
    for (uint64_t k = 0; k < n; k++)
        if (idx[k] >= npages)
            return PD_EBOUNDS;
    for (uint64_t k = 0; k < n; k++)
        put(table, idx[k], XXH3_128bits(base + (uint64_t)idx[k] * PS, PS));
    return 0;
}

int pd_hash_gathered(uint8_t *table, uint64_t npages, const uint32_t *idx,
                     uint64_t n, const uint8_t *kinds, const uint8_t *data,
                     uint64_t data_len)
{
    static const uint8_t zero[PD_PAGE_SIZE];
    if (!table || (n && (!idx || !kinds)))
        return PD_EINVAL;
    uint64_t raw = 0;
    for (uint64_t k = 0; k < n; k++) {
        if (idx[k] >= npages)
            return PD_EBOUNDS;
        if (kinds[k] == PD_KIND_RAW)
            raw++;
        else if (kinds[k] != PD_KIND_ZERO)
            return PD_EINVAL;
    }
    if (raw * PS > data_len)
        return PD_ECORRUPT;
    XXH128_hash_t hz = XXH3_128bits(zero, PS);
    const uint8_t *p = data;
    for (uint64_t k = 0; k < n; k++) {
        if (kinds[k] == PD_KIND_ZERO) {
            put(table, idx[k], hz);
        } else {
            put(table, idx[k], XXH3_128bits(p, PS));
            p += PS;
        }
    }
    return 0;
}

int64_t pd_hash_verify(const uint8_t *ram, const uint8_t *table,
                       uint64_t npages, uint64_t start, uint64_t end,
                       uint32_t *differ)
{
    if (!ram || !table || !differ || start > end || end > npages)
        return PD_EINVAL;
    int64_t n = 0;
    for (uint64_t i = start; i < end; i++) {
        XXH128_hash_t h = XXH3_128bits(ram + i * PS, PS);
        uint64_t old[2];
        memcpy(old, table + i * PD_HASH_SIZE, sizeof old);
        if (old[0] != h.low64 || old[1] != h.high64)
            differ[n++] = (uint32_t)i;
    }
    return n;
}
