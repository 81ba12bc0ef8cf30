/* Attention of the packed BERT forward (index_store/encoding/packed_bert.py) on x86-64 CPUs with AVX-512 F, BW
 * and BF16: one call per layer, every passage and head, no Python in between. Built and loaded by
 * index_store/encoding/native.py (compiled on first use with the machine's C compiler; PyTorch's attention is used
 * where that is not possible).
 *
 * Numerics: scores are float32 sums of exact bf16 x bf16 products (the PyTorch path rounds the scores to
 * bf16 before the softmax), softmax in float32 with a polynomial exp (relative error < 2e-7), the
 * weights rounded to bf16 for the value products (as the PyTorch path does; to nearest even by the CPU's
 * own conversion, which flushes weights below 2^-126, exp of scores 87 below the row's maximum, to
 * zero), float32 sums, the output rounded to bf16 to nearest even. The order of every sum is fixed by this code (no compiler reassociation,
 * no contraction): the same input gives the same bits on every CPU that runs it. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#define RB 4 /* query rows per block */

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i to_bf16(__m512 x) { /* round to nearest even, NaN kept: as torch's float -> bfloat16 */
    __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                                     _mm512_set1_epi32(0x7fff)));
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* the sum of the 16 lanes in a fixed order (halves, then halves of those): the same bits from every compiler */
static inline float hsum(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}

/* exp(x) for x <= 0, clamped at -87: 2^n * p(r), |r| <= ln2 / 2, relative error < 2e-7 */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* r[c] <- column c of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15] */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) {
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int e = 0; e < 4; e++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88), v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
        r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[4 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

/* the transpose alone, for its test */
void densebeam_transpose16(const int32_t *in, int32_t *out) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(in + 16 * i);
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(out + 16 * i, r[i]);
}

/* One head of one passage of L rows. q: the first row's query of this head (bf16, rows W apart);
 * kp: (D / 2, Lp) pairs of key values (two bf16 in 32 bits), columns >= L zero; vp: ((L + 1) / 2, D)
 * pairs of value rows (rows 2j and 2j + 1 interleaved); s: (RB, Lp) float scratch, sb: (RB, Lp) bf16
 * scratch; out: the first row's output of this head (bf16, rows O apart). */
static void head(const uint16_t *q, int64_t W, const uint32_t *kp, const uint32_t *vp, float *s, uint16_t *sb,
                 uint16_t *out, int64_t O, int64_t L, int64_t Lp, int64_t D) {
    const int64_t nb = Lp / 16, DP = D / 2, WP = W / 2;
    const __mmask16 last = (__mmask16)((L % 16) ? ((1u << (L % 16)) - 1) : 0xffff);
    for (int64_t i0 = 0; i0 < L; i0 += RB) {
        const int64_t R = (L - i0) < RB ? (L - i0) : RB;
        const uint32_t *q0 = (const uint32_t *)(q + i0 * W);
        __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0; /* running maxima of each row's scores */
        for (int64_t b = 0; b < nb; b++) { /* scores of RB rows against 16 keys: fp32 sums of exact products */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const uint32_t *k = kp + b * 16;
            for (int64_t d = 0; d < DP; d++) {
                __m512bh kv = (__m512bh)_mm512_loadu_si512(k + d * Lp);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)q0[d]), kv);
                if (R > 1) a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)q0[WP + d]), kv);
                if (R > 2) a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_set1_epi32((int)q0[2 * WP + d]), kv);
                if (R > 3) a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_set1_epi32((int)q0[3 * WP + d]), kv);
            }
            const __mmask16 keep = b == nb - 1 ? last : 0xffff;
            m0 = _mm512_mask_max_ps(m0, keep, m0, a0); m1 = _mm512_mask_max_ps(m1, keep, m1, a1);
            m2 = _mm512_mask_max_ps(m2, keep, m2, a2); m3 = _mm512_mask_max_ps(m3, keep, m3, a3);
            _mm512_storeu_ps(s + b * 16, a0);
            if (R > 1) _mm512_storeu_ps(s + Lp + b * 16, a1);
            if (R > 2) _mm512_storeu_ps(s + 2 * Lp + b * 16, a2);
            if (R > 3) _mm512_storeu_ps(s + 3 * Lp + b * 16, a3);
        }
        const __m512 mm[RB] = {m0, m1, m2, m3};
        float inv[RB];
        for (int64_t r = 0; r < R; r++) { /* softmax numerators in place, 1 / their sum */
            float *sr = s + r * Lp;
            const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mm[r]));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m512 e = _mm512_maskz_mov_ps(b == nb - 1 ? last : 0xffff,
                                               exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + b * 16), mx)));
                _mm256_storeu_si256((__m256i *)(sb + r * Lp + b * 16), (__m256i)_mm512_cvtneps_pbh(e));
                sum = _mm512_add_ps(sum, e);
            }
            inv[r] = 1.0f / hsum(sum);
        }
        for (int64_t c = 0; c < D; c += 32) { /* weighted sums of values, 32 columns at a time, pairs of keys */
            __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, p0 = o0, p1 = o0, p2 = o0, p3 = o0;
            const uint32_t *w0 = (const uint32_t *)sb;
            const int64_t SP = Lp / 2;
            for (int64_t jp = 0; jp < (L + 1) / 2; jp++) {
                const __m512bh va = (__m512bh)_mm512_loadu_si512(vp + (jp * (D / 32) + c / 32) * 32);
                const __m512bh vb = (__m512bh)_mm512_loadu_si512(vp + (jp * (D / 32) + c / 32) * 32 + 16);
                __m512bh w = (__m512bh)_mm512_set1_epi32((int)w0[jp]);
                o0 = _mm512_dpbf16_ps(o0, w, va); p0 = _mm512_dpbf16_ps(p0, w, vb);
                if (R > 1) { w = (__m512bh)_mm512_set1_epi32((int)w0[SP + jp]); o1 = _mm512_dpbf16_ps(o1, w, va); p1 = _mm512_dpbf16_ps(p1, w, vb); }
                if (R > 2) { w = (__m512bh)_mm512_set1_epi32((int)w0[2 * SP + jp]); o2 = _mm512_dpbf16_ps(o2, w, va); p2 = _mm512_dpbf16_ps(p2, w, vb); }
                if (R > 3) { w = (__m512bh)_mm512_set1_epi32((int)w0[3 * SP + jp]); o3 = _mm512_dpbf16_ps(o3, w, va); p3 = _mm512_dpbf16_ps(p3, w, vb); }
            }
            uint16_t *dst = out + i0 * O + c;
            const __m512 oo[RB] = {o0, o1, o2, o3}, pp[RB] = {p0, p1, p2, p3};
            for (int64_t r = 0; r < R; r++) {
                const __m512 sc = _mm512_set1_ps(inv[r]);
                _mm256_storeu_si256((__m256i *)(dst + r * O), to_bf16(_mm512_mul_ps(oo[r], sc)));
                _mm256_storeu_si256((__m256i *)(dst + r * O + 16), to_bf16(_mm512_mul_ps(pp[r], sc)));
            }
        }
    }
}

