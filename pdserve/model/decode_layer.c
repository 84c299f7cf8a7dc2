/* One whole decoder layer (Llama / Mistral / Qwen2 / Qwen3) for a CPU float32 decode step: T
 * sequences of one new token each, in ONE OpenMP parallel region, the phases separated by
 * barriers. The per-op path costs ~20 torch ops a layer, each a few microseconds of dispatch and
 * an OpenMP fork/join; at batch 1 that was ~4 of a 15.6 ms step.
 *
 *   x -> RMSNorm -> qkv (+ bias) -> [q/k per-head RMSNorm] -> RoPE -> K, V into the paged cache
 *     -> paged attention -> o_proj -> + x -> RMSNorm -> gate_up -> silu(gate) * up -> down -> + x
 *
 * The projections are small_linear.c's `run` (included, so they are bitwise what that kernel
 * gives), each thread taking its slice of W's tiles. The attention is paged_decode.c's own task
 * function, reached through a pointer (that file is compiled with -ffast-math, this one is not):
 * the same machine code, so the same bits as the per-op native path. RoPE and the residual adds
 * are the torch path's operations in its order (no contraction into fma: -ffp-contract=off), so
 * they are bitwise too; RMSNorm and silu differ from torch's vectorised reductions and exp by
 * rounding only (those three are layer_ops.h's, shared with prefill_ops.c). Every output element is computed by one fixed sequence of operations whatever T
 * or the number of threads, so a row's result is bitwise the same at any batch size.
 *
 * Layouts as the torch path: x [T][hidden]; cache [2][num_blocks][block_size][kv_heads][dim];
 * cos/sin [T][dim]; tables [T][table_width] int32; slots [T] int64 (block * block_size + offset).
 */
#include "ftz.h"
#include "layer_ops.h"
#include "small_linear.c"

#include <math.h>
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

typedef void (*attend_fn)(const float *qb, float *ob, const float *cache, const int32_t *table, int ctx,
                          int64_t v_offset, int64_t token_stride, int block_size, int kv_per_task, int group,
                          int dim, float scale);

typedef struct { /* the model's shape and the scratch for up to max_rows rows; set once */
    int64_t hidden, inter, heads, kv_heads, dim, num_blocks, block_size, max_rows;
    float eps, scale;
    float *scratch; /* max_rows * (2 hidden + (heads + 2 kv_heads) dim + heads dim + 3 inter) floats */
    attend_fn attend; /* paged_decode.c's paged_decode_task_f32 */
} Model;

typedef struct { /* one layer's weights, read in place; set once */
    const float *in_norm, *post_norm, *w_qkv, *b_qkv, *q_norm, *k_norm, *w_o, *w_gu, *w_down;
    float *cache;
} Layer;

typedef struct { /* one step; set once per step, read by every layer */
    int64_t T, table_width;
    float *x; /* [T][hidden], updated in place */
    const int64_t *slots;
    const float *cos, *sin;
    const int32_t *ctx_lens, *tables;
    int head_split, threads;
    double *phase_s; /* NULL, or PHASES wall-clock accumulators (seconds), for the bench's breakdown */
} Step;

/* Phases timed when Step.phase_s is set, each up to the barrier that ends it: norm + qkv + rope +
 * KV write (with the fork), attention, o_proj, residual + norm + gate_up + silu, down, residual
 * (with the join). Read by thread 0 after each barrier: the slowest thread's time. */
#define PHASES 6
#if defined(_OPENMP)
#define STAMP(k) do { if (s->phase_s != NULL && id == 0) { const double t_ = omp_get_wtime(); s->phase_s[k] += t_ - t_last; t_last = t_; } } while (0)
#else
#define STAMP(k) do { } while (0)
#endif

/* [lo, hi) of n items for thread id of nt, contiguous */
#define SLICE(n, id, nt, lo, hi) const int64_t lo = (n) * (id) / (nt), hi = (n) * ((id) + 1) / (nt)

/* Rows [lo, hi) of y = x W^T (+ b): small_linear's run on that slice of W, one part (each element
 * is computed by the same sequence whatever slice it falls in). */
static void rows(const float *x, int64_t ldx, const float *W, int64_t lo, int64_t hi, int64_t K, const float *b,
                 float *y, int64_t ldy, int64_t M) {
    if (hi > lo) run(x, ldx, W + lo * K, hi - lo, K, b == NULL ? NULL : b + lo, y + lo, ldy, M, 0, 1);
}

/* Five barriers a layer (eight op by op): a thread works on what it computed itself wherever it can. Each thread
 * forms the normed input privately (a few thousand flops, redundant); computes whole heads of
 * q/k/v and rotates and stores them; computes matching rows of gate and up and their product. Only
 * attention (all of q, k, v), o_proj (all heads), the residual (all of o) and down (all of the
 * product) wait for the others: on a loaded machine each barrier can wait for a descheduled thread. */
