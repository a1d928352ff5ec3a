/*
 * pagediff.c: dirty-page scans, page encoding and the delta codec.
 * See pagediff.h for the contract of each function.
 */
#include "pagediff.h"
#include "pagediff_internal.h"

#include <pthread.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pagediff's delta encoder assumes a little-endian machine"
#endif

#define PS ((uint64_t)PD_PAGE_SIZE)
/* Below this many pages a slice is not worth a thread (4 MiB). */
#define MIN_PAGES_PER_THREAD 1024u

/* ---- dispatch by CPU ------------------------------------------------- */

static int have_avx2(void)
{
#ifdef PD_HAVE_AVX2_BUILD
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

const char *pd_simd_flavour(void) { return have_avx2() ? "avx2" : "sse2"; }

typedef uint64_t (*hash_range_fn)(const uint8_t *, uint8_t *, uint64_t,
                                  uint64_t, uint32_t *);

static hash_range_fn hash_range(void)
{
#ifdef PD_HAVE_AVX2_BUILD
    if (have_avx2())
        return pd_hash_range_avx2;
#endif
    return pd_hash_range_base;
}

static uint64_t checksum_page(const uint8_t *page)
{
#ifdef PD_HAVE_AVX2_BUILD
    if (have_avx2())
        return pd_checksum_avx2(page);
#endif
    return pd_checksum_base(page);
}

/* ---- running a range over threads ------------------------------------ */

/* A worker handles pages [start, end) and writes the indices it reports to
 * out (which points at the slot for page `start`), returning their count. */
typedef uint64_t (*range_fn)(void *ctx, uint64_t start, uint64_t end,
                             uint32_t *out);

struct slice {
    range_fn fn;
    void *ctx;
    uint64_t start, end;
    uint32_t *out;
    uint64_t count;
};

static void *slice_main(void *arg)
{
    struct slice *s = arg;
    s->count = s->fn(s->ctx, s->start, s->end, s->out);
    return NULL;
}

/* Runs fn over [0, npages) in up to nthreads slices.  If out is given, each
 * slice writes at out + start and the results are compacted, ascending, at
 * the front of out.  Returns the total count. */
static int64_t run_sliced(range_fn fn, void *ctx, uint64_t npages,
                          int nthreads, uint32_t *out)
{
    if (nthreads < 1 || nthreads > PD_MAX_THREADS)
        return PD_EINVAL;
    uint64_t max_threads = npages / MIN_PAGES_PER_THREAD;
    uint64_t t = (uint64_t)nthreads;
    if (t > max_threads)
        t = max_threads ? max_threads : 1;

    struct slice slices[PD_MAX_THREADS];
    pthread_t tids[PD_MAX_THREADS];
    int started[PD_MAX_THREADS] = {0};
    for (uint64_t k = 0; k < t; k++) {
        slices[k].fn = fn;
        slices[k].ctx = ctx;
        slices[k].start = npages * k / t;
        slices[k].end = npages * (k + 1) / t;
        slices[k].out = out ? out + slices[k].start : NULL;
        slices[k].count = 0;
    }
    for (uint64_t k = 1; k < t; k++)
        started[k] = pthread_create(&tids[k], NULL, slice_main, &slices[k]) == 0;
    slice_main(&slices[0]);
    for (uint64_t k = 1; k < t; k++) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            slice_main(&slices[k]);
    }
    uint64_t total = 0;
    for (uint64_t k = 0; k < t; k++) {
        if (out && slices[k].start != total && slices[k].count)
            memmove(out + total, slices[k].out, slices[k].count * sizeof *out);
        total += slices[k].count;
    }
    return (int64_t)total;
}

/* ---- scans ------------------------------------------------------------ */

struct exact_ctx {
    const uint8_t *ram;
    uint8_t *shadow;
    int update;
};

