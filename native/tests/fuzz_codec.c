/*
 * Fuzz harness for the delta codec and pd_apply_pages, built with
 * AddressSanitizer and UBSan by tests/unit/test_native_asan.py.
 *
 * Every buffer is a heap block of exactly the size the API is given, so an
 * access one byte outside trips ASan.  Inputs: random bytes, and valid
 * deltas mutated (bit flips, truncation, extension, splices).  Checks: no
 * crash or out-of-bounds access; a rejected input leaves the target
 * untouched; encode-then-decode reproduces the new page.
 *
 * usage: fuzz_codec [iterations] [seed]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pagediff.h"

#define PS PD_PAGE_SIZE

static uint64_t rng_state;
static uint64_t rnd(void)
{ /* splitmix64: reproducible from the seed printed on failure */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill(uint8_t *p, size_t n) { for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rnd(); }

static void fail(const char *what, unsigned long it)
{
    fprintf(stderr, "fuzz_codec: %s at iteration %lu\n", what, it);
    exit(1);
}

/* A new page: the old one with a few runs changed (sometimes many). */
static void mutate_page(const uint8_t *old, uint8_t *new_page)
{
    memcpy(new_page, old, PS);
    int runs = (int)(rnd() % 12);
    for (int r = 0; r < runs; r++) {
        size_t off = rnd() % PS, len = 1 + rnd() % 256;
        if (len > PS - off)
            len = PS - off;
        fill(new_page + off, len);
    }
}

/* Copies enc into an exactly-sized heap block after damaging it. */
static uint8_t *damage(const uint8_t *enc, size_t len, size_t *out_len)
{
    size_t cap = len + 8;
    uint8_t *tmp = malloc(cap ? cap : 1);
    memcpy(tmp, enc, len);
    size_t n = len;
    switch (rnd() % 5) {
    case 0: if (n) tmp[rnd() % n] ^= (uint8_t)(1u << (rnd() % 8)); break;
    case 1: n = n ? rnd() % n : 0; break;
    case 2: { size_t k = 1 + rnd() % 8; fill(tmp + n, k); n += k; break; }
    case 3: if (n) tmp[rnd() % n] = (uint8_t)rnd(); break;
    default: n = rnd() % 64; fill(tmp, n < cap ? n : cap); if (n > cap) n = cap; break;
    }
    uint8_t *exact = malloc(n ? n : 1);
    memcpy(exact, tmp, n);
    free(tmp);
    *out_len = n;
    return exact;
}

int main(int argc, char **argv)
{
    unsigned long iters = argc > 1 ? strtoul(argv[1], NULL, 10) : 200000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    uint8_t *old = malloc(PS), *new_page = malloc(PS), *page = malloc(PS);
    uint8_t *copy = malloc(PS);
    unsigned long accepted = 0, rejected = 0;

    for (unsigned long it = 0; it < iters; it++) {
        fill(old, PS);
        mutate_page(old, new_page);

        /* encode into an exactly-sized output of a random capacity */
        size_t cap = rnd() % PS;
        uint8_t *enc = malloc(cap ? cap : 1);
        int64_t len = pd_delta_encode(old, new_page, cap ? enc : NULL, cap);
        if (len == PD_ENOSPC) {
            free(enc);
            continue;
        }
        if (len < 0 || (uint64_t)len > cap)
            fail("encode returned a bad length", it);
        memcpy(page, old, PS);
        if (pd_delta_decode(page, enc, (uint64_t)len) != 0 || memcmp(page, new_page, PS))
            fail("round trip", it);

        size_t bad_len;
        uint8_t *bad = damage(enc, (size_t)len, &bad_len);
        memcpy(page, old, PS);
        memcpy(copy, old, PS);
        if (pd_delta_decode(page, bad_len ? bad : NULL, bad_len) == 0) {
            accepted++;
        } else {
            rejected++;
            if (memcmp(page, copy, PS))
                fail("a rejected delta changed the page", it);
        }

        /* the same damaged bytes as one page of a batch: all or nothing */
        uint8_t *image = malloc(2 * PS);
        memcpy(image, old, PS);
        memcpy(image + PS, old, PS);
        uint32_t idx[1] = {(uint32_t)(rnd() % 3)}; /* 2 is out of range */
        uint8_t kinds[1] = {(uint8_t)(rnd() % 4 == 0 ? rnd() % 4 : PD_KIND_DELTA)};
        uint32_t lens[1] = {(uint32_t)bad_len};
        int rc = pd_apply_pages(image, 2, idx, 1, kinds, lens, bad_len ? bad : NULL, bad_len);
        if (rc != 0 && (memcmp(image, old, PS) || memcmp(image + PS, old, PS)))
            fail("a rejected batch changed the image", it);
        free(image);
        free(bad);
        free(enc);
    }
    printf("fuzz_codec: %lu iterations, %lu damaged deltas accepted, %lu rejected\n",
           iters, accepted, rejected);
    free(old); free(new_page); free(page); free(copy);
    return 0;
}
