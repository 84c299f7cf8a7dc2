/* Paged prefill attention on a CPU, fp32: every prefill chunk of a step in one call, K/V read in
 * place from the cache blocks named by each chunk's block table (no gather, no mask tensor).
 *
 * Layout (as pdserve/model/attention.py): cache [2][num_blocks][block_size][kv_heads][dim];
 * q and out [rows][heads][dim], heads contiguous (row strides given: q may be a view of the fused
 * qkv buffer); query heads h * group .. h * group + group - 1 share KV head h (GQA). A chunk
 * holds rows q_start .. q_start + q_len - 1 at positions ctx_len - q_len .. ctx_len - 1; the
 * query at position p sees keys 0 .. p (causal), and the chunk's own K/V are already in the cache.
 *
 * One task per (chunk, KV head, tile of query positions); a task's result depends on nothing
 * else, so a query's output is the same at any thread count and whatever else the step holds.
 *
 * Vector path (AVX-512, head_dim 64 or 128, group 1/2/4/8): a tile is 16 query rows (16 / group
 * positions x the group's heads, which share one KV head), one per vector lane. Flash-style
 * (online softmax) over 16-key chunks: the tile's 16 x 16 scores as 16 vectors S^T[key][row]
 * (each an FMA chain over dim with the key's element broadcast from memory and the tile's
 * transposed queries Q^T[d][row]), so the running maximum, the exponentials and the row sums are
 * plain vector operations across keys, with no horizontal reduction; then O^T[d][row] +=
 * V[key][d] * P^T[key][row], eight dims at a time (eight FMA chains) with P^T in registers. Key
 * chunks past the tile's last position are skipped; only chunks crossing the tile's first
 * position are masked. Other shapes or CPUs: a portable scalar task (same tiles, same order).
 *
 * Compiled with -O3 -march=native -fopenmp (no -ffast-math: the exponential is our own
 * polynomial, and the vector code is written out, so nothing needs it); FTZ/DAZ per call
 * (ftz.h). No infinities are used: the running maximum starts at -FLT_MAX.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include "ftz.h"

#define MAX_DIM 256   /* the scalar path's per-row accumulator */
#define TILE_ROWS 16  /* the scalar path's query positions per task */
#ifndef NV64
#define NV64 2        /* the vector path's query rows per task, in 16s, at head_dim 64 */
#endif
#ifndef NV128
#define NV128 2       /* ... and at 128 */
#endif
#define MAXNV 2       /* register arrays sized by this constant, not by NV: arrays of a
                       * parameter's size are VLAs, kept in memory (half the speed) */
#define KEYS 16       /* keys per chunk of the online softmax */

typedef struct {
    const float *q;
    float *out;
    const float *cache;
    int64_t q_row_stride, out_row_stride, token_stride, v_offset, block_floats;
    const int32_t *chunks; /* [n][3]: q_start, q_len, ctx_len */
    const int32_t *tables;
    int table_width, block_size, block_shift, kv_heads, dim, group; /* block_size = 1 << block_shift */
    float scale;
} Step;

/* The cache row of key position `pos` of a chunk (KV head 0; K; V is + v_offset). */
static inline const float *key_row(const Step *s, const int32_t *table, int pos) {
    return s->cache + (int64_t)table[pos >> s->block_shift] * s->block_floats
           + (int64_t)(pos & (s->block_size - 1)) * s->token_stride;
}

/* Portable task: query positions i0 .. i1 - 1 of the chunk (indices within it), KV head h, each
 * query row on its own, keys in chunks of KEYS with one rescale per chunk. */
