/* Float32 attention and residual add + layer norm of the packed BERT forward (index_store/encoding/packed_bert.py),
 * for x86-64 CPUs with AVX-512 F or with AVX2 and FMA: the same source is compiled once per family
 * (-mavx512f, or -mavx2 -mfma) by index_store/encoding/native.py, where PyTorch would run a layer's attention as
 * a dozen small operations per group of equal-length passages.
 *
 * Numerics: float32 throughout. A score is the sum of q[d] * k[d] over d in order (one fused multiply-add
 * per term); softmax subtracts the row's maximum and takes a polynomial exp (relative error < 2e-7); each
 * output is the sum of exp-weights times values over the keys in order, times 1 / (the weights' sum).
 * The order of every sum is fixed by this code (no compiler reassociation, no contraction beyond the
 * explicit fused multiply-adds), so the same input gives the same bits whatever the batch; the AVX-512
 * and AVX2 builds differ only in the lane split of the softmax and layer norm sums. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vset1 _mm512_set1_ps
#define vzero _mm512_setzero_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vmax _mm512_max_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* lanes >= m set to v (m in 1..VW) */
static inline vf vtail(vf x, int64_t m, float v) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(v), (__mmask16)((1u << m) - 1), x);
}
static inline float hsum(vf v) { /* halves, then halves of those: a fixed order */
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
static inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
#else
#define VW 8
typedef __m256 vf;
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vset1 _mm256_set1_ps
#define vzero _mm256_setzero_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vmax _mm256_max_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^n for integral n in [-126, 127]: the exponent field built directly */
static inline vf vpow2(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vtail(vf x, int64_t m, float v) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)m), idx));
    return _mm256_blendv_ps(_mm256_set1_ps(v), x, keep);
}
static inline float hsum(vf v) {
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
static inline float hmax(vf v) {
    __m128 b = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_max_ps(b, _mm_movehl_ps(b, b));
    b = _mm_max_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
#endif

#define RB 4 /* query rows per block */

/* exp(x) for x <= 0, clamped at -87: 2^n * p(r), |r| <= ln2 / 2, relative error < 2e-7 */
static inline vf exp_neg(vf x) {
    x = vmax(x, vset1(-87.0f));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnmadd(n, vset1(0.693145751953125f), x);
    r = vfnmadd(n, vset1(1.428606765330187e-06f), r);
    vf p = vset1(1.0f / 720.0f);
    p = vfmadd(p, r, vset1(1.0f / 120.0f));
    p = vfmadd(p, r, vset1(1.0f / 24.0f));
    p = vfmadd(p, r, vset1(1.0f / 6.0f));
    p = vfmadd(p, r, vset1(0.5f));
    p = vfmadd(p, r, vset1(1.0f));
    p = vfmadd(p, r, vset1(1.0f));
    return vpow2(p, n);
}

int densebeam_fp32_lanes(void) { return VW; }

/* Scores of R query rows (q0: the first, rows W apart) against keys b0 and b0 + 1 .. b0 + nk - 1 blocks of
 * VW keys (nk 1 or 2): kt (D, Lp) transposed keys. Stores them to s (rows Lp apart), the last block's lanes
 * past the tail set to -inf, and raises the running maxima m. Every score is one chain of fused
 * multiply-adds over d in order. Inlined with R and nk constant, the accumulators stay in registers. */
static inline __attribute__((always_inline)) void scores(const float *q0, int64_t W, const float *kt, int64_t Lp,
                                                          int64_t D, int64_t b0, int nk, int64_t nb, int64_t tail,
                                                          float *s, vf *m, const int R) {
    vf a[RB][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = vzero();
    const float *k = kt + b0 * VW;
    for (int64_t d = 0; d < D; d++) {
        const vf k0 = vload(k + d * Lp), k1 = nk > 1 ? vload(k + d * Lp + VW) : vzero();
        for (int r = 0; r < R; r++) {
            const vf qd = vset1(q0[r * W + d]);
            a[r][0] = vfmadd(qd, k0, a[r][0]);
            if (nk > 1) a[r][1] = vfmadd(qd, k1, a[r][1]);
        }
    }
    for (int t = 0; t < nk; t++) {
        const int64_t b = b0 + t;
        for (int r = 0; r < R; r++) {
            vf x = a[r][t];
            if (b == nb - 1) x = vtail(x, tail, -INFINITY);
            m[r] = vmax(m[r], x);
            vstore(s + r * Lp + b * VW, x);
        }
    }
}

/* out rows <- (exp-weights s of R rows) x (values v, rows W apart) * inv, two vectors of columns at a time */
static inline __attribute__((always_inline)) void weigh(const float *s, int64_t Lp, const float *v, int64_t W,
                                                         const float *inv, float *out, int64_t O, int64_t L, int64_t D,
                                                         const int R) {
    for (int64_t c = 0; c < D; c += 2 * VW) {
        const int two = c + VW < D;
        vf o[RB][2];
        for (int r = 0; r < R; r++) o[r][0] = o[r][1] = vzero();
        for (int64_t j = 0; j < L; j++) {
            const vf va = vload(v + j * W + c), vb = two ? vload(v + j * W + c + VW) : vzero();
            for (int r = 0; r < R; r++) {
                const vf w = vset1(s[r * Lp + j]);
                o[r][0] = vfmadd(w, va, o[r][0]);
                o[r][1] = vfmadd(w, vb, o[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            const vf sc = vset1(inv[r]);
            vstore(out + r * O + c, vmul(o[r][0], sc));
            if (two) vstore(out + r * O + c + VW, vmul(o[r][1], sc));
        }
    }
}

/* R query rows of one head: scores, softmax weights, weighted values */
static inline __attribute__((always_inline)) void rows(const float *q0, const float *kt, const float *v, int64_t W,
                                                        float *s, float *out, int64_t O, int64_t L, int64_t Lp,
                                                        int64_t D, const int R) {
    const int64_t nb = Lp / VW, tail = L - (nb - 1) * VW;
    vf m[RB];
    for (int r = 0; r < R; r++) m[r] = vset1(-INFINITY);
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) scores(q0, W, kt, Lp, D, b, 2, nb, tail, s, m, R);
    if (b < nb) scores(q0, W, kt, Lp, D, b, 1, nb, tail, s, m, R);
    float inv[RB];
    for (int r = 0; r < R; r++) { /* exp-weights in place, 1 / their sum */
        float *sr = s + r * Lp;
        const vf mx = vset1(hmax(m[r]));
        vf sum = vzero();
        for (int64_t bb = 0; bb < nb; bb++) {
            vf e = exp_neg(vsub(vload(sr + bb * VW), mx));
            if (bb == nb - 1) e = vtail(e, tail, 0.0f);
            vstore(sr + bb * VW, e);
            sum = vadd(sum, e);
        }
        inv[r] = 1.0f / hsum(sum);
    }
    weigh(s, Lp, v, W, inv, out, O, L, D, R);
}

/* One head of one passage of L rows. q: the first row's query of this head (rows W apart); kt: (D, Lp)
 * keys transposed, columns >= L zero; v: the first row's value of this head (rows W apart); s: (RB, Lp)
 * scratch; out: the first row's output of this head (rows O apart). */
static void head(const float *q, const float *kt, const float *v, int64_t W, float *s, float *out, int64_t O,
                 int64_t L, int64_t Lp, int64_t D) {
    int64_t i0 = 0;
    for (; i0 + RB <= L; i0 += RB) rows(q + i0 * W, kt, v, W, s, out + i0 * O, O, L, Lp, D, RB);
    switch (L - i0) {
        case 3: rows(q + i0 * W, kt, v, W, s, out + i0 * O, O, L, Lp, D, 3); break;
        case 2: rows(q + i0 * W, kt, v, W, s, out + i0 * O, O, L, Lp, D, 2); break;
        case 1: rows(q + i0 * W, kt, v, W, s, out + i0 * O, O, L, Lp, D, 1); break;
        default: break;
    }
}

/* Attention of one layer over packed rows. qkv: (rows, 3 * H * D) float32, each row q | k | v, each (H, D),
 * the 1 / sqrt(D) score scale already in q; ctx: (rows, H * D) float32. groups: (first row, passages,
 * length) triples: a group's passages are consecutive blocks of `length` rows, each attending within
 * itself. Returns 0, or -1 (out of memory), -2 (D not a positive multiple of the vector width). */
int densebeam_attend_fp32(const float *qkv, float *ctx, const int64_t *groups, int64_t ngroups, int64_t H,
                          int64_t D) {
    if (D <= 0 || D % VW) return -2;
    int64_t Lmax = 0;
    for (int64_t g = 0; g < ngroups; g++) if (groups[3 * g + 2] > Lmax) Lmax = groups[3 * g + 2];
    const int64_t Lpm = (Lmax + VW - 1) / VW * VW, W = 3 * H * D, O = H * D;
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)(D * Lpm) + 64);
    float *s = aligned_alloc(64, sizeof(float) * (size_t)(RB * Lpm) + 64);
    if (!kt || !s) { free(kt); free(s); return -1; }
    for (int64_t g = 0; g < ngroups; g++) {
        const int64_t row0 = groups[3 * g], n = groups[3 * g + 1], L = groups[3 * g + 2], Lp = (L + VW - 1) / VW * VW;
        for (int64_t p = 0; p < n; p++) {
            const float *base = qkv + (row0 + p * L) * W;
            float *out = ctx + (row0 + p * L) * O;
            for (int64_t h = 0; h < H; h++) {
                const float *k = base + H * D + h * D;
                for (int64_t d = 0; d < D; d++) { /* keys transposed: (D, Lp) */
                    float *row = kt + d * Lp;
                    for (int64_t j = 0; j < L; j++) row[j] = k[j * W + d];
                    for (int64_t j = L; j < Lp; j++) row[j] = 0.0f;
                }
                head(base + h * D, kt, base + 2 * H * D + h * D, W, s, out + h * D, O, L, Lp, D);
            }
        }
    }
    free(kt); free(s);
    return 0;
}

/* h <- LayerNorm(a + h) * gamma + beta over rows of `cols` float32 values (cols a multiple of the vector
 * width, at most 4096), in place: the sum a + h as PyTorch adds it, mean and variance as float32 sums in
 * two passes. Returns 0, or -2 (bad cols). */
int densebeam_add_layernorm_fp32(const float *a, float *h, const float *gamma, const float *beta, int64_t rows,
                                 int64_t cols, float eps) {
    if (cols <= 0 || cols % VW || cols > 4096) return -2;
    float x[4096] __attribute__((aligned(64)));
    const float inv_n = 1.0f / (float)cols;
    for (int64_t i = 0; i < rows; i++) {
        const float *ar = a + i * cols;
        float *hr = h + i * cols;
        vf sum = vzero();
        for (int64_t c = 0; c < cols; c += VW) {
            const vf t = vadd(vload(ar + c), vload(hr + c));
            vstore(x + c, t);
            sum = vadd(sum, t);
        }
        const vf mean = vset1(hsum(sum) * inv_n);
        vf sq = vzero();
        for (int64_t c = 0; c < cols; c += VW) {
            const vf d = vsub(vload(x + c), mean);
            sq = vadd(sq, vmul(d, d));
        }
        const vf rstd = vset1(1.0f / sqrtf(hsum(sq) * inv_n + eps));
        for (int64_t c = 0; c < cols; c += VW) {
            const vf y = vmul(vsub(vload(x + c), mean), rstd);
            vstore(hr + c, vadd(vmul(y, vload(gamma + c)), vload(beta + c)));
        }
    }
    return 0;
}