void decode_layer_f32(const Model *m, const Layer *w, const Step *s) {
    const int64_t T = s->T, H = m->hidden, I = m->inter, D = m->dim, NQ = m->heads * D, NKV = m->kv_heads * D;
    const int64_t NQKV = NQ + 2 * NKV, group = m->heads / m->kv_heads, units = m->heads + 2 * m->kv_heads;
    float *qkv = m->scratch, *att = qkv + T * NQKV, *tmp = att + T * NQ, *gu = tmp + T * H, *act = gu + T * 2 * I;
    float *priv = act + T * I; /* per thread: xn [T][H], xmid [T][H] */
    float *x = s->x;
    const int64_t token_stride = NKV, v_offset = m->num_blocks * m->block_size * token_stride;
    const int split = s->head_split, kv_per_task = (int)(m->kv_heads / split);
#if defined(_OPENMP)
    double t_last = s->phase_s != NULL ? omp_get_wtime() : 0.0; /* written by thread 0 only */
#endif

#pragma omp parallel num_threads(s->threads)
    {
#if defined(_OPENMP)
        const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t id = 0, nt = 1;
#endif
        float *xn = priv + id * 2 * T * H, *xmid = xn + T * H;
        for (int64_t r = 0; r < T; r++) rmsnorm(x + r * H, w->in_norm, xn + r * H, H, m->eps);
        {
            /* whole heads: q heads, k heads, v heads are consecutive rows of W_qkv */
            SLICE(units, id, nt, u0, u1);
            rows(xn, H, w->w_qkv, u0 * D, u1 * D, H, w->b_qkv, qkv, NQKV, T);
            for (int64_t r = 0; r < T; r++) {
                const float *cs = s->cos + r * D, *sn = s->sin + r * D;
                for (int64_t h = u0; h < u1; h++) {
                    float *src = qkv + r * NQKV + h * D;
                    if (h < m->heads) { /* q: rotated in place */
                        if (w->q_norm != NULL) rmsnorm(src, w->q_norm, src, D, m->eps);
                        rope(src, cs, sn, src, D);
                    } else if (h < m->heads + m->kv_heads) { /* k: rotated into the token's slot */
                        float *dst = w->cache + s->slots[r] * token_stride + (h - m->heads) * D;
                        if (w->k_norm != NULL) rmsnorm(src, w->k_norm, src, D, m->eps);
                        rope(src, cs, sn, dst, D);
                    } else { /* v */
                        float *dst = w->cache + v_offset + s->slots[r] * token_stride + (h - m->heads - m->kv_heads) * D;
                        for (int64_t i = 0; i < D; i++) dst[i] = src[i];
                    }
                }
            }
        }
#pragma omp barrier
        STAMP(0);
        {
            const unsigned int csr = ftz_enter();
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t task = 0; task < T * split; task++) {
                const int64_t b = task / split, sp = task % split;
                const int64_t off = sp * kv_per_task * group * D;
                m->attend(qkv + b * NQKV + off, att + b * NQ + off, w->cache + sp * kv_per_task * D,
                          s->tables + b * s->table_width, s->ctx_lens[b], v_offset, token_stride,
                          (int)m->block_size, kv_per_task, (int)group, (int)D, m->scale);
            }
            ftz_leave(csr);
        }
#pragma omp barrier
        STAMP(1);
        run(att, NQ, w->w_o, H, NQ, NULL, tmp, H, T, id, nt);
#pragma omp barrier
        STAMP(2);
        for (int64_t r = 0; r < T; r++) {
            const float *xr = x + r * H, *tr = tmp + r * H;
            float *mr = xmid + r * H;
            for (int64_t i = 0; i < H; i++) mr[i] = xr[i] + tr[i];
            rmsnorm(mr, w->post_norm, xn + r * H, H, m->eps);
        }
        {
            SLICE(I, id, nt, j0, j1); /* the same rows of gate and of up: their product needs no wait */
            rows(xn, H, w->w_gu, j0, j1, H, NULL, gu, 2 * I, T);
            rows(xn, H, w->w_gu + I * H, j0, j1, H, NULL, gu + I, 2 * I, T);
            for (int64_t r = 0; r < T; r++)
                for (int64_t j = j0; j < j1; j++)
                    act[r * I + j] = silu_mul(gu[r * 2 * I + j], gu[r * 2 * I + I + j]);
        }
#pragma omp barrier
        STAMP(3);
        run(act, I, w->w_down, H, I, NULL, tmp, H, T, id, nt);
#pragma omp barrier
        STAMP(4);
        {
            SLICE(T * H, id, nt, lo, hi);
            for (int64_t e = lo; e < hi; e++) x[e] = xmid[e] + tmp[e];
        }
    }
#if defined(_OPENMP)
    if (s->phase_s != NULL) s->phase_s[PHASES - 1] += omp_get_wtime() - t_last;
#endif
}

/* floats of scratch per row of a step at `threads` threads (Model.scratch holds max_rows of them) */
int64_t decode_layer_scratch_per_row(int64_t hidden, int64_t inter, int64_t heads, int64_t kv_heads, int64_t dim,
                                     int64_t threads) {
    return (heads + 2 * kv_heads) * dim + heads * dim + hidden + 3 * inter + threads * 2 * hidden;
}
