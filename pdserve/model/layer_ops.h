/* The element-wise pieces of a decoder layer, shared by decode_layer.c (the fused decode layer)
 * and prefill_ops.c (the per-op path's native glue). Both compile with -ffp-contract=off and
 * without -ffast-math: RoPE is then bitwise torch's rope.rotate (two products and a sum, each
 * rounded), RMSNorm and silu differ from torch's vectorised reductions and exp by rounding only. */
#ifndef PDSERVE_LAYER_OPS_H
#define PDSERVE_LAYER_OPS_H
#include <math.h>
#include <stdint.h>

#define ROPE_MAX_DIM 1024 /* rope's buffer (decode_layer.py's MAX_HEAD_DIM) */

/* y = w * (x * rsqrt(ss / n + eps)), Hugging Face's formula given x's sum of squares ss; y may be x. */
static inline void rms_apply(const float *x, const float *w, float *y, int64_t n, double ss, float eps) {
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* Hugging Face's w * (x * rsqrt(mean(x^2) + eps)); the mean accumulated in double, in order. */
static void rmsnorm(const float *x, const float *w, float *y, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    rms_apply(x, w, y, n, ss, eps);
}

/* rmsnorm with the sum of squares in 16 double lanes (lane j: elements j, j + 16, ...; the tail
 * in lane 0) added by a fixed tree: a vector loop instead of one dependent add per element (a
 * 512-wide row in ~0.15 us instead of ~1). The same order whatever the thread, so the same bits. */
static void rmsnorm_lanes(const float *x, const float *w, float *y, int64_t n, float eps) {
    double acc[16] = {0.0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += (double)x[i + j] * x[i + j];
    for (; i < n; i++) acc[0] += (double)x[i] * x[i];
    for (int s = 8; s > 0; s /= 2)
        for (int j = 0; j < s; j++) acc[j] += acc[j + s];
    rms_apply(x, w, y, n, acc[0], eps);
}

/* rope.rotate: out = x * cos + cat(-x[half:], x[:half]) * sin, two products and a sum; out may be x. */
static void rope(const float *x, const float *cos, const float *sin, float *out, int64_t dim) {
    const int64_t half = dim / 2;
    float tmp[ROPE_MAX_DIM];
    for (int64_t i = 0; i < half; i++) tmp[i] = x[i] * cos[i] + -x[i + half] * sin[i];
    for (int64_t i = half; i < dim; i++) tmp[i] = x[i] * cos[i] + x[i - half] * sin[i];
    for (int64_t i = 0; i < dim; i++) out[i] = tmp[i];
}

/* F.silu(g) * up */
static inline float silu_mul(float g, float up) { return (g / (1.0f + expf(-g))) * up; }

#endif
