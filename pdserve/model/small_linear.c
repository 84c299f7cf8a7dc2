/* y = x W^T (+ b) in float32 for few rows of x (decode-sized batches), W read in place.
 *
 * Layout: x [M][K] (row stride ldx), W [N][K] row-major (nn.Linear's own weight: no packed
 * copy), y [M][N] (row stride ldy), b [N] or NULL.
 *
 * Why not MKL here: at a few rows sgemm repacks W on every call, so each weight is read and
 * written once more than the product needs. This kernel reads each W row from memory once per
 * call: a tile of NR W rows is multiplied against every tile of MR x rows while it sits in L1/L2,
 * and the tile PF_TILES ahead is prefetched meanwhile.
 *
 * Dot-product form: one 16-lane accumulator per (W row, x row) pair, fused multiply-adds over k
 * in steps of 16, then a fixed reduction tree over the 16 lanes, then the K % 16 tail, then the
 * bias. Every output element goes through exactly that sequence whatever M, the tile it falls
 * in, or the number of threads (threads split N; each element is computed by one of them), so a
 * row's result is bitwise the same at any batch size. No -ffast-math: nothing is reassociated
 * behind the code's back; the portable path gives the same bits as the AVX-512 one.
 *
 * Tiles: 16 x 1 at one row (each W row read once, 16 streams), 8 x 2 at two rows, 6 x 4 (24
 * accumulators of the 32 zmm registers, 6 W + 4 x loads per 24 FMAs) from three rows up; on
 * AVX-512 the 6 x 1..4 tiles keep every accumulator in a register, with one
 * prefetch row per x tile and nothing else per k step.
 *
 * Measured (bench/engine_kernels.py --baseline, the demo model's 33 projections, 1 thread, a
 * loaded 2-core machine, each row count interleaved with F.linear and with the 4 x 4 kernel before
 * this one: bench/results/engine_cpu_linear_loaded_r7*.json): 49-81 GFLOP/s at 16-32 rows (the 4 x 4
 * kernel 47-70 in the same runs), its CPU time 0.78-0.94x the 4 x 4 kernel's at 12-32 rows (1.05x
 * at 28 in one noisy run), with the same bits; 0.65-0.95x F.linear's time at 16-32 rows, 0.34-0.6x
 * at 4-12; 1.5-1.8x its roofline (weights at copy bandwidth, FLOPs at MKL's large-matmul rate)
 * at 16 rows. With the weights in L2 (one 1 MB matrix over and over; a C harness, not committed)
 * it reached ~105 GFLOP/s, ~75% of one core's FMA peak: from memory the weight stream and the FMAs overlap only partly. At one row it reads the
 * weights at 85-100% of the copy bandwidth, 0.89-0.97x MKL's sgemv's time in three interleaved
 * runs of 11-25 rounds (0.97x and 1.04x in two of 5 rounds; the same code built twice differs by
 * 2-13% there).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* A tile: NR W rows x MR x rows, NR x MR accumulators (at most ACC_MAX), reduced 16 at a time. */
#define ACC_MAX 32 /* accumulators of the largest tile */
#define LANES 16

#if defined(__AVX512F__)
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)

/* Lane i of the result: the sum of a[i]'s 16 lanes, by one fixed tree. */
static inline __m512 reduce16(const __m512 *a) {
    __m512 s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; i++) /* pairs of lanes 2 apart, within each 128-bit quarter */
        s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d u = _mm512_castps_pd(s1[2 * i]), v = _mm512_castps_pd(s1[2 * i + 1]);
        s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(u, v)), _mm512_castpd_ps(_mm512_unpackhi_pd(u, v)));
    }
    for (int i = 0; i < 2; i++)
        s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
}
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#else
/* Portable: a 16-float struct whose lane loops gcc vectorises (lanes are independent, so no
 * reassociation is needed); the same tree as above, lane for lane. */