static uint64_t exact_range(void *c, uint64_t start, uint64_t end,
                            uint32_t *out)
{
    const struct exact_ctx *x = c;
    uint64_t n = 0;
    for (uint64_t i = start; i < end; i++) {
        const uint8_t *a = x->ram + i * PS;
        uint8_t *s = x->shadow + i * PS;
        if (memcmp(a, s, PS) != 0) {
            if (x->update)
                memcpy(s, a, PS);
            out[n++] = (uint32_t)i;
        }
    }
    return n;
}

int64_t pd_scan_exact(const uint8_t *ram, uint8_t *shadow, uint64_t npages,
                      int update_shadow, uint32_t *dirty, int nthreads)
{
    if (!ram || !shadow || !dirty || npages > UINT32_MAX)
        return PD_EINVAL;
    struct exact_ctx x = {ram, shadow, update_shadow};
    return run_sliced(exact_range, &x, npages, nthreads, dirty);
}

struct hashed_ctx {
    const uint8_t *ram;
    uint8_t *table;
    hash_range_fn fn;
};

static uint64_t hashed_range(void *c, uint64_t start, uint64_t end,
                             uint32_t *out)
{
    const struct hashed_ctx *x = c;
    return x->fn(x->ram, x->table, start, end, out);
}

int64_t pd_scan_hashed(const uint8_t *ram, uint8_t *table, uint64_t npages,
                       uint32_t *dirty, int nthreads)
{
    if (!ram || !table || npages > UINT32_MAX)
        return PD_EINVAL;
    struct hashed_ctx x = {ram, table, hash_range()};
    return run_sliced(hashed_range, &x, npages, nthreads, dirty);
}

/* ---- zero pages, gather ---------------------------------------------- */

static int is_zero_page(const uint8_t *p)
{
    for (uint64_t off = 0; off < PS; off += 64) {
        uint64_t w[8];
        memcpy(w, p + off, sizeof w);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 0;
    }
    return 1;
}

int64_t pd_gather(const uint8_t *ram, uint64_t npages, const uint32_t *idx,
                  uint64_t n, uint8_t *kinds, uint32_t *lens, uint64_t *sums,
                  uint8_t *out, uint64_t out_cap)
{
    if (!ram || (n && (!idx || !kinds || !lens)))
        return PD_EINVAL;
    static const uint8_t zero[PD_PAGE_SIZE];
    const uint64_t zero_sum = sums ? checksum_page(zero) : 0;
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        if (idx[k] >= npages)
            return PD_EBOUNDS;
        const uint8_t *p = ram + (uint64_t)idx[k] * PS;
        if (is_zero_page(p)) {
            kinds[k] = PD_KIND_ZERO;
            lens[k] = 0;
            if (sums)
                sums[k] = zero_sum;
            continue;
        }
        if (!out || out_cap - o < PS)
            return PD_ENOSPC;
        if (out + o != p) /* (pd_gather of out itself: pages moved down over zeros) */
            memmove(out + o, p, PS);
        if (sums) /* of the copy: what travels, even if ram changes meanwhile */
            sums[k] = checksum_page(out + o);
        o += PS;
        kinds[k] = PD_KIND_RAW;
        lens[k] = (uint32_t)PS;
    }
    return (int64_t)o;
}

/* ---- delta codec ------------------------------------------------------ */

static inline uint64_t xor_word(const uint8_t *a, const uint8_t *b, uint64_t at)
{
    uint64_t x, y;
    memcpy(&x, a + at, 8);
    memcpy(&y, b + at, 8);
    return x ^ y;
}

/* First offset >= p where the pages differ, or PS. */
static uint64_t next_diff(const uint8_t *a, const uint8_t *b, uint64_t p)
{
    for (; p < PS && (p & 7); p++)
        if (a[p] != b[p])
            return p;
    for (; p < PS; p += 8) {
        uint64_t x = xor_word(a, b, p);
        if (x)
            return p + ((uint64_t)__builtin_ctzll(x) >> 3);
    }
    return PS;
}

static int put_uleb(uint8_t *out, uint64_t cap, uint64_t *o, uint64_t v)
{
    /* values never exceed PS (13 bits): at most two bytes */
    if (v < 0x80) {
        if (cap - *o < 1)
            return -1;
        out[(*o)++] = (uint8_t)v;
        return 0;
    }
    if (cap - *o < 2)
        return -1;
    out[(*o)++] = (uint8_t)(0x80 | (v & 0x7f));
    out[(*o)++] = (uint8_t)(v >> 7);
    return 0;
}

