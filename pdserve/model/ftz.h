/* Flush-to-zero and denormals-are-zero on this thread, for one call only (paged_decode.c and
 * decode_layer.c). Attention scores far below a block's maximum exponentiate to subnormals, and
 * x86 arithmetic on subnormals is tens of times slower. Linking with -ffast-math would set these
 * bits for the whole process, for good, as the library loads; the kernels link without it, and
 * each call sets them for itself and restores them (the thread goes back to torch's pool). */
#ifndef PDSERVE_FTZ_H
#define PDSERVE_FTZ_H
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

static inline unsigned int ftz_enter(void) {
#if defined(__SSE__)
    const unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040); /* FTZ (bit 15) | DAZ (bit 6) */
    return saved;
#else
    return 0;
#endif
}

static inline void ftz_leave(unsigned int saved) {
#if defined(__SSE__)
    _mm_setcsr(saved);
#else
    (void)saved;
#endif
}
#endif