/* Attention of one layer over packed rows. qkv: (rows, 3 * H * D) bf16, each row q | k | v, each (H, D),
 * the 1 / sqrt(D) score scale already in q; ctx: (rows, H * D) bf16. groups: (first row, passages,
 * length) triples: a group's passages are consecutive blocks of `length` rows, each attending within
 * itself. Returns 0, or -1 (out of memory), -2 (D not a multiple of 32). */
int densebeam_attend_bf16(const uint16_t *qkv, uint16_t *ctx, const int64_t *groups, int64_t ngroups,
                          int64_t H, int64_t D) {
    if (D % 32 || D <= 0) return -2;
    int64_t Lmax = 0;
    for (int64_t g = 0; g < ngroups; g++) if (groups[3 * g + 2] > Lmax) Lmax = groups[3 * g + 2];
    const int64_t Lpm = (Lmax + 15) / 16 * 16, W = 3 * H * D, O = H * D;
    uint32_t *kp = aligned_alloc(64, sizeof(uint32_t) * (size_t)(D / 2 * Lpm) + 64);
    uint32_t *vp = aligned_alloc(64, sizeof(uint32_t) * (size_t)(Lpm / 2 * D) + 64);
    uint16_t *sb = aligned_alloc(64, sizeof(uint16_t) * (size_t)(RB * Lpm) + 64);
    float *s = aligned_alloc(64, sizeof(float) * (size_t)(RB * Lpm) + 64);
    if (!kp || !vp || !s || !sb) { free(kp); free(vp); free(s); free(sb); return -1; }
    uint16_t ilo[32], ihi[32];
    for (int i = 0; i < 16; i++) { ilo[2 * i] = i; ilo[2 * i + 1] = 32 + i; ihi[2 * i] = 16 + i; ihi[2 * i + 1] = 48 + i; }
    const __m512i lo = _mm512_loadu_si512(ilo), hi = _mm512_loadu_si512(ihi);
    for (int64_t g = 0; g < ngroups; g++) {
        const int64_t row0 = groups[3 * g], n = groups[3 * g + 1], L = groups[3 * g + 2], Lp = (L + 15) / 16 * 16;
        for (int64_t p = 0; p < n; p++) {
            const uint16_t *base = qkv + (row0 + p * L) * W;
            uint16_t *out = ctx + (row0 + p * L) * O;
            for (int64_t h = 0; h < H; h++) {
                const uint16_t *k = base + H * D + h * D, *vv = base + 2 * H * D + h * D;
                for (int64_t j0 = 0; j0 < Lp; j0 += 16) { /* key pairs, transposed 16 keys at a time */
                    for (int64_t c = 0; c < D; c += 32) {
                        __m512i r[16];
                        for (int64_t t = 0; t < 16; t++)
                            r[t] = j0 + t < L ? _mm512_loadu_si512(k + (j0 + t) * W + c) : _mm512_setzero_si512();
                        transpose16(r);
                        for (int64_t t = 0; t < 16; t++) _mm512_storeu_si512(kp + (c / 2 + t) * Lp + j0, r[t]);
                    }
                }
                for (int64_t jp = 0; jp < (L + 1) / 2; jp++) /* value pairs: rows 2jp, 2jp + 1 interleaved */
                    for (int64_t c = 0; c < D; c += 32) {
                        const __m512i a = _mm512_loadu_si512(vv + 2 * jp * W + c);
                        const __m512i b = 2 * jp + 1 < L ? _mm512_loadu_si512(vv + (2 * jp + 1) * W + c) : _mm512_setzero_si512();
                        _mm512_storeu_si512(vp + (jp * (D / 32) + c / 32) * 32, _mm512_permutex2var_epi16(a, lo, b));
                        _mm512_storeu_si512(vp + (jp * (D / 32) + c / 32) * 32 + 16, _mm512_permutex2var_epi16(a, hi, b));
                    }
                if (L % 2) for (int64_t r = 0; r < RB; r++) sb[r * Lp + L] = 0;
                head(base + h * D, W, kp, vp, s, sb, out + h * D, O, L, Lp, D);
            }
        }
    }
    free(kp); free(vp); free(s); free(sb);
    return 0;
}

