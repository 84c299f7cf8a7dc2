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
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* Flush-to-zero and denormals-are-zero on this thread, for this call only. Scores far below a
 * block's maximum exponentiate to subnormals, and x86 arithmetic on subnormals is tens of times
 * slower. Linking with -ffast-math would set these bits for the whole process, for good, as the
 * library loads; native_decode.py links without it, and each call sets them for itself. */
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

/* One task (see attend), exported: the fused decoder layer (decode_layer.c, built without
 * -ffast-math) calls it through a pointer, so its attention is this very machine code and its
 * results are bitwise this kernel's. The caller sets FTZ/DAZ (ftz_enter) around its calls. */
void paged_decode_task_f32(const float *qb, float *ob, const float *cache, const int32_t *table, int ctx,
                           int64_t v_offset, int64_t token_stride, int block_size, int kv_per_task, int group,
                           int dim, float scale) {
#define ATTEND(D) attend(qb, ob, cache, table, ctx, v_offset, token_stride, block_size, kv_per_task, group, D, scale)
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