static void task_scalar(const Step *s, const int32_t *ch, const int32_t *table, int h, int i0, int i1) {
    const int D = s->dim, G = s->group, q_len = ch[1], ctx = ch[2];
    float acc[MAX_DIM], qs[MAX_DIM], p[KEYS];
    for (int i = i0; i < i1; i++) {
        const int pos = ctx - q_len + i;
        for (int g = 0; g < G; g++) {
            const float *qr = s->q + (int64_t)(ch[0] + i) * s->q_row_stride + (int64_t)(h * G + g) * D;
            for (int d = 0; d < D; d++) {
                qs[d] = qr[d] * s->scale;
                acc[d] = 0.0f;
            }
            float m = -FLT_MAX, l = 0.0f;
            for (int k0 = 0; k0 <= pos; k0 += KEYS) {
                const int n = pos + 1 - k0 < KEYS ? pos + 1 - k0 : KEYS;
                float mx = m;
                for (int t = 0; t < n; t++) {
                    const float *kr = key_row(s, table, k0 + t) + h * D;
                    float dot = 0.0f;
                    for (int d = 0; d < D; d++) dot += qs[d] * kr[d];
                    p[t] = dot;
                    mx = dot > mx ? dot : mx;
                }
                const float corr = expf(m - mx);
                float sum = 0.0f;
                for (int t = 0; t < n; t++) {
                    p[t] = expf(p[t] - mx);
                    sum += p[t];
                }
                l = l * corr + sum;
                m = mx;
                for (int d = 0; d < D; d++) acc[d] *= corr;
                for (int t = 0; t < n; t++) {
                    const float *vr = key_row(s, table, k0 + t) + s->v_offset + h * D;
                    for (int d = 0; d < D; d++) acc[d] += p[t] * vr[d];
                }
            }
            float *o = s->out + (int64_t)(ch[0] + i) * s->out_row_stride + (int64_t)(h * G + g) * D;
            const float inv = 1.0f / l;
            for (int d = 0; d < D; d++) o[d] = acc[d] * inv;
        }
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* 2^x for x <= 0 (x clamped at -127: below it the result is 0 under FTZ): x = n + f with f in
 * [-0.5, 0.5], 2^f by its degree-7 Taylor polynomial (relative error ~4e-9, under float's ulp),
 * times 2^n by scalef. */
static inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5252734e-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* b[i][j] <- b[j][i]: a 16 x 16 block transposed in registers (unpacks, then two rounds of
 * 128-bit lane shuffles). */
static inline void transpose16(__m512 b[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(b[i], b[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(b[i], b[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        b[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        b[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        b[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        b[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(b[i], b[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(b[i + 8], b[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(b[i + 8], b[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        b[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        b[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

/* Vector task: R = 16 * NV query rows (R / G positions of the chunk from i0; those past its end
 * repeat its last row, computed and not stored), KV head h. G, D and NV are compile-time
 * constants. Each key element broadcast from memory feeds NV FMAs (one per 16 rows): with NV = 1
 * the loads, one per FMA, were as many as the two ports take. */
static inline __attribute__((always_inline)) void task_v(const Step *s, const int32_t *ch, const int32_t *table,
                                                         int h, int i0, const int G, const int D, const int NV) {
    /* Per pass, KEYS / NV keys x NV row vectors of scores (16 accumulators), and 8 / NV dims x
     * NV row vectors of output (8 FMA chains: two ports x four cycles of latency). */
    const int H = KEYS / NV, DJ = 8 / NV;
    const int R = 16 * NV, q_len = ch[1], ctx = ch[2], P = R / G;
    const int n_rows = q_len - i0 < P ? q_len - i0 : P; /* positions of this tile that exist */
    const int first = ctx - q_len + i0, last = first + n_rows - 1;
    float qt[128 * 32] __attribute__((aligned(64))); /* [D][R]; fixed sizes, not VLAs: see MAXNV */
    float ot[128 * 32] __attribute__((aligned(64)));
    float kc[KEYS * 128] __attribute__((aligned(64))); /* [KEYS][D] */
    float vc[KEYS * 128] __attribute__((aligned(64)));
    int32_t qpos[32] __attribute__((aligned(64)));
    /* Scores in log2 units: exp(x * scale) = 2^(x * scale * log2 e). */
    const float c = s->scale * 1.4426950408889634f;
    const float *qrow[32];
    for (int r = 0; r < R; r++) {
        const int i = r / G < n_rows ? r / G : n_rows - 1, g = r % G;
        qpos[r] = first + i;
        qrow[r] = s->q + (int64_t)(ch[0] + i0 + i) * s->q_row_stride + (int64_t)(h * G + g) * D;
    }
    /* Q^T by 16 x 16 blocks in registers (element by element it was ~5% of the time). */
    const __m512 vc_ = _mm512_set1_ps(c);
    for (int v = 0; v < NV; v++)
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 b[16];
            for (int j = 0; j < 16; j++) b[j] = _mm512_mul_ps(_mm512_loadu_ps(qrow[16 * v + j] + d0), vc_);
            transpose16(b);
            for (int j = 0; j < 16; j++) _mm512_store_ps(qt + (d0 + j) * R + 16 * v, b[j]);
        }
    for (int d = 0; d < D; d++)
        for (int v = 0; v < NV; v++) _mm512_store_ps(ot + d * R + 16 * v, _mm512_setzero_ps());
    __m512i vpos[MAXNV];
    __m512 m[MAXNV], l[MAXNV];
    for (int v = 0; v < NV; v++) {
        vpos[v] = _mm512_load_si512(qpos + 16 * v);
        m[v] = _mm512_set1_ps(-FLT_MAX);
        l[v] = _mm512_setzero_ps();
    }
    const int64_t hd = (int64_t)h * D;
    for (int k0 = 0; k0 <= last; k0 += KEYS) {
        /* The chunk's K and V rows of this head, staged in two contiguous 16-row buffers (L1):
         * the FMAs below then address them at constant offsets from one register (read through
         * 16 row pointers, the pointers spilled and were reloaded for every FMA: half the speed).
         * Rows of keys past the tile's last position repeat that position's row: their weight
         * is exactly 0 and their values finite, so they add nothing. */
        const int whole = k0 + KEYS - 1 <= last && s->block_size >= KEYS; /* 16 rows of one block */
        const float *base = key_row(s, table, k0) + hd;
        for (int t = 0; t < KEYS; t++) {
            const float *kr = whole ? base + t * s->token_stride : key_row(s, table, k0 + t <= last ? k0 + t : last) + hd;
            for (int d = 0; d < D; d += 16) {
                _mm512_store_ps(kc + t * D + d, _mm512_loadu_ps(kr + d));
                _mm512_store_ps(vc + t * D + d, _mm512_loadu_ps(kr + s->v_offset + d));
            }
        }
        __m512 sc[KEYS][MAXNV]; /* S^T: [key][rows]; the compiler keeps a pass's half in registers */
        for (int t0 = 0; t0 < KEYS; t0 += H) {
            __m512 a[KEYS][MAXNV];
            for (int t = 0; t < H; t++)
                for (int v = 0; v < NV; v++) a[t][v] = _mm512_setzero_ps();
            for (int d = 0; d < D; d++) {
                __m512 qd[MAXNV];
                for (int v = 0; v < NV; v++) qd[v] = _mm512_load_ps(qt + d * R + 16 * v);
                for (int t = 0; t < H; t++) {
                    const __m512 kv = _mm512_set1_ps(kc[(t0 + t) * D + d]);
                    for (int v = 0; v < NV; v++) a[t][v] = _mm512_fmadd_ps(kv, qd[v], a[t][v]);
                }
            }
            for (int t = 0; t < H; t++)
                for (int v = 0; v < NV; v++) sc[t0 + t][v] = a[t][v];
        }
        const int masked = k0 + KEYS - 1 > first; /* some key here is past some row's position */
        __m512 corr[MAXNV];
        for (int v = 0; v < NV; v++) {
            __mmask16 live[KEYS];
            __m512 mx = m[v];
            for (int t = 0; t < KEYS; t++) {
                live[t] = masked ? _mm512_cmp_epi32_mask(_mm512_set1_epi32(k0 + t), vpos[v], _MM_CMPINT_LE) : 0xFFFF;
                mx = _mm512_mask_max_ps(mx, live[t], mx, sc[t][v]);
            }
            corr[v] = exp2_neg(_mm512_sub_ps(m[v], mx));
            __m512 sum = _mm512_setzero_ps();
            for (int t = 0; t < KEYS; t++) {
                sc[t][v] = _mm512_maskz_mov_ps(live[t], exp2_neg(_mm512_sub_ps(sc[t][v], mx)));
                sum = _mm512_add_ps(sum, sc[t][v]);
            }
            l[v] = _mm512_fmadd_ps(l[v], corr[v], sum);
            m[v] = mx;
        }
        /* O^T[d][rows] += V[key][d] x P^T[key][rows]: a pass's H x NV weights in registers, four
         * dims x NV accumulators; the first pass applies the rescale. */
        for (int t0 = 0; t0 < KEYS; t0 += H) {
            for (int d0 = 0; d0 < D; d0 += DJ) {
                __m512 a[8][MAXNV];
                for (int j = 0; j < DJ; j++)
                    for (int v = 0; v < NV; v++) {
                        a[j][v] = _mm512_load_ps(ot + (d0 + j) * R + 16 * v);
                        if (t0 == 0) a[j][v] = _mm512_mul_ps(a[j][v], corr[v]);
                    }
                for (int t = 0; t < H; t++)
                    for (int j = 0; j < DJ; j++) {
                        const __m512 vv = _mm512_set1_ps(vc[(t0 + t) * D + d0 + j]);
                        for (int v = 0; v < NV; v++) a[j][v] = _mm512_fmadd_ps(vv, sc[t0 + t][v], a[j][v]);
                    }
                for (int j = 0; j < DJ; j++)
                    for (int v = 0; v < NV; v++) _mm512_store_ps(ot + (d0 + j) * R + 16 * v, a[j][v]);
            }
        }
    }
    for (int v = 0; v < NV; v++) {
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l[v]);
        for (int d0 = 0; d0 < D; d0 += 16) {
            __m512 b[16];
            for (int j = 0; j < 16; j++) b[j] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + j) * R + 16 * v), inv);
            transpose16(b);
            for (int j = 0; j < 16; j++) {
                const int r = 16 * v + j;
                if (r < n_rows * G)
                    _mm512_storeu_ps(s->out + (int64_t)(ch[0] + i0 + r / G) * s->out_row_stride
                                     + (int64_t)(h * G + r % G) * D + d0, b[j]);
            }
        }
    }
}
#endif

/* Whether (dim, group) takes the vector path on this build (1) or the scalar one (0). */
int prefill_attention_vectorised(int dim, int group) {
#if defined(__AVX512F__)
    return (dim == 64 || dim == 128) && (group == 1 || group == 2 || group == 4 || group == 8);
#else
    (void)dim;
    (void)group;
    return 0;
#endif
}

static int positions_per_task(int dim, int group, int vec) {
    return vec ? 16 * (dim == 64 ? NV64 : NV128) / group : TILE_ROWS;
}

static void run_task(const Step *s, const int32_t *ch, const int32_t *table, int h, int i0, int vec) {
    const int P = positions_per_task(s->dim, s->group, vec);
#if defined(__AVX512F__)
    if (vec) {
#define TASK(G, D) task_v(s, ch, table, h, i0, G, D, D == 64 ? NV64 : NV128)
#define BY_GROUP(D) do { if (s->group == 1) TASK(1, D); else if (s->group == 2) TASK(2, D); \
    else if (s->group == 4) TASK(4, D); else TASK(8, D); } while (0)
        if (s->dim == 64) BY_GROUP(64);
        else BY_GROUP(128);
#undef BY_GROUP
#undef TASK
        return;
    }
#endif
    task_scalar(s, ch, table, h, i0, i0 + P < ch[1] ? i0 + P : ch[1]);
}

/* Limits (checked by the caller, prefill_attention.py): block_size a power of 2; dim <= MAX_DIM; every chunk's q_len >= 1
 * and q_len <= ctx_len <= table_width * block_size. Returns 0, or -1 if out of memory. */
int prefill_attention_f32(const float *q, int64_t q_row_stride, float *out, int64_t out_row_stride,
                          const float *cache, int64_t num_blocks, int block_size, int kv_heads, int dim,
                          int group, const int32_t *chunks, const int32_t *tables, int table_width,
                          int n_chunks, float scale, int threads) {
    Step s = {q, out, cache, q_row_stride, out_row_stride, (int64_t)kv_heads * dim, 0, 0, chunks, tables,
              table_width, block_size, __builtin_ctz((unsigned)block_size), kv_heads, dim, group, scale};
    s.v_offset = num_blocks * block_size * s.token_stride; /* cache[1] - cache[0] */
    s.block_floats = block_size * s.token_stride;
    const int vec = prefill_attention_vectorised(dim, group);
    const int P = positions_per_task(dim, group, vec);
    /* Task k of chunk c: first[c] <= k < first[c + 1]; within a chunk, KV head major, the tiles
     * from the last (the costliest: most keys) down, so the dynamic schedule ends on cheap ones. */
    int64_t *first = malloc(sizeof(int64_t) * (n_chunks + 1));
    if (first == NULL) return -1;
    first[0] = 0;
    for (int c = 0; c < n_chunks; c++) first[c + 1] = first[c] + (int64_t)kv_heads * ((chunks[3 * c + 1] + P - 1) / P);
    const int64_t n_tasks = first[n_chunks];
#pragma omp parallel num_threads(threads)
    {
    const unsigned int csr = ftz_enter(); /* each thread has its own floating-point state */
    int c = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; k++) {
        while (k >= first[c + 1]) c++;
        while (k < first[c]) c--;
        const int32_t *ch = chunks + 3 * c;
        const int tiles = (ch[1] + P - 1) / P;
        const int64_t j = k - first[c];
        const int h = (int)(j / tiles), tile = tiles - 1 - (int)(j % tiles);
        run_task(&s, ch, tables + (int64_t)c * table_width, h, tile * P, vec);
    }
    ftz_leave(csr); /* the thread goes back to torch's pool: leave its state as found */
    }
    free(first);
    return 0;
}
