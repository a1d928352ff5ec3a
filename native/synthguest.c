/*
 * The synthetic guest's "CPU": a deterministic state machine over its RAM.
 * Its whole state is the RAM plus three registers, so a guest resumed from
 * any checkpoint (RAM image + registers) makes exactly the same ticks as the
 * original would have.  Each tick's output depends on RAM contents the guest
 * wrote in earlier ticks, so a replica with a wrong page shows in the outputs.
 */
#include <string.h>

#include "pagediff.h"

#define PS ((uint64_t)PD_PAGE_SIZE)

enum { REG_SEQ = 0, REG_RNG = 1, REG_CURSOR = 2 };

static uint64_t splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t pd_synth_tick(uint8_t *ram, uint64_t npages, uint64_t *regs,
                       uint32_t pages, int shape, uint64_t hot_pages)
{
    uint64_t seq = regs[REG_SEQ] + 1;
    uint64_t hot = hot_pages && hot_pages < npages ? hot_pages : npages;
    uint64_t last = 0;
    for (uint32_t k = 0; k < pages; k++) {
        uint64_t r = splitmix(&regs[REG_RNG]);
        uint64_t page;
        if (shape == 2)
            page = regs[REG_CURSOR]++ % npages;
        else if (shape == 1 && (r >> 40) % 10 < 9)
            page = r % hot;
        else
            page = r % npages;
        uint64_t word = (seq * 0x9e3779b97f4a7c15ull) ^ r;
        memcpy(ram + page * PS + ((r >> 20) % (PS / 8)) * 8, &word, 8);
        last = page;
    }
    uint64_t probe = splitmix(&regs[REG_RNG]) % npages;
    uint64_t a = pd_checksum_bytes(ram + probe * PS, PS);
    uint64_t b = pd_checksum_bytes(ram + last * PS, PS);
    regs[REG_SEQ] = seq;
    return seq ^ a ^ ((b << 17) | (b >> 47));
}

void pd_synth_fill(uint8_t *ram, uint64_t npages, uint64_t seed, int pct)
{
    uint64_t pick = seed ^ 0x5bd1e995u;
    for (uint64_t i = 0; i < npages; i++) {
        uint8_t *page = ram + i * PS;
        if ((int)(splitmix(&pick) % 100) >= pct) {
            memset(page, 0, PS);
            continue;
        }
        uint64_t s = seed * 0x100000001b3ull + i;
        for (uint64_t off = 0; off < PS; off += 8) {
            uint64_t w = splitmix(&s);
            memcpy(page + off, &w, 8);
        }
    }
}
