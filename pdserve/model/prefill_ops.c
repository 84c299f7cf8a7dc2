/* The per-op path's element-wise glue as native calls, for CPU float32 steps that the fused decode
 * layer does not take (prefill chunks, mixed steps, more than 32 tokens). Between the MKL
 * projections a layer makes four calls instead of ~20 torch ops (each a pass over [T, ...] and
 * often a fresh tensor):
 *
 *   add_rmsnorm_f32   x += delta (the previous residual branch); h = RMSNorm(x)
 *   qkv_rope_kv_f32   on qkv = h W_qkv^T (+ b): [q/k per-head RMSNorm], RoPE on q and k in place,
 *                     K and V rows into the paged cache at their slots
 *   add_rmsnorm_f32   x += o_proj's output; h = post-attention RMSNorm(x)
 *   silu_mul_f32      act = silu(gate) * up
 *
 * RMSNorm, RoPE and silu are layer_ops.h's (decode_layer.c's own). Compiled with -ffp-contract=off
 * and without -ffast-math, so RoPE and the residual adds are bitwise the torch path's operations
 * (one rounding each, in its order) and RMSNorm and silu differ from torch by rounding only. Rows
 * are split across OpenMP threads; each element is computed by one fixed sequence of operations,
 * so the results do not depend on the number of threads.
 *
 * Layouts: x, delta, h [T][n]; qkv [T][(heads + 2 kv_heads) dim] (q heads, k heads, v heads);
 * cos/sin [T][dim]; cache [2][num_blocks][block_size][kv_heads][dim], slots [T] int64
 * (block * block_size + offset); gu [T][2 inter] (gate, up), act [T][inter].
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* libmvec's vector expf for silu's loop: glibc declares its SIMD variants only under -ffast-math,
 * which this file must not use. Without it each element is a scalar expf call, slower than
 * torch's vectorised silu. libmvec's expf is within a few ulp of expf (silu rounds differently
 * from torch either way). */
__attribute__((simd("notinbranch"))) float expf(float);

#include "layer_ops.h"

/* For every row: x += delta (unless delta is NULL), then y = RMSNorm(x) with weight w; y may be x. */
void add_rmsnorm_f32(float *x, const float *delta, const float *w, float *y, int64_t T, int64_t n, float eps,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < T; r++) {
        float *xr = x + r * n;
        if (delta != NULL) {
            const float *dr = delta + r * n;
            for (int64_t i = 0; i < n; i++) xr[i] = xr[i] + dr[i];
        }
        rmsnorm_lanes(xr, w, y + r * n, n, eps);
    }
}

/* RoPE on every q and k head of qkv in place (after the per-head RMSNorm q_norm / k_norm when
 * they are not NULL), then each row's K and V heads copied into the cache at slots[r]. */
void qkv_rope_kv_f32(float *qkv, int64_t T, int64_t heads, int64_t kv_heads, int64_t dim, const float *cos,
                     const float *sin, const float *q_norm, const float *k_norm, float eps, float *cache,
                     int64_t num_slots, const int64_t *slots, int threads) {
    const int64_t nkv = kv_heads * dim, row = heads * dim + 2 * nkv, v_offset = num_slots * nkv;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < T; r++) {
        float *q = qkv + r * row, *k = q + heads * dim;
        const float *cs = cos + r * dim, *sn = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            if (q_norm != NULL) rmsnorm_lanes(q + h * dim, q_norm, q + h * dim, dim, eps);
            rope(q + h * dim, cs, sn, q + h * dim, dim);
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            if (k_norm != NULL) rmsnorm_lanes(k + h * dim, k_norm, k + h * dim, dim, eps);
            rope(k + h * dim, cs, sn, k + h * dim, dim);
        }
        memcpy(cache + slots[r] * nkv, k, (size_t)nkv * sizeof(float));
        memcpy(cache + v_offset + slots[r] * nkv, k + nkv, (size_t)nkv * sizeof(float));
    }
}

/* act[r][j] = silu(gu[r][j]) * gu[r][inter + j] */
void silu_mul_f32(const float *gu, float *act, int64_t T, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < T; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *a = act + r * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; j++) a[j] = silu_mul(g[j], u[j]);
    }
}