/* Reads a minimal ULEB128 of at most two bytes. */
static int get_uleb(const uint8_t *in, uint64_t len, uint64_t *pos, uint64_t *v)
{
    if (*pos >= len)
        return -1;
    uint8_t b0 = in[*pos];
    if (!(b0 & 0x80)) {
        *v = b0;
        *pos += 1;
        return 0;
    }
    if (len - *pos < 2)
        return -1;
    uint8_t b1 = in[*pos + 1];
    if ((b1 & 0x80) || b1 == 0) /* overlong or not minimal */
        return -1;
    *v = (uint64_t)(b0 & 0x7f) | ((uint64_t)b1 << 7);
    *pos += 2;
    return 0;
}

int64_t pd_delta_encode(const uint8_t *old_page, const uint8_t *new_page,
                        uint8_t *out, uint64_t out_cap)
{
    if (!old_page || !new_page || (!out && out_cap))
        return PD_EINVAL;
    uint64_t p = 0, o = 0;
    for (;;) {
        uint64_t q = next_diff(old_page, new_page, p);
        if (put_uleb(out, out_cap, &o, q - p))
            return PD_ENOSPC;
        if (q == PS)
            return (int64_t)o;
        /* The non-zero run goes on to the first aligned word with no change,
         * then gives back the unchanged bytes at its end. */
        uint64_t w = (q & ~(uint64_t)7) + 8;
        while (w < PS && xor_word(old_page, new_page, w) != 0)
            w += 8;
        uint64_t last = xor_word(old_page, new_page, w - 8);
        uint64_t r = w - ((uint64_t)__builtin_clzll(last) >> 3);
        if (put_uleb(out, out_cap, &o, r - q) || out_cap - o < r - q)
            return PD_ENOSPC;
        for (uint64_t j = q; j < r; j++)
            out[o++] = old_page[j] ^ new_page[j];
        if (r == PS) /* the page ends in a changed byte: no final zero run */
            return (int64_t)o;
        p = r;
    }
}

int pd_delta_validate(const uint8_t *enc, uint64_t len)
{
    if (!enc && len)
        return PD_EINVAL;
    uint64_t pos = 0, at = 0;
    while (at < PS) {
        uint64_t z, nz;
        if (get_uleb(enc, len, &pos, &z) || z > PS - at || (z == 0 && at > 0))
            return PD_ECORRUPT;
        at += z;
        if (at == PS)
            break;
        if (get_uleb(enc, len, &pos, &nz) || nz == 0 || nz > PS - at ||
            nz > len - pos)
            return PD_ECORRUPT;
        pos += nz;
        at += nz;
    }
    return pos == len ? 0 : PD_ECORRUPT;
}

/* Applies a delta already checked by pd_delta_validate. */
static void delta_apply(uint8_t *page, const uint8_t *enc, uint64_t len)
{
    uint64_t pos = 0, at = 0;
    while (at < PS) {
        uint64_t z, nz;
        get_uleb(enc, len, &pos, &z);
        at += z;
        if (at == PS)
            break;
        get_uleb(enc, len, &pos, &nz);
        for (uint64_t j = 0; j < nz; j++)
            page[at + j] ^= enc[pos + j];
        pos += nz;
        at += nz;
    }
}

int pd_delta_decode(uint8_t *page, const uint8_t *enc, uint64_t len)
{
    if (!page)
        return PD_EINVAL;
    int rc = pd_delta_validate(enc, len);
    if (rc)
        return rc;
    delta_apply(page, enc, len);
    return 0;
}

/* ---- page batches ----------------------------------------------------- */

