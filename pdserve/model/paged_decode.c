/* Paged decode attention on a CPU, fp32: one query token per sequence, K/V read in place from
 * the cache blocks named by the sequence's block table (no gather copy; each block is read once).
 *
 * Layout (as pdserve/model/attention.py): cache [2][num_blocks][block_size][kv_heads][dim];
 * q and out [rows][heads][dim] with heads contiguous (row strides given); query heads
 * h * group .. h * group + group - 1 share KV head h (GQA).
 *
 * One task per (sequence, slice of KV heads). A task walks its sequence's blocks once and reads
 * each key/value row of its heads once, serving all `group` query heads from it, so KV traffic
 * is the sum of context lengths. It takes whole token rows (all KV heads, contiguous in memory)
 * unless there are fewer sequences than threads: a task reading only one head's 256 bytes of
 * every 1 KB row ran ~2x slower than a streaming read (the prefetcher fetches the other heads'
 * lines, evicted before their task comes).
 *
 * The softmax is streamed block by block ("online softmax", as FlashAttention): a running
 * maximum and sum per query head, the accumulator rescaled when the maximum grows, so nothing of
 * the context's length is materialised. Compiled with -O3 -march=native -fopenmp -ffast-math by
 * native_decode.py (linked without it: see there); no infinities are used (fast-math assumes
 * none): the running maximum starts at -FLT_MAX, whose rescale factor underflows to 0.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include "ftz.h"

/* A task's state lives on its thread's stack (~100 KB at these limits): no allocation per call. */
#define MAX_ROW 8192 /* query heads x dim of one task (64 x 128: a 70B model's) */
#define MAX_HEADS 64
#define MAX_BLOCK 128

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One task: query heads of KV heads h0 .. h0 + kv_per_task - 1 of one sequence. Inlined into a
 * copy per common head_dim (see below), so that every loop over `dim` has a constant trip count
 * and is fully unrolled; with that and the prefetch below the batch-16 bench went from ~19 to
 * ~13 ms per step (it had been compute-bound). */
static inline __attribute__((always_inline)) void attend(
    const float *qb, float *ob, const float *cache, const int32_t *table, int ctx, int64_t v_offset,
    int64_t token_stride, int block_size, int kv_per_task, int group, const int dim, float scale) {
    float qs[MAX_ROW], acc[MAX_ROW], m[MAX_HEADS], l[MAX_HEADS], p[MAX_HEADS][MAX_BLOCK];
    const int nq = kv_per_task * group;
    for (int i = 0; i < nq * dim; i++) {
        qs[i] = qb[i] * scale; /* scale once, not per key */
        acc[i] = 0.0f;
    }
    for (int i = 0; i < nq; i++) {
        m[i] = -FLT_MAX;
        l[i] = 0.0f;
    }
    const int64_t block_floats = block_size * token_stride;
    for (int j = 0; j * block_size < ctx; j++) {
        const int n = ctx - j * block_size < block_size ? ctx - j * block_size : block_size;
        const float *k = cache + table[j] * block_floats;
        const float *v = k + v_offset;
        /* The next block is elsewhere in memory (blocks are handed out one at a time): ask for
         * it now, so its first lines arrive while this one is computed. */
        if ((j + 1) * block_size < ctx) {
            const float *next = cache + table[j + 1] * block_floats;
            for (int64_t x = 0; x < block_floats; x += 16) {
                __builtin_prefetch(next + x);
                __builtin_prefetch(next + v_offset + x);
            }
        }
        /* Memory order: token, then KV head: the block is read front to back. */
        for (int t = 0; t < n; t++)
            for (int h = 0; h < kv_per_task; h++)
                for (int g = 0; g < group; g++)
                    p[h * group + g][t] = dot(qs + (h * group + g) * dim, k + t * token_stride + h * dim, dim);
        for (int i = 0; i < nq; i++) {
            float mx = m[i];
            for (int t = 0; t < n; t++) mx = p[i][t] > mx ? p[i][t] : mx;
            /* Rescale once per block, not per key: the block's scores are all known. */
            const float corr = expf(m[i] - mx);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < n; t++) {
                p[i][t] = expf(p[i][t] - mx);
                sum += p[i][t];
            }
            l[i] = l[i] * corr + sum;
            m[i] = mx;
            float *a = acc + i * dim;
#pragma omp simd
            for (int x = 0; x < dim; x++) a[x] *= corr;
        }
        for (int t = 0; t < n; t++)
            for (int h = 0; h < kv_per_task; h++) {
                const float *vt = v + t * token_stride + h * dim;
                for (int g = 0; g < group; g++) {
                    const float w = p[h * group + g][t];
                    float *a = acc + (h * group + g) * dim;
#pragma omp simd
                    for (int x = 0; x < dim; x++) a[x] += w * vt[x];
                }
            }
    }
    for (int i = 0; i < nq; i++) {
        const float inv = 1.0f / l[i];
        for (int x = 0; x < dim; x++) ob[i * dim + x] = acc[i * dim + x] * inv;
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* The scores of 16 keys from their 16 partial-sum vectors (lane i of out = sum of x[i]'s lanes):
 * a transposing add tree, 15 adds and 30 shuffles for all 16, against ~8 ops per horizontal sum.
 * The tree leaves token c + 4j in lane 4c + j; one permute puts them in order. */
static inline __m512 sum16(const __m512 *x) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* lanes 0-7: token 2i's halves summed; 8-15: token 2i+1's */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 128-bit chunk k: token 4i + k, 4 partials */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) /* chunk k: tokens 8i + k, 8i + 4 + k, 2 partials each */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, r);
}

