/* Declarations shared by pagediff.c and the per-target builds of simd_impl.h. */
#ifndef MIRROR_PAGEDIFF_INTERNAL_H
#define MIRROR_PAGEDIFF_INTERNAL_H
#include <stdint.h>

uint64_t pd_hash_range_base(const uint8_t *ram, uint8_t *table, uint64_t start,
                            uint64_t end, uint32_t *dirty);
uint64_t pd_checksum_base(const uint8_t *page);
uint64_t pd_read_range_base(const uint8_t *buf, uint64_t start, uint64_t end);
#if defined(__x86_64__) || defined(__i386__)
#define PD_HAVE_AVX2_BUILD 1
uint64_t pd_hash_range_avx2(const uint8_t *ram, uint8_t *table, uint64_t start,
                            uint64_t end, uint32_t *dirty);
uint64_t pd_checksum_avx2(const uint8_t *page);
uint64_t pd_read_range_avx2(const uint8_t *buf, uint64_t start, uint64_t end);
#endif
#endif