typedef struct { float v[LANES]; } vec;
static inline vec VZERO(void) { vec r; memset(&r, 0, sizeof r); return r; }
static inline vec VLOAD(const float *p) { vec r; memcpy(r.v, p, sizeof r.v); return r; }
static inline vec VFMA(vec a, vec b, vec c) {
    for (int l = 0; l < LANES; l++) c.v[l] = __builtin_fmaf(a.v[l], b.v[l], c.v[l]);
    return c;
}
static inline float tree16(const float *v) {
    /* the AVX-512 tree: (l, l+2) within quarters, then (l, l+1), then quarters (0,1),(2,3), then halves */
    float q[4];
    for (int j = 0; j < 4; j++) {
        const float *w = v + 4 * j;
        q[j] = (w[0] + w[2]) + (w[1] + w[3]);
    }
    return (q[0] + q[1]) + (q[2] + q[3]);
}
#define PREFETCH(p) __builtin_prefetch((p), 0, 2)
#endif

/* out[i]: acc[i]'s lanes summed by reduce16's tree, for i < n (out holds n rounded up to 16).
 * Groups of 16 accumulators share one reduce16; a short last group is padded with zeros, whose
 * lanes only reach the padding outputs. */
static inline void reduce_all(const vec *acc, int n, float *out) {
#if defined(__AVX512F__)
    for (int g = 0; g < n; g += 16) {
        __m512 t[16];
        for (int i = 0; i < 16; i++) t[i] = g + i < n ? acc[g + i] : _mm512_setzero_ps();
        _mm512_storeu_ps(out + g, reduce16(t));
    }
#else
    for (int i = 0; i < n; i++) out[i] = tree16(acc[i].v);
#endif
}

/* Every tile ends here, whatever its shape: an element is its reduced lanes s[n * MR + m], then
 * the K % 16 tail by fused multiply-adds, then the bias; rows n < nr of W (wr) against rows
 * m < mr of xm (x's row m0 on, ldx apart), stored at y's row m0 + m, column n0 + n. */
static inline void store_tile(const float *s, int MR, const float *const *wr, int nr, const float *xm, int64_t ldx,
                              int mr, int64_t K16, int64_t K, const float *b, float *y, int64_t ldy, int64_t m0,
                              int64_t n0) {
    for (int n = 0; n < nr; n++) {
        for (int m = 0; m < mr; m++) {
            float v = s[n * MR + m];
            for (int64_t k = K16; k < K; k++) v = __builtin_fmaf(wr[n][k], xm[m * ldx + k], v);
            if (b != NULL) v += b[n0 + n];
            y[(m0 + m) * ldy + n0 + n] = v;
        }
    }
}

/* One tile: W rows n0 .. n0+nr-1 against x rows m0 .. m0+mr-1 (nr <= NR, mr <= MR), K16 = K
 * rounded down to 16. Unused accumulators stay zero and are not stored. Prefetched alongside:
 * pf_rows W rows from pf, pf_stride rows apart (none when pf_rows is 0). */
