/* The baseline build of simd_impl.h (SSE2 on x86-64, scalar or NEON elsewhere). */
#define XXH_NAMESPACE pd_base_
#define PD_SIMD(name) pd_##name##_base
#include "simd_impl.h"
