/* The AVX2 build of simd_impl.h (used only where the CPU has AVX2). */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2")
#define XXH_VECTOR 2 /* XXH_AVX2: the pragma does not define __AVX2__ for the header's choice */
#define XXH_NAMESPACE pd_avx2_
#define PD_SIMD(name) pd_##name##_avx2
#include "simd_impl.h"
#endif
