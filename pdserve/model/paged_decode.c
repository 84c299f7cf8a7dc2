/* Paged decode attention on a CPU, fp32: one query token per sequence, K/V read in place from
 * the cache blocks named by the sequence's block table (no gather copy; each block is read once).
 *
 * Layout (as pdserve/model/attention.py): cache [2][num_blocks][block_size][kv_heads][dim];
 * q and out [rows][heads][dim] with heads contiguous (row strides given); query heads
 * h * group .. h * group + group - 1 share KV head h (GQA).
 *
 * One task per (sequence, KV head): it loads each key and value row once and serves all `group`
 * query heads from it, so KV traffic is the sum of context lengths, once. The softmax is
 * streamed block by block ("online softmax", as FlashAttention): a running maximum and sum per
 * query head, the accumulator rescaled when the maximum grows, so nothing of the context's
 * length is ever materialised. Built with -O3 -march=native -fopenmp -ffast-math by
 * native_decode.py; no infinities are used (fast-math assumes none): the running maximum starts
 * at -FLT_MAX, whose rescale factor underflows to 0.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_GROUP 16
#define MAX_DIM 256
#define MAX_BLOCK 128

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Supported shapes: group <= MAX_GROUP, dim <= MAX_DIM, block_size <= MAX_BLOCK (checked by
 * the caller, which falls back to torch otherwise). ctx_lens[b] >= 1. */
void paged_decode_f32(const float *q, int64_t q_row_stride, float *out, int64_t out_row_stride,
                      const float *cache, int64_t num_blocks, int block_size, int kv_heads,
                      int dim, int group, const int64_t *rows, const int32_t *ctx_lens,
                      const int32_t *tables, int table_width, int batch, float scale, int threads) {
    const int64_t token_stride = (int64_t)kv_heads * dim;    /* next slot of a block */
    const int64_t v_offset = num_blocks * block_size * token_stride; /* cache[1] - cache[0] */

    /* dynamic: contexts differ in length, so tasks differ in cost. */
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < kv_heads; h++) {
            float qs[MAX_GROUP][MAX_DIM], acc[MAX_GROUP][MAX_DIM];
            float m[MAX_GROUP], l[MAX_GROUP], p[MAX_GROUP][MAX_BLOCK];
            const float *qb = q + rows[b] * q_row_stride + (int64_t)h * group * dim;
            for (int g = 0; g < group; g++) {
                for (int i = 0; i < dim; i++) {
                    qs[g][i] = qb[g * dim + i] * scale; /* scale once, not per key */
                    acc[g][i] = 0.0f;
                }
                m[g] = -FLT_MAX;
                l[g] = 0.0f;
            }
            const int ctx = ctx_lens[b];
            for (int j = 0; j * block_size < ctx; j++) {
                const int n = ctx - j * block_size < block_size ? ctx - j * block_size : block_size;
                const float *k = cache + (int64_t)tables[(int64_t)b * table_width + j] * block_size
                                 * token_stride + (int64_t)h * dim;
                const float *v = k + v_offset;
                for (int t = 0; t < n; t++)
                    for (int g = 0; g < group; g++) p[g][t] = dot(qs[g], k + t * token_stride, dim);
                for (int g = 0; g < group; g++) {
                    float mx = m[g];
                    for (int t = 0; t < n; t++) mx = p[g][t] > mx ? p[g][t] : mx;
                    /* Rescale once per block, not per key: the block's scores are all known. */
                    const float corr = expf(m[g] - mx);
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int t = 0; t < n; t++) {
                        p[g][t] = expf(p[g][t] - mx);
                        sum += p[g][t];
                    }
                    l[g] = l[g] * corr + sum;
                    m[g] = mx;
#pragma omp simd
                    for (int i = 0; i < dim; i++) acc[g][i] *= corr;
                }
                for (int t = 0; t < n; t++) {
                    const float *vt = v + t * token_stride;
                    for (int g = 0; g < group; g++) {
                        const float w = p[g][t];
#pragma omp simd
                        for (int i = 0; i < dim; i++) acc[g][i] += w * vt[i];
                    }
                }
            }
            float *ob = out + rows[b] * out_row_stride + (int64_t)h * group * dim;
            for (int g = 0; g < group; g++) {
                const float inv = 1.0f / l[g];
                for (int i = 0; i < dim; i++) ob[g * dim + i] = acc[g][i] * inv;
            }
        }
    }
}
