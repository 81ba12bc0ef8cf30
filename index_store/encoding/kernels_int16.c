/* Integer matrix products of the packed BERT forward's int16 precision (index_store/encoding/packed_bert.py),
 * for x86-64 CPUs without bf16 arithmetic: the same source is compiled once per family (-mavx512f
 * -mavx512bw [-mavx512vnni], or -mavx2 -mfma) by index_store/encoding/native.py.
 *
 * y = x w^T + b with x rounded per row (token) to 14-bit integers and w per output channel to 12-bit
 * integers, both symmetric (scale = max |value| / levels). Products of 16-bit pairs are summed into 32-bit
 * integers (vpmaddwd, or vpdpwssd with AVX-512 VNNI), which do twice the multiply-adds of a float32 fused
 * multiply-add per instruction. The sums are exact: a block of I16_KB inputs cannot overflow
 * (8191 * 2047 * 128 < 2^31), each block's sum is converted to float32 and added in order, and the result
 * is scaled by the row's and the channel's scales and the bias added. Integer sums do not depend on
 * their order, so a row's output depends on that row alone, whatever the batch. Tiles of MR rows by two
 * vectors of columns keep their sums in registers (other shapes measured slower or spilled). */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define I16_ALEV 8191  /* activation levels: 14-bit symmetric */