/* One row of a residual add + layer norm: x (cols floats, 64-byte aligned) holds the sum and `sum` its
 * lanes' total; y = (x - mean) * rstd * gamma + beta goes to f32 (when not NULL) and, rounded to bf16, to
 * b. Mean and variance are float32 sums, two passes. */
static inline void norm_row(const float *x, __m512 sum, const float *gamma, const float *beta, int64_t cols,
                            float eps, float *f32, uint16_t *b) {
    const float inv_n = 1.0f / (float)cols;
    const __m512 mean = _mm512_set1_ps(hsum(sum) * inv_n);
    __m512 sq = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) {
        __m512 d = _mm512_sub_ps(_mm512_load_ps(x + c), mean);
        sq = _mm512_add_ps(sq, _mm512_mul_ps(d, d));
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(hsum(sq) * inv_n + eps));
    for (int64_t c = 0; c < cols; c += 16) {
        __m512 y = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(x + c), mean), rstd);
        y = _mm512_add_ps(_mm512_mul_ps(y, _mm512_loadu_ps(gamma + c)), _mm512_loadu_ps(beta + c));
        if (f32) _mm512_storeu_ps(f32 + c, y);
        _mm256_storeu_si256((__m256i *)(b + c), to_bf16(y));
    }
}

/* out = LayerNorm(a + h) * gamma + beta over rows of `cols` values (cols % 16 == 0): a and h bf16, their sum
 * and the statistics in float32 (PyTorch's path rounds the sum to bf16 first), gamma and beta float32, out
 * bf16 (may be h). Returns 0, or -2 (cols not a multiple of 16, or more than 4096). */
int densebeam_add_layernorm_bf16(const uint16_t *a, const uint16_t *h, const float *gamma, const float *beta,
                                 uint16_t *out, int64_t rows, int64_t cols, float eps) {
    if (cols % 16 || cols <= 0 || cols > 4096) return -2;
    float x[4096] __attribute__((aligned(64)));
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *ar = a + i * cols, *hr = h + i * cols;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 16) {
            __m512 v = _mm512_add_ps(load_bf16(ar + c), load_bf16(hr + c));
            _mm512_store_ps(x + c, v);
            sum = _mm512_add_ps(sum, v);
        }
        norm_row(x, sum, gamma, beta, cols, eps, NULL, out + i * cols);
    }
    return 0;
}

/* The bf16-mixed residual connection: h <- LayerNorm(float(a) + h) * gamma + beta, and hb <- h rounded to
 * bf16 (the next matrix product's input), in one pass. a bf16; h, gamma, beta float32; everything as
 * PyTorch's float32 path computes it (the same sum a + h; mean and variance as float32 sums, two passes)
 * but for the order of the statistics' sums. Rows of `cols` values (cols % 16 == 0, at most 4096); h may
 * be updated in place. Returns 0, or -2 (bad cols). */
int densebeam_add_layernorm_mixed(const uint16_t *a, float *h, const float *gamma, const float *beta,
                                  uint16_t *hb, int64_t rows, int64_t cols, float eps) {
    if (cols % 16 || cols <= 0 || cols > 4096) return -2;
    float x[4096] __attribute__((aligned(64)));
    for (int64_t i = 0; i < rows; i++) {
        const uint16_t *ar = a + i * cols;
        float *hr = h + i * cols;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 16) {
            __m512 v = _mm512_add_ps(load_bf16(ar + c), _mm512_loadu_ps(hr + c));
            _mm512_store_ps(x + c, v);
            sum = _mm512_add_ps(sum, v);
        }
        norm_row(x, sum, gamma, beta, cols, eps, hr, hb + i * cols);
    }
    return 0;
}