/* attend, for head_dim D (a multiple of 16) and GQA group G known at compile time, in 16-key
 * chunks: per KV head, the chunk's scores for all G query heads as vectors (each key row loaded
 * once, G FMAs per load), one vector max/exp per query head, then V accumulated with the G
 * accumulators (G x D / 16 registers) held in registers across the chunk's keys. The old loop
 * reduced every dot product horizontally and loaded and stored the accumulator per key: it ran at
 * ~17 GB/s with the K/V in L2, so at about half the DRAM bound with them in memory. */
static inline __attribute__((always_inline)) void attend_v(
    const float *qb, float *ob, const float *cache, const int32_t *table, int ctx, int64_t v_offset,
    int64_t token_stride, int block_size, int kv_per_task, const int G, const int D, float scale) {
    enum { MAXV = 8 }; /* D / 16 at most (D <= 128) */
    __m512 acc[MAX_HEADS][MAXV];
    float m[MAX_HEADS], l[MAX_HEADS];
    const int nv = D / 16, nq = kv_per_task * G;
    for (int i = 0; i < nq; i++) {
        m[i] = -FLT_MAX;
        l[i] = 0.0f;
        for (int c = 0; c < nv; c++) acc[i][c] = _mm512_setzero_ps();
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    const int64_t block_floats = block_size * token_stride;
    const int chunk = block_size < 16 ? block_size : 16;
    for (int j = 0; j * block_size < ctx; j++) {
        const int nb = ctx - j * block_size < block_size ? ctx - j * block_size : block_size;
        const float *kblk = cache + table[j] * block_floats;
        /* The next block is elsewhere (as attend); its rows are asked for a key at a time, as
         * this block's same rows are read: asked for all at once (as attend does), the requests
         * fill the line-fill buffers and stall the computation behind them (30% of the time with
         * the cache in L2). The last block asks for its own rows again: harmless, no branch. */
        const float *next = cache + table[(j + 1) * block_size < ctx ? j + 1 : j] * block_floats;
        for (int t0 = 0; t0 < nb; t0 += chunk) {
            const int n = nb - t0 < chunk ? nb - t0 : chunk;
            const float *k = kblk + t0 * token_stride;
            const float *v = k + v_offset;
            for (int h = 0; h < kv_per_task; h++) {
                __m512 q[8][MAXV];
                for (int g = 0; g < G; g++)
                    for (int c = 0; c < nv; c++)
                        q[g][c] = _mm512_mul_ps(_mm512_loadu_ps(qb + (h * G + g) * D + 16 * c), vscale);
                __m512 part[8][16];
                for (int t = 0; t < 16; t++) {
                    if (t < n) {
                        const float *kt = k + t * token_stride + h * D;
                        const float *pf = next + (t0 + t) * token_stride + h * D;
                        for (int c = 0; c < nv; c++) {
                            __builtin_prefetch(pf + 16 * c);
                            __builtin_prefetch(pf + v_offset + 16 * c);
                        }
                        for (int g = 0; g < G; g++) part[g][t] = _mm512_setzero_ps();
                        for (int c = 0; c < nv; c++) {
                            const __m512 kv = _mm512_loadu_ps(kt + 16 * c);
                            for (int g = 0; g < G; g++) part[g][t] = _mm512_fmadd_ps(q[g][c], kv, part[g][t]);
                        }
                    } else {
                        for (int g = 0; g < G; g++) part[g][t] = _mm512_setzero_ps();
                    }
                }
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                float w[8][16];
                for (int g = 0; g < G; g++) {
                    const int i = h * G + g;
                    const __m512 s = _mm512_mask_blend_ps(live, _mm512_set1_ps(-FLT_MAX), sum16(part[g]));
                    const float cm = _mm512_reduce_max_ps(s);
                    const float mx = cm > m[i] ? cm : m[i];
                    const float corr = expf(m[i] - mx);
                    float e[16];
                    _mm512_storeu_ps(e, _mm512_sub_ps(s, _mm512_set1_ps(mx)));
#pragma omp simd
                    for (int t = 0; t < 16; t++) e[t] = expf(e[t]);
                    const __m512 p = _mm512_maskz_mov_ps(live, _mm512_loadu_ps(e));
                    _mm512_storeu_ps(w[g], p);
                    l[i] = l[i] * corr + _mm512_reduce_add_ps(p);
                    m[i] = mx;
                    const __m512 vc = _mm512_set1_ps(corr);
                    for (int c = 0; c < nv; c++) acc[i][c] = _mm512_mul_ps(acc[i][c], vc);
                }
                __m512 a[8][MAXV];
                for (int g = 0; g < G; g++)
                    for (int c = 0; c < nv; c++) a[g][c] = acc[h * G + g][c];
                for (int t = 0; t < n; t++) {
                    const float *vt = v + t * token_stride + h * D;
                    for (int c = 0; c < nv; c++) {
                        const __m512 vv = _mm512_loadu_ps(vt + 16 * c);
                        for (int g = 0; g < G; g++) a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[g][t]), vv, a[g][c]);
                    }
                }
                for (int g = 0; g < G; g++)
                    for (int c = 0; c < nv; c++) acc[h * G + g][c] = a[g][c];
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (int c = 0; c < nv; c++) _mm512_storeu_ps(ob + i * D + 16 * c, _mm512_mul_ps(acc[i][c], inv));
    }
}
#endif

/* One task (see attend), exported: the fused decoder layer (decode_layer.c, built without
 * -ffast-math) calls it through a pointer, so its attention is this very machine code and its
 * results are bitwise this kernel's. The caller sets FTZ/DAZ (ftz_enter) around its calls. */
void paged_decode_task_f32(const float *qb, float *ob, const float *cache, const int32_t *table, int ctx,
                           int64_t v_offset, int64_t token_stride, int block_size, int kv_per_task, int group,
                           int dim, float scale) {
#define ATTEND(D) attend(qb, ob, cache, table, ctx, v_offset, token_stride, block_size, kv_per_task, group, D, scale)
#if defined(__AVX512F__)
#define ATTEND_V(G, D) attend_v(qb, ob, cache, table, ctx, v_offset, token_stride, block_size, kv_per_task, G, D, scale)
#define BY_GROUP(D) do { if (group == 1) ATTEND_V(1, D); else if (group == 2) ATTEND_V(2, D); \
    else if (group == 4) ATTEND_V(4, D); else ATTEND_V(8, D); } while (0)
    if ((dim == 64 || dim == 128) && (group == 1 || group == 2 || group == 4 || group == 8)) {
        if (dim == 64) BY_GROUP(64);
        else BY_GROUP(128);
        return;
    }
#undef BY_GROUP
#undef ATTEND_V
#endif
    if (dim == 64) ATTEND(64);
    else if (dim == 128) ATTEND(128);
    else ATTEND(dim);
#undef ATTEND
}