#define DEFINE_TILE(NR, MR)                                                                        \
static void tile_##NR##x##MR(const float *x, int64_t ldx, const float *W, int64_t K, const float *b, float *y, \
                             int64_t ldy, int64_t m0, int mr, int64_t n0, int nr, const float *pf,            \
                             int pf_rows, int64_t pf_stride) {                                                 \
    vec acc[NR * MR];                                                                                          \
    for (int i = 0; i < NR * MR; i++) acc[i] = VZERO();                                                        \
    const float *wr[NR], *xr[MR];                                                                            \
    for (int n = 0; n < NR; n++) wr[n] = W + (n0 + (n < nr ? n : 0)) * K;                                      \
    for (int m = 0; m < MR; m++) xr[m] = x + (m0 + (m < mr ? m : 0)) * ldx;                                    \
    const int64_t K16 = K & ~(int64_t)(LANES - 1);                                                             \
    if (nr == NR && mr == MR) {                                                                                \
        for (int64_t k = 0; k < K16; k += LANES) {                                                             \
            for (int r = 0; r < pf_rows; r++) PREFETCH(pf + r * pf_stride + k);                                \
            vec xv[MR];                                                                                       \
            for (int m = 0; m < MR; m++) xv[m] = VLOAD(xr[m] + k);                                             \
            for (int n = 0; n < NR; n++) {                                                                     \
                vec wv = VLOAD(wr[n] + k);                                                                     \
                for (int m = 0; m < MR; m++) acc[n * MR + m] = VFMA(wv, xv[m], acc[n * MR + m]);               \
            }                                                                                                  \
        }                                                                                                      \
    } else {                                                                                                   \
        for (int64_t k = 0; k < K16; k += LANES) {                                                             \
            for (int r = 0; r < pf_rows; r++) PREFETCH(pf + r * pf_stride + k);                                \
            for (int n = 0; n < nr; n++) {                                                                     \
                vec wv = VLOAD(wr[n] + k);                                                                     \
                for (int m = 0; m < mr; m++) acc[n * MR + m] = VFMA(wv, VLOAD(xr[m] + k), acc[n * MR + m]);    \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    float s[(NR * MR + 15) / 16 * 16];                                                                         \
    reduce_all(acc, NR * MR, s);                                                                               \
    store_tile(s, MR, wr, nr, x + m0 * ldx, ldx, mr, K16, K, b, y, ldy, m0, n0);                               \
}

DEFINE_TILE(16, 1)
DEFINE_TILE(8, 2)
DEFINE_TILE(6, 4)

/* A tile of nr <= NR W rows against MR x rows, with no per-k branch beyond the prefetch: the
 * accumulators live in registers, and the held operand (the shorter side) is loaded once per k
 * step; a narrower last tile (N % 6, or a caller's slice of W) computes NR rows and stores nr.
 * Same sequence per element as tile_NRxMR. */
#if defined(__AVX512F__)
#define DEFINE_FAST(NR, MR)                                                                                    \
static void fast_##NR##x##MR(const float *x, int64_t ldx, const float *W, int64_t K, const float *b, float *y, \
                             int64_t ldy, int64_t m0, int64_t n0, int nr, const float *pf, int pf_rows, int64_t pf_stride) { \
    __m512 acc[NR * MR];                                                                                       \
    for (int i = 0; i < NR * MR; i++) acc[i] = _mm512_setzero_ps();                                            \
    const float *wr[NR], *xm = x + m0 * ldx; /* rows past nr repeat row n0 and are not stored */               \
    for (int n = 0; n < NR; n++) wr[n] = W + (n0 + (n < nr ? n : 0)) * K;                                      \
    const int64_t K16 = K & ~(int64_t)(LANES - 1);                                                             \
    for (int64_t k = 0; k < K16; k += LANES) {                                                                 \
        for (int r = 0; r < pf_rows; r++) PREFETCH(pf + r * pf_stride + k);                                    \
        if (MR <= NR) {                                                                                        \
            __m512 xv[MR];                                                                                     \
            for (int m = 0; m < MR; m++) xv[m] = _mm512_loadu_ps(xm + m * ldx + k);                            \
            for (int n = 0; n < NR; n++) {                                                                     \
                __m512 wv = _mm512_loadu_ps(wr[n] + k);                                                    \
                for (int m = 0; m < MR; m++) acc[n * MR + m] = _mm512_fmadd_ps(wv, xv[m], acc[n * MR + m]);    \
            }                                                                                                  \
        } else {                                                                                               \
            __m512 wv[NR];                                                                                     \
            for (int n = 0; n < NR; n++) wv[n] = _mm512_loadu_ps(wr[n] + k);                               \
            for (int m = 0; m < MR; m++) {                                                                     \
                __m512 xv = _mm512_loadu_ps(xm + m * ldx + k);                                                 \
                for (int n = 0; n < NR; n++) acc[n * MR + m] = _mm512_fmadd_ps(wv[n], xv, acc[n * MR + m]);    \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    float s[(NR * MR + 15) / 16 * 16];                                                                         \
    reduce_all(acc, NR * MR, s);                                                                               \
    store_tile(s, MR, wr, nr, xm, ldx, MR, K16, K, b, y, ldy, m0, n0);                                         \
}
#endif

#ifndef PF_TILES
#define PF_TILES 2 /* prefetch distance, in W tiles */
#endif

/* W tiles [t0, t1) (of NR rows) against every x tile (of MR rows). Each W tile's rows come
 * from memory once, in the first x tile (the others find them in cache). The tile PF_TILES
 * ahead is prefetched meanwhile, spread evenly: of P x tiles, x tile p prefetches the rows
 * p, p + P, ... of it. */
#define DEFINE_TILES(NR, MR)                                                                                   \
static void tiles_##NR##x##MR(const float *x, int64_t ldx, const float *W, int64_t N, int64_t K, const float *b, \
                              float *y, int64_t ldy, int64_t M, int64_t t0, int64_t t1) {                      \
    const int64_t P = (M + MR - 1) / MR;                                                                       \
    for (int64_t t = t0; t < t1; t++) {                                                                        \
        const int64_t n0 = t * NR;                                                                             \
        const int nr = (int)(N - n0 < NR ? N - n0 : NR);                                                       \
        const int64_t nf = n0 + PF_TILES * NR; /* first row of the tile prefetched */                          \
        for (int64_t p = 0; p < P; p++) {                                                                      \
            const int64_t m0 = p * MR;                                                                         \
            const int mr = (int)(M - m0 < MR ? M - m0 : MR);                                                   \
            int pf_rows = 0;                                                                                   \
            for (int64_t r = nf + p; r < nf + NR && r < N; r += P) pf_rows++;                                  \
            tile_##NR##x##MR(x, ldx, W, K, b, y, ldy, m0, mr, n0, nr, W + (nf + p) * K, pf_rows, P * K);           \
        }                                                                                                      \
    }                                                                                                          \
}

DEFINE_TILES(16, 1)
DEFINE_TILES(8, 2)
DEFINE_TILES(6, 4)

#if defined(__AVX512F__)
DEFINE_FAST(6, 1)
DEFINE_FAST(6, 2)
DEFINE_FAST(6, 3)
DEFINE_FAST(6, 4)

/* tiles_6x4 by fast_6xMR; as there, each W tile's rows come from memory
 * in its first x tile, and the tile PF_TILES ahead is prefetched spread over the x tiles. */
static void tiles_fast_6x4(const float *x, int64_t ldx, const float *W, int64_t N, int64_t K, const float *b,
                           float *y, int64_t ldy, int64_t M, int64_t t0, int64_t t1) {
    typedef void (*fast_fn)(const float *, int64_t, const float *, int64_t, const float *, float *, int64_t,
                            int64_t, int64_t, int, const float *, int, int64_t);
    static const fast_fn by_rows[] = {NULL, fast_6x1, fast_6x2, fast_6x3, fast_6x4};
    const int64_t P = (M + 3) / 4;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n0 = t * 6;
        const int nr = (int)(N - n0 < 6 ? N - n0 : 6);
        const int64_t nf = n0 + PF_TILES * 6; /* first row of the tile prefetched */
        for (int64_t p = 0; p < P; p++) {
            const int64_t m0 = p * 4;
            const int mr = (int)(M - m0 < 4 ? M - m0 : 4);
            int pf_rows = 0;
            for (int64_t r = nf + p; r < nf + 6 && r < N; r += P) pf_rows++;
            by_rows[mr](x, ldx, W, K, b, y, ldy, m0, n0, nr, W + (nf + p) * K, pf_rows, P * K);
        }
    }
}
#endif

/* The tile shape for M rows; part `part` of `parts` equal slices of W, in whole tiles. */
static void run(const float *x, int64_t ldx, const float *W, int64_t N, int64_t K, const float *b, float *y,
                int64_t ldy, int64_t M, int64_t part, int64_t parts) {
    const int nr = M == 1 ? 16 : M == 2 ? 8 : 6;
    const int64_t ntiles = (N + nr - 1) / nr, t0 = ntiles * part / parts, t1 = ntiles * (part + 1) / parts;
    if (M == 1)
        tiles_16x1(x, ldx, W, N, K, b, y, ldy, M, t0, t1);
    else if (M == 2)
        tiles_8x2(x, ldx, W, N, K, b, y, ldy, M, t0, t1);
    else
#if defined(__AVX512F__)
        tiles_fast_6x4(x, ldx, W, N, K, b, y, ldy, M, t0, t1);
#else
        tiles_6x4(x, ldx, W, N, K, b, y, ldy, M, t0, t1);
#endif
}

void small_linear_f32(const float *x, int64_t ldx, const float *W, int64_t N, int64_t K, const float *b,
                      float *y, int64_t ldy, int64_t M, int threads) {
    if (threads <= 1 || N < 64 * threads) {
        run(x, ldx, W, N, K, b, y, ldy, M, 0, 1);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#if defined(_OPENMP)
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t id = 0, nt = 1;
#endif
        /* contiguous slices of W: each thread streams its own part once */
        run(x, ldx, W, N, K, b, y, ldy, M, id, nt);
    }
}
