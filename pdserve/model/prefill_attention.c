/* Paged prefill attention on a CPU, fp32: every prefill chunk of a step in one call, K/V read in
 * place from the cache blocks named by each chunk's block table (no gather, no mask tensor).
 *
 * Layout (as pdserve/model/attention.py): cache [2][num_blocks][block_size][kv_heads][dim];
 * q and out [rows][heads][dim], heads contiguous (row strides given: q may be a view of the fused
 * qkv buffer); query heads h * group .. h * group + group - 1 share KV head h (GQA). A chunk
 * holds rows q_start .. q_start + q_len - 1 at positions ctx_len - q_len .. ctx_len - 1; the
 * query at position p sees keys 0 .. p (causal), and the chunk's own K/V are already in the cache.
 *
 * One task per (chunk, tile of query positions, group of KV heads: all of them unless that leaves
 * threads idle); a query's result depends on nothing else (not on the thread count, the head
 * grouping or what else is in the step): each head's arithmetic is the same in any task.
 *
 * Vector path (AVX-512, head_dim 64 or 128, group 1/2/4/8): a tile is 32 query rows (32 / group
 * positions x the group's heads, which share one KV head), two vectors of 16 lanes, a row per
 * lane. Flash-style (online softmax) over 16-key chunks: the tile's scores as S^T[key][rows]
 * (FMA chains over dim, each key element broadcast from memory against the tile's transposed
 * queries Q^T[d][rows]), so the running maximum, the exponentials and the row sums are plain
 * vector operations across keys, with no horizontal reduction; then O^T[d][rows] += V[key][d] x
 * P^T[key][rows] with P^T in registers. Key chunks past the tile's last position are skipped;
 * only those crossing its first position are masked. Other shapes or CPUs: a portable scalar
 * task (a head, 16 positions, each row on its own).
 *
 * Compiled with -O3 -march=native -fopenmp (no -ffast-math: the exponential is our own
 * polynomial and the vector code is written out, so nothing needs it); FTZ/DAZ per call (ftz.h).
 * No infinities are used: the running maximum starts at -FLT_MAX.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
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
#ifndef KEYS
#define KEYS 16       /* keys per chunk of the online softmax */
#endif

typedef struct {
    const float *q;
    float *out;
    const float *cache;
    int64_t q_row_stride, out_row_stride, token_stride, v_offset, block_floats;
    const int32_t *chunks; /* [n][3]: q_start, q_len, ctx_len */
    const int32_t *tables;
    int table_width, block_size, block_shift, kv_heads, dim, group; /* block_size = 1 << block_shift */
    int span; /* keys a vector task attends for every head of its group before the next keys */
    float scale;
} Step;