#define I16_WLEV 2047  /* weight levels: 12-bit symmetric */
#define I16_KB 128     /* inputs per exact 32-bit block: I16_ALEV * I16_WLEV * I16_KB < 2^31 */
#define MC 64          /* rows per block of the outer loop (a multiple of MR; their int16 inputs stay in L2) */
#define KC 384         /* inputs per pass over a panel (a multiple of I16_KB) */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define IW 16
#define MR 8  /* rows per tile */
typedef __m512i vi;
typedef __m512 vf;
static inline vi vbcast(const int16_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
static inline vi vload_i(const int16_t *p) { return _mm512_loadu_si512((const void *)p); }
/* acc += the pair sums of a * b, written in place (asm): left to itself GCC accumulates into other
 * registers and copies (with VNNI, even spills) them back every step */
#if defined(__AVX512VNNI__)
static inline vi vdot(vi acc, vi a, vi b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}
#else
static inline vi vdot(vi acc, vi a, vi b) {
    const vi t = _mm512_madd_epi16(a, b);
    __asm__("vpaddd %1, %0, %0" : "+v"(acc) : "v"(t));
    return acc;
}
#endif
#define vzero_i _mm512_setzero_si512
#define vcvt _mm512_cvtepi32_ps
#define vzero_f _mm512_setzero_ps
#define vadd_f _mm512_add_ps
#define vmul_f _mm512_mul_ps
#define vset1_f _mm512_set1_ps
#define vload_f _mm512_loadu_ps
#define vstore_f _mm512_storeu_ps
#define vmax_f _mm512_max_ps
#define vmin_f _mm512_min_ps
static inline vf vabs_f(vf x) { return _mm512_abs_ps(x); }
static inline float hmax_f(vf v) { return _mm512_reduce_max_ps(v); }
/* 16 floats, already integral, to 16 int16 */
static inline void store16(int16_t *p, vf x) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x)));
}
#define QW 16
static inline vf vround_f(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#define vfmadd_f _mm512_fmadd_ps
#define vfnmadd_f _mm512_fnmadd_ps
/* 1 / d for d >= 1: the 14-bit estimate and one Newton step */
static inline vf vrecip_f(vf d) {
    const vf r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}
#define vsub_f _mm512_sub_ps
static inline vf vpow2_f(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* |m| with the sign of s */
static inline vf vcopysign_f(vf m, vf s) {
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(INT32_MIN));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(m), sign));
}
#else
#define IW 8
#define MR 4
typedef __m256i vi;
typedef __m256 vf;
static inline vi vbcast(const int16_t *p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
static inline vi vload_i(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
#if defined(__AVXVNNI__)
static inline vi vdot(vi acc, vi a, vi b) { return _mm256_dpwssd_avx_epi32(acc, a, b); }
#else
/* acc += the pair sums of a * b, the add written in place (as above) */
static inline vi vdot(vi acc, vi a, vi b) {
    const vi t = _mm256_madd_epi16(a, b);
    __asm__("vpaddd %1, %0, %0" : "+x"(acc) : "x"(t));
    return acc;
}
#endif
#define vzero_i _mm256_setzero_si256
#define vcvt _mm256_cvtepi32_ps
#define vzero_f _mm256_setzero_ps
#define vadd_f _mm256_add_ps
#define vmul_f _mm256_mul_ps
#define vset1_f _mm256_set1_ps
#define vload_f _mm256_loadu_ps
#define vstore_f _mm256_storeu_ps
#define vmax_f _mm256_max_ps
#define vmin_f _mm256_min_ps
static inline vf vabs_f(vf x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline float hmax_f(vf v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    a = _mm_max_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
/* 8 floats, already integral, to 8 int16 */
static inline void store16(int16_t *p, vf x) {
    __m256i i = _mm256_cvtps_epi32(x);
    __m128i s = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storeu_si128((__m128i *)p, s);
}
#define QW 8
static inline vf vround_f(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#define vfmadd_f _mm256_fmadd_ps
#define vfnmadd_f _mm256_fnmadd_ps
/* 1 / d for d >= 1: the 12-bit estimate and two Newton steps */
static inline vf vrecip_f(vf d) {
    vf r = _mm256_rcp_ps(d);
    r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
}
#define vsub_f _mm256_sub_ps
/* p * 2^n for integral n in [-126, 127]: the exponent field built directly */
static inline vf vpow2_f(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline vf vcopysign_f(vf m, vf s) {
    return _mm256_or_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), m), _mm256_and_ps(_mm256_set1_ps(-0.0f), s));
}
#endif
#define NV 2  /* vectors of columns per tile (the accumulators below are written out for MR x 2) */
#define NR (NV * IW)  /* output columns per tile: NV vectors of 32-bit sums */

/* exp(x) for x <= 0, clamped at -87: 2^n * p(r), |r| <= ln2 / 2, relative error < 2e-7 */
static inline vf exp_neg(vf x) {
    x = vmax_f(x, vset1_f(-87.0f));
    vf n = vround_f(vmul_f(x, vset1_f(1.44269504088896341f)));
    vf r = vfnmadd_f(n, vset1_f(0.693145751953125f), x);
    r = vfnmadd_f(n, vset1_f(1.428606765330187e-06f), r);
    vf p = vset1_f(1.0f / 720.0f);
    p = vfmadd_f(p, r, vset1_f(1.0f / 120.0f));
    p = vfmadd_f(p, r, vset1_f(1.0f / 24.0f));
    p = vfmadd_f(p, r, vset1_f(1.0f / 6.0f));
    p = vfmadd_f(p, r, vset1_f(0.5f));
    p = vfmadd_f(p, r, vset1_f(1.0f));
    p = vfmadd_f(p, r, vset1_f(1.0f));
    return vpow2_f(p, n);
}

/* GELU with the error function, x * (1 + erf(x / sqrt 2)) / 2: erf by Abramowitz and Stegun 7.1.26
 * (absolute error < 1.5e-7), as PyTorch's vectorized CPU erf computes it */
static inline vf gelu(vf x) {
    const vf z = vmul_f(vabs_f(x), vset1_f(0.70710678118654752f));
    const vf t = vrecip_f(vfmadd_f(vset1_f(0.3275911f), z, vset1_f(1.0f)));
    vf p = vset1_f(1.061405429f);
    p = vfmadd_f(p, t, vset1_f(-1.453152027f));
    p = vfmadd_f(p, t, vset1_f(1.421413741f));
    p = vfmadd_f(p, t, vset1_f(-0.284496736f));
    p = vfmadd_f(p, t, vset1_f(0.254829592f));
    p = vmul_f(p, t);
    const vf e = vfnmadd_f(p, exp_neg(vmul_f(vsub_f(vzero_f(), z), z)), vset1_f(1.0f));  /* erf(|x| / sqrt 2) */
    return vmul_f(vmul_f(vset1_f(0.5f), x), vadd_f(vset1_f(1.0f), vcopysign_f(e, x)));
}

int densebeam_i16_rows(void) { return MR; }
int densebeam_i16_cols(void) { return NR; }
int densebeam_i16_levels(int which) { return which ? I16_WLEV : I16_ALEV; }
int densebeam_i16_block(void) { return I16_KB; }

/* xq <- x rounded per row to integers in [-I16_ALEV, I16_ALEV], sx <- each row's scale (max |x| / levels,
 * 0 for a row of zeros). x: (rows, K) float32; xq: (rows, K) int16. */
int densebeam_i16_quantize(const float *x, int64_t rows, int64_t K, int16_t *xq, float *sx) {
    const int64_t kv = K - K % QW;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        int16_t *qr = xq + r * K;
        vf m = vzero_f();
        for (int64_t k = 0; k < kv; k += QW) m = vmax_f(m, vabs_f(vload_f(xr + k)));
        float mx = hmax_f(m);
        for (int64_t k = kv; k < K; k++) { float a = xr[k] < 0 ? -xr[k] : xr[k]; if (a > mx) mx = a; }
        if (!(mx > 0.0f)) {  /* zeros (or a NaN row: its outputs are not numbers either way) */
            memset(qr, 0, (size_t)K * sizeof(int16_t));
            sx[r] = mx == 0.0f ? 0.0f : mx;
            continue;
        }
        const float inv = (float)I16_ALEV / mx;
        sx[r] = mx / (float)I16_ALEV;
        const vf vinv = vset1_f(inv), hi = vset1_f((float)I16_ALEV), lo = vset1_f(-(float)I16_ALEV);
        for (int64_t k = 0; k < kv; k += QW)
            store16(qr + k, vmin_f(hi, vmax_f(lo, vround_f(vmul_f(vload_f(xr + k), vinv)))));
        for (int64_t k = kv; k < K; k++) {
            float v = __builtin_nearbyintf(xr[k] * inv);
            qr[k] = (int16_t)(v > I16_ALEV ? I16_ALEV : v < -I16_ALEV ? -I16_ALEV : v);
        }
    }
    return 0;
}

/* One tile: MR rows (a, stride K) times one packed panel of NR output columns (bp: (K / 2, NR, 2) int16:
 * for each pair of inputs, each column's two weights side by side), over inputs [k0, k1) (k0 a multiple
 * of I16_KB). The float32 sums of the blocks so far are in y (none when first); the last range scales them
 * and adds the bias. */
static inline __attribute__((always_inline)) void tile(const int16_t *a, int64_t K, const int16_t *bp,
                                                        int64_t k0, int64_t k1, int first, int last, int act,
                                                        const float *sx, const float *sw, const float *bias,
                                                        float *y, int64_t N) {
    vf f[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) f[r][v] = first ? vzero_f() : vload_f(y + r * N + v * IW);
    for (int64_t kb = k0; kb < k1; kb += I16_KB) {
        const int64_t ke = kb + I16_KB < k1 ? kb + I16_KB : k1;
        /* named accumulators: with an array GCC copies every sum to another register each step */
        vi c00 = vzero_i(), c01 = vzero_i(), c10 = vzero_i(), c11 = vzero_i();
        vi c20 = vzero_i(), c21 = vzero_i(), c30 = vzero_i(), c31 = vzero_i();
#if MR == 8
        vi c40 = vzero_i(), c41 = vzero_i(), c50 = vzero_i(), c51 = vzero_i();
        vi c60 = vzero_i(), c61 = vzero_i(), c70 = vzero_i(), c71 = vzero_i();
#endif
        for (int64_t k = kb; k < ke; k += 2) {
            const int16_t *b = bp + k * NR;
            const vi b0 = vload_i(b), b1 = vload_i(b + 2 * IW);
#define STEP(r) { const vi av = vbcast(a + r * K + k); c##r##0 = vdot(c##r##0, av, b0); c##r##1 = vdot(c##r##1, av, b1); }
            STEP(0) STEP(1) STEP(2) STEP(3)
#if MR == 8
            STEP(4) STEP(5) STEP(6) STEP(7)
#endif
#undef STEP
        }
#define ADD(r) { f[r][0] = vadd_f(f[r][0], vcvt(c##r##0)); f[r][1] = vadd_f(f[r][1], vcvt(c##r##1)); }
        ADD(0) ADD(1) ADD(2) ADD(3)
#if MR == 8
        ADD(4) ADD(5) ADD(6) ADD(7)
#endif
#undef ADD
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++) {
        const vf rs = vset1_f(sx[r]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            vf out = f[r][v];
            if (last) {
                out = vadd_f(vmul_f(vmul_f(out, rs), vload_f(sw + v * IW)), vload_f(bias + v * IW));
                if (act) out = gelu(out);
            }
            vstore_f(y + r * N + v * IW, out);
        }
    }
}

/* y (rows, N) float32 <- (xq * sx) (wp * sw)^T + bias. xq: (rows, K) int16 from densebeam_i16_quantize;
 * wp: the weights packed in panels of NR columns, (N / NR, K / 2, NR, 2) int16 (K even); sw, bias: (N,)
 * float32. rows a multiple of MR, N of NR; act 1: GELU (erf) applied to the result. The inputs are taken
 * KC at a time (a panel's share of the weights stays in L1); the float32 sums are added in the same order
 * whatever KC. */
int densebeam_i16_linear(const int16_t *xq, const float *sx, const int16_t *wp, const float *sw,
                         const float *bias, float *y, int64_t rows, int64_t N, int64_t K, int act) {
    if (rows % MR || N % NR || K % 2 || K <= 0) return 1;
    for (int64_t m0 = 0; m0 < rows; m0 += MC) {
        const int64_t m1 = m0 + MC < rows ? m0 + MC : rows;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t k1 = k0 + KC < K ? k0 + KC : K;
            for (int64_t j = 0; j < N / NR; j++) {
                const int16_t *bp = wp + j * K * NR;
                for (int64_t m = m0; m < m1; m += MR)
                    tile(xq + m * K, K, bp, k0, k1, k0 == 0, k1 == K, act, sx + m, sw + j * NR, bias + j * NR,
                         y + m * N + j * NR, N);
            }
        }
    }
    return 0;
}