int64_t pd_encode_pages(const uint8_t *ram, uint8_t *shadow, uint64_t npages,
                        const uint32_t *idx, uint64_t n, int use_delta,
                        uint8_t *kinds, uint32_t *lens,
                        uint8_t *out, uint64_t out_cap)
{
    if (!ram || !shadow || (n && (!idx || !kinds || !lens)))
        return PD_EINVAL;
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        if (idx[k] >= npages)
            return PD_EBOUNDS;
        const uint8_t *p = ram + (uint64_t)idx[k] * PS;
        uint8_t *s = shadow + (uint64_t)idx[k] * PS;
        if (is_zero_page(p)) {
            kinds[k] = PD_KIND_ZERO;
            lens[k] = 0;
            memset(s, 0, PS);
            continue;
        }
        uint64_t room = out ? out_cap - o : 0;
        if (use_delta) {
            /* a delta is worth sending only if smaller than the page */
            uint64_t cap = room < PS - 1 ? room : PS - 1;
            int64_t len = pd_delta_encode(s, p, out + o, cap);
            if (len >= 0) {
                kinds[k] = PD_KIND_DELTA;
                lens[k] = (uint32_t)len;
                memcpy(s, p, PS);
                o += (uint64_t)len;
                continue;
            }
        }
        if (room < PS)
            return PD_ENOSPC;
        memcpy(out + o, p, PS);
        memcpy(s, out + o, PS); /* the shadow holds exactly what was sent */
        kinds[k] = PD_KIND_RAW;
        lens[k] = (uint32_t)PS;
        o += PS;
    }
    return (int64_t)o;
}

/* Checks a batch's indices, kinds, lengths and delta streams. */
static int validate_batch(uint64_t npages, const uint32_t *idx, uint64_t n,
                          const uint8_t *kinds, const uint32_t *lens,
                          const uint8_t *data, uint64_t data_len)
{
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        if (idx[k] >= npages)
            return PD_EBOUNDS;
        uint64_t len;
        switch (kinds[k]) {
        case PD_KIND_RAW: len = PS; break;
        case PD_KIND_ZERO: len = 0; break;
        case PD_KIND_DELTA:
            if (!lens)
                return PD_EINVAL;
            len = lens[k];
            break;
        default: return PD_ECORRUPT;
        }
        if (lens && lens[k] != len)
            return PD_ECORRUPT;
        if (len > data_len - o)
            return PD_ECORRUPT;
        if (kinds[k] == PD_KIND_DELTA && pd_delta_validate(data + o, len))
            return PD_ECORRUPT;
        o += len;
    }
    return o == data_len ? 0 : PD_ECORRUPT;
}

int pd_apply_pages(uint8_t *image, uint64_t npages, const uint32_t *idx,
                   uint64_t n, const uint8_t *kinds, const uint32_t *lens,
                   const uint8_t *data, uint64_t data_len)
{
    if (!image || (n && (!idx || !kinds)) || (!data && data_len))
        return PD_EINVAL;
    int rc = validate_batch(npages, idx, n, kinds, lens, data, data_len);
    if (rc)
        return rc;
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *dst = image + (uint64_t)idx[k] * PS;
        switch (kinds[k]) {
        case PD_KIND_RAW:
            memcpy(dst, data + o, PS);
            o += PS;
            break;
        case PD_KIND_ZERO:
            memset(dst, 0, PS);
            break;
        default:
            delta_apply(dst, data + o, lens[k]);
            o += lens[k];
            break;
        }
    }
    return 0;
}

int pd_stage_pages(const uint8_t *image, uint64_t npages, const uint32_t *idx,
                   uint64_t n, const uint8_t *kinds, const uint32_t *lens,
                   const uint8_t *data, uint64_t data_len,
                   const uint64_t *checksums, uint8_t *scratch,
                   uint64_t *bad_page)
{
    if (!image || (n && (!idx || !kinds || !lens || !checksums || !scratch)) ||
        (!data && data_len) || !bad_page)
        return PD_EINVAL;
    *bad_page = 0;
    int rc = validate_batch(npages, idx, n, kinds, lens, data, data_len);
    if (rc)
        return rc;
    static const uint8_t zero[PD_PAGE_SIZE];
    const uint64_t zero_sum = checksum_page(zero);
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t sum;
        switch (kinds[k]) {
        case PD_KIND_RAW:
            sum = checksum_page(data + o);
            break;
        case PD_KIND_ZERO:
            sum = zero_sum;
            break;
        default: {
            uint8_t *page = scratch + k * PS;
            memcpy(page, image + (uint64_t)idx[k] * PS, PS);
            delta_apply(page, data + o, lens[k]);
            sum = checksum_page(page);
        }
        }
        o += lens[k];
        if (sum != checksums[k]) {
            *bad_page = k;
            return PD_ECORRUPT;
        }
    }
    return 0;
}