/* Floats of one head's state in a vector task's buffer (64-byte multiples: R is). */
static inline int64_t head_state(int D, int R) { return 2 * (int64_t)D * R + 2 * R; }

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
                                                         int h0, int nh, int i0, float *buf, const int G, const int D,
                                                         const int NV) {
    /* Per pass, KEYS / NV keys x NV row vectors of scores (16 accumulators), and 8 / NV dims x
     * NV row vectors of output (8 FMA chains: two ports x four cycles of latency). */
    const int H = 16 / NV, DJ = 8 / NV;
    const int R = 16 * NV, q_len = ch[1], ctx = ch[2], P = R / G;
    const int n_rows = q_len - i0 < P ? q_len - i0 : P; /* positions of this tile that exist */
    const int first = ctx - q_len + i0, last = first + n_rows - 1;
    const int64_t stride = head_state(D, R); /* one head's Q^T [D][R], O^T [D][R], m [R], l [R] in buf */
    /* fixed sizes, not VLAs: see MAXNV */
    float kc[KEYS * 128] __attribute__((aligned(64))); /* [KEYS][D] */
    float vc[KEYS * 128] __attribute__((aligned(64)));
    int32_t qpos[32] __attribute__((aligned(64)));
    /* Scores in log2 units: exp(x * scale) = 2^(x * scale * log2 e). */
    const float c = s->scale * 1.4426950408889634f;
    for (int r = 0; r < R; r++) qpos[r] = first + (r / G < n_rows ? r / G : n_rows - 1);
    const __m512 vc_ = _mm512_set1_ps(c);
    for (int hh = 0; hh < nh; hh++) {
        float *qt = buf + hh * stride, *ot = qt + D * R, *ms = ot + D * R, *ls = ms + R;
        const float *qrow[32];
        for (int r = 0; r < R; r++)
            qrow[r] = s->q + (int64_t)(ch[0] + i0 + (r / G < n_rows ? r / G : n_rows - 1)) * s->q_row_stride
                      + (int64_t)((h0 + hh) * G + r % G) * D;
        /* Q^T by 16 x 16 blocks in registers (element by element it was ~5% of the time). */
        for (int v = 0; v < NV; v++)
            for (int d0 = 0; d0 < D; d0 += 16) {
                __m512 b[16];
                for (int j = 0; j < 16; j++) b[j] = _mm512_mul_ps(_mm512_loadu_ps(qrow[16 * v + j] + d0), vc_);
                transpose16(b);
                for (int j = 0; j < 16; j++) _mm512_store_ps(qt + (d0 + j) * R + 16 * v, b[j]);
            }
        for (int d = 0; d < D; d++)
            for (int v = 0; v < NV; v++) _mm512_store_ps(ot + d * R + 16 * v, _mm512_setzero_ps());
        for (int v = 0; v < NV; v++) {
            _mm512_store_ps(ms + 16 * v, _mm512_set1_ps(-FLT_MAX));
            _mm512_store_ps(ls + 16 * v, _mm512_setzero_ps());
        }
    }
    __m512i vpos[MAXNV];
    for (int v = 0; v < NV; v++) vpos[v] = _mm512_load_si512(qpos + 16 * v);
    /* Keys by spans (of s->span keys, a multiple of KEYS), and within a span the heads one after
     * the other: a span's rows of every head (s->span x token_stride, ~512 KB) stay in L2 from
     * the first head's pass to the last's, where the hardware prefetcher, streaming whole rows,
     * brought them (one head's task streaming its keys alone ran at ~65% of the speed it had with
     * one KV head: the other heads' lines, fetched and evicted unused). A head's state stays in
     * L1 through its span. */
    for (int s0 = 0; s0 <= last; s0 += s->span) {
    const int s1 = s0 + s->span - 1 < last ? s0 + s->span - 1 : last;
    for (int hh = 0; hh < nh; hh++) {
    float *qt = buf + hh * stride, *ot = qt + D * R, *ms = ot + D * R, *ls = ms + R;
    __m512 m[MAXNV], l[MAXNV];
    for (int v = 0; v < NV; v++) {
        m[v] = _mm512_load_ps(ms + 16 * v);
        l[v] = _mm512_load_ps(ls + 16 * v);
    }
    const int64_t hd = (int64_t)(h0 + hh) * D;
    for (int k0 = s0; k0 <= s1; k0 += KEYS) {
        /* The chunk's K and V rows of this head, staged in two contiguous 16-row buffers (L1):
         * the FMAs below then address them at constant offsets from one register (read through
         * 16 row pointers, the pointers spilled and were reloaded for every FMA: half the speed).
         * Rows of keys past the tile's last position repeat that position's row: their weight
         * is exactly 0 and their values finite, so they add nothing. */
        for (int t = 0; t < KEYS; t++) {
            const float *kr = key_row(s, table, k0 + t <= last ? k0 + t : last) + hd;
            for (int d = 0; d < D; d += 16) {
                _mm512_store_ps(kc + t * D + d, _mm512_loadu_ps(kr + d));
                _mm512_store_ps(vc + t * D + d, _mm512_loadu_ps(kr + s->v_offset + d));
            }
        }
        __m512 sc[KEYS][MAXNV]; /* S^T: [key][rows]; the compiler keeps a pass's half in registers */
        for (int t0 = 0; t0 < KEYS; t0 += H) {
            __m512 a[16][MAXNV];
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
        _mm512_store_ps(ms + 16 * v, m[v]);
        _mm512_store_ps(ls + 16 * v, l[v]);
    }
    }
    }
    for (int hh = 0; hh < nh; hh++) {
    const float *ot = buf + hh * stride + D * R, *ls = ot + D * R + R;
    const int h = h0 + hh;
    for (int v = 0; v < NV; v++) {
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_load_ps(ls + 16 * v));
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

/* One task: heads h0 .. h0 + nh - 1 (the vector path; the scalar one takes one head a task) of
 * one tile of a chunk. */
static void run_task(const Step *s, const int32_t *ch, const int32_t *table, int h0, int nh, int i0, int vec,
                     float *buf) {
    const int P = positions_per_task(s->dim, s->group, vec);
#if defined(__AVX512F__)
    if (vec) {
#define TASK(G, D) task_v(s, ch, table, h0, nh, i0, buf, G, D, D == 64 ? NV64 : NV128)
#define BY_GROUP(D) do { if (s->group == 1) TASK(1, D); else if (s->group == 2) TASK(2, D); \
    else if (s->group == 4) TASK(4, D); else TASK(8, D); } while (0)
        if (s->dim == 64) BY_GROUP(64);
        else BY_GROUP(128);
#undef BY_GROUP
#undef TASK
        return;
    }
#endif
    (void)buf;
    (void)nh;
    task_scalar(s, ch, table, h0, i0, i0 + P < ch[1] ? i0 + P : ch[1]);
}

/* Limits (checked by the caller, prefill_attention.py): block_size a power of 2; dim <= MAX_DIM;
 * every chunk's q_len >= 1 and q_len <= ctx_len <= table_width * block_size. Returns 0, or -1 if
 * out of memory. */
int prefill_attention_f32(const float *q, int64_t q_row_stride, float *out, int64_t out_row_stride,
                          const float *cache, int64_t num_blocks, int block_size, int kv_heads, int dim,
                          int group, const int32_t *chunks, const int32_t *tables, int table_width,
                          int n_chunks, float scale, int threads) {
    Step s = {q, out, cache, q_row_stride, out_row_stride, (int64_t)kv_heads * dim, 0, 0, chunks, tables,
              table_width, block_size, __builtin_ctz((unsigned)block_size), kv_heads, dim, group, 0, scale};
    s.v_offset = num_blocks * block_size * s.token_stride; /* cache[1] - cache[0] */
    s.block_floats = block_size * s.token_stride;
    /* ~512 KB of K and V rows (every head's) per span: a multiple of KEYS, so the chunks a head
     * sees, and its result, do not depend on it; and it depends on the shape only. */
    const int64_t span = (512 << 10) / (8 * s.token_stride) / KEYS * KEYS;
    s.span = span < KEYS ? KEYS : span > 4096 ? 4096 : (int)span;
    const int vec = prefill_attention_vectorised(dim, group);
    const int P = positions_per_task(dim, group, vec);
    int64_t tiles = 0;
    for (int c = 0; c < n_chunks; c++) tiles += (chunks[3 * c + 1] + P - 1) / P;
    /* Heads per task: all (vector path) unless that leaves threads idle; one (scalar path). The
     * split changes no result: each head's computation is the same in any group. */
    int nh = vec ? kv_heads : 1;
    while (threads > 1 && nh % 2 == 0 && tiles * (kv_heads / nh) < 2 * threads) nh /= 2;
    const int groups = kv_heads / nh;
    /* Task k of chunk c: first[c] <= k < first[c + 1]; within a chunk, head group major, the
     * tiles from the last (the costliest: most keys) down, so the dynamic schedule ends on cheap
     * ones. */
    int64_t *first = malloc(sizeof(int64_t) * (n_chunks + 1));
    const int64_t per_thread = vec ? nh * head_state(dim, 16 * (dim == 64 ? NV64 : NV128)) : 0;
    float *bufs = vec ? aligned_alloc(64, sizeof(float) * per_thread * threads) : NULL;
    if (first == NULL || (vec && bufs == NULL)) {
        free(first);
        free(bufs);
        return -1;
    }
    first[0] = 0;
    for (int c = 0; c < n_chunks; c++) first[c + 1] = first[c] + (int64_t)groups * ((chunks[3 * c + 1] + P - 1) / P);
    const int64_t n_tasks = first[n_chunks];
#pragma omp parallel num_threads(threads)
    {
    const unsigned int csr = ftz_enter(); /* each thread has its own floating-point state */
    float *buf = vec ? bufs + per_thread * omp_get_thread_num() : NULL;
    int c = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < n_tasks; k++) {
        while (k >= first[c + 1]) c++;
        while (k < first[c]) c--;
        const int32_t *ch = chunks + 3 * c;
        const int n_tiles = (ch[1] + P - 1) / P;
        const int64_t j = k - first[c];
        const int hg = (int)(j / n_tiles), tile = n_tiles - 1 - (int)(j % n_tiles);
        run_task(&s, ch, tables + (int64_t)c * table_width, hg * nh, nh, tile * P, vec, buf);
    }
    ftz_leave(csr); /* the thread goes back to torch's pool: leave its state as found */
    }
    free(first);
    free(bufs);
    return 0;
}