/* Limits (checked by the caller, which falls back to torch beyond them): heads * dim <= MAX_ROW,
 * heads <= MAX_HEADS, block_size <= MAX_BLOCK; kv_heads % head_split == 0; ctx_lens[b] >= 1. */
void paged_decode_f32(const float *q, int64_t q_row_stride, float *out, int64_t out_row_stride,
                      const float *cache, int64_t num_blocks, int block_size, int kv_heads,
                      int dim, int group, const int64_t *rows, const int32_t *ctx_lens,
                      const int32_t *tables, int table_width, int batch, float scale,
                      int head_split, int threads) {
    const int64_t token_stride = (int64_t)kv_heads * dim;            /* next slot of a block */
    const int64_t v_offset = num_blocks * block_size * token_stride; /* cache[1] - cache[0] */
    const int kv_per_task = kv_heads / head_split;

    /* dynamic: contexts differ in length, so tasks differ in cost. */
#pragma omp parallel num_threads(threads)
    {
    const unsigned int csr = ftz_enter(); /* each thread has its own floating-point state */
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int b = 0; b < batch; b++) {
        for (int s = 0; s < head_split; s++) {
            const int64_t off = (int64_t)s * kv_per_task * group * dim; /* first query head's */
            const float *qb = q + rows[b] * q_row_stride + off;
            float *ob = out + rows[b] * out_row_stride + off;
            const float *c = cache + (int64_t)s * kv_per_task * dim;
            const int32_t *table = tables + (int64_t)b * table_width;
            paged_decode_task_f32(qb, ob, c, table, ctx_lens[b], v_offset, token_stride, block_size, kv_per_task,
                                  group, dim, scale);
        }
    }
    ftz_leave(csr); /* the thread goes back to torch's pool: leave its state as found */
    }
}