void pd_commit_staged(uint8_t *image, const uint32_t *idx, uint64_t n,
                      const uint8_t *kinds, const uint32_t *lens,
                      const uint8_t *data, const uint8_t *scratch)
{
    uint64_t o = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint8_t *dst = image + (uint64_t)idx[k] * PS;
        switch (kinds[k]) {
        case PD_KIND_RAW: memcpy(dst, data + o, PS); break;
        case PD_KIND_ZERO: memset(dst, 0, PS); break;
        default: memcpy(dst, scratch + k * PS, PS); break;
        }
        o += lens[k];
    }
}

uint64_t pd_checksum_bytes(const uint8_t *buf, uint64_t len)
{
#ifdef PD_HAVE_AVX2_BUILD
    if (have_avx2())
        return pd_checksum_bytes_avx2(buf, len);
#endif
    return pd_checksum_bytes_base(buf, len);
}

int pd_checksum_pages(const uint8_t *base, uint64_t npages,
                      const uint32_t *idx, uint64_t n, uint64_t *out)
{
    if (!base || (n && (!idx || !out)))
        return PD_EINVAL;
    for (uint64_t k = 0; k < n; k++)
        if (idx[k] >= npages)
            return PD_EBOUNDS;
    for (uint64_t k = 0; k < n; k++)
        out[k] = checksum_page(base + (uint64_t)idx[k] * PS);
    return 0;
}

/* ---- ceilings for the benchmarks ------------------------------------- */

struct pair_ctx {
    const uint8_t *a, *b;
};

static uint64_t memcmp_range(void *c, uint64_t start, uint64_t end,
                             uint32_t *out)
{
    (void)out;
    const struct pair_ctx *x = c;
    uint64_t n = 0;
    for (uint64_t i = start; i < end; i++)
        n += memcmp(x->a + i * PS, x->b + i * PS, PS) != 0;
    return n;
}

int64_t pd_memcmp_pages(const uint8_t *a, const uint8_t *b, uint64_t npages,
                        int nthreads)
{
    if (!a || !b)
        return PD_EINVAL;
    struct pair_ctx x = {a, b};
    return run_sliced(memcmp_range, &x, npages, nthreads, NULL);
}

struct read_ctx {
    const uint8_t *buf;
    uint64_t (*fn)(const uint8_t *, uint64_t, uint64_t);
    uint64_t fold;
    pthread_mutex_t lock;
};

static uint64_t read_range(void *c, uint64_t start, uint64_t end, uint32_t *out)
{
    (void)out;
    struct read_ctx *x = c;
    uint64_t fold = x->fn(x->buf, start, end);
    pthread_mutex_lock(&x->lock);
    x->fold |= fold;
    pthread_mutex_unlock(&x->lock);
    return end - start;
}

int64_t pd_read_pass(const uint8_t *buf, uint64_t npages, int nthreads,
                     uint64_t *fold)
{
    if (!buf || !fold)
        return PD_EINVAL;
    struct read_ctx x;
    memset(&x, 0, sizeof x);
    x.buf = buf;
    x.fn = pd_read_range_base;
#ifdef PD_HAVE_AVX2_BUILD
    if (have_avx2())
        x.fn = pd_read_range_avx2;
#endif
    pthread_mutex_init(&x.lock, NULL);
    int64_t rc = run_sliced(read_range, &x, npages, nthreads, NULL);
    pthread_mutex_destroy(&x.lock);
    *fold = x.fold;
    return rc;
}
