/* Weight-matrix × vector products shared by the C kernels: float32, bf16 and Q8_0 (int8 blocks of
 * 32, one float32 scale each) projections, rows split by the caller (OpenMP threads own row ranges).
 *
 * Every function here is a plain loop with SIMD paths chosen at compile time from the host's
 * -march=native flags (the kernel is built per CPU and cached under a hash of its flags);
 * the scalar loops are the fallback every path must agree with.  Which path each form compiled
 * to is in LOOPLM_PATH_* below (looplm_simd_paths() reports them).
 *
 * The reduced-precision forms round the input vector too, once per call, so every path computes
 * the same products and differs from the others only in the order float32 sums them:
 *   bf16:        y[r] = Σ_i bf16(W[r,i]) · bf16(x[i]), the products exact in float32;
 *                native: AVX512-BF16 vdpbf16ps; elsewhere both widened to float32 (a 16-bit shift).
 *   Q8_0 × Q8_0: x cut into blocks of 32 with d_b = max|x_b|/127, q = round(x/d_b) (as
 *                looplm.quant.quantize_q8_0 rounds weights); y[r] = Σ_b s[r,b]·d_b·Σ_i w[r,32b+i]·q[32b+i],
 *                the inner sums exact in int32; native: VNNI vpdpbusd (unsigned × signed bytes, so
 *                |w| is multiplied by q with w's sign), else AVX2 pmaddubsw, else scalar.
 *   Q8_0 (float input): the weights widened to float32 in registers (the dequantise reference's
 *                products in another order).
 *   ternary:     codes c ∈ {−1, 0, +1} in looplm's 2-bit layout (looplm.checkpoint.ternary: c + 1, four
 *                to a byte along K, lowest bits first) and one float32 scale s per matrix, against x
 *                quantised per token as looplm.model.bitlinear.quantize_activations does:
 *                f = 127 / max(max|x|, 1e-5) (as torch rounds it: 1/a, then ·127),
 *                q = clamp(round(f·x), −128, 127) (nearest even);
 *                y[r] = (Σ_i c[r,i]·q[i]) · (s / f), the inner sum exact in int32 (TernaryLinear's
 *                integer form; BitLinear's float form up to float32 rounding).  Each row's codes are
 *                unpacked through a 256-entry table into a stack row; native: AVX2 psignb (q·c for
 *                c ∈ {−1, 0, 1}) + pmaddubsw, else scalar. */
#ifndef LOOPLM_MATVEC_H
#define LOOPLM_MATVEC_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define LOOPLM_PATH_F32 "avx2"
#else
#define LOOPLM_PATH_F32 "scalar"
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LOOPLM_BF16_NATIVE 1
#define LOOPLM_PATH_BF16 "avx512_bf16"
#else
#define LOOPLM_PATH_BF16 LOOPLM_PATH_F32
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__)
#define LOOPLM_VNNI512 1
#define LOOPLM_PATH_Q8_INT8 "avx512_vnni"
#elif defined(__AVXVNNI__) && defined(__AVX2__) && defined(__FMA__)
#define LOOPLM_PATH_Q8_INT8 "avx_vnni"
#else
#define LOOPLM_PATH_Q8_INT8 LOOPLM_PATH_F32
#endif

/* A projection W [rows, cols] in one of four forms (the first non-NULL of ternary, bf16, values, weights):
 *   weights         float32;
 *   ternary, ternary_scale  ternary: 2-bit codes [rows, ceil(cols/4)] (looplm's layout) and W = codes·scale;
 *   bf16            bf16 (the upper 16 bits of float32, rounded to nearest even);
 *   values, scales  Q8_0: int8 [rows, cols] and float32 [rows, cols/32], W = scales·values; with
 *                   quantize_input the input is quantised to Q8_0 too (int8 × int8 dot products).
 * Fields left zero keep the float32 / float-input meaning, so zero-initialised structs stay valid. */
typedef struct {
    const float *weights;
    const int8_t *values;
    const float *scales;
    const uint16_t *bf16;
    int quantize_input;
    const uint8_t *ternary;
    float ternary_scale;
} Projection;

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y[r] = W[r, :] · x for rows [begin, end); four rows at a time share each load of x. */
static void matvec_rows(const float *W, const float *x, float *y, int cols, int begin, int end) {
    int r = begin;
#if defined(__AVX2__) && defined(__FMA__)
    for (; r + 4 <= end; r += 4) {
        const float *w0 = W + (size_t)r * cols, *w1 = w0 + cols, *w2 = w1 + cols, *w3 = w2 + cols;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= cols; i += 16) {  /* a cache line of each row, and the next four rows' same line */
            for (int k = 4; k < 8; k++) _mm_prefetch((const char *)(w0 + (size_t)k * cols + i), _MM_HINT_T0);
            for (int half = 0; half < 16; half += 8) {
                __m256 xv = _mm256_loadu_ps(x + i + half);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i + half), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i + half), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i + half), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i + half), xv, a3);
            }
        }
        for (; i + 8 <= cols; i += 8) {
            __m256 xv = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
        }
        float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; i < cols; i++) {
            s0 += w0[i] * x[i]; s1 += w1[i] * x[i]; s2 += w2[i] * x[i]; s3 += w3[i] * x[i];
        }
        y[r] = s0; y[r + 1] = s1; y[r + 2] = s2; y[r + 3] = s3;
    }
#endif
    for (; r < end; r++) y[r] = dot(W + (size_t)r * cols, x, cols);
}

/* Q8_0 rows (weight-only int8): the weights are widened to float32 in registers, so each output
 * is the reference dequantise-then-matmul's sum of the same products in another order.  At
 * batch 1 this reads a quarter of the bytes of a float32 matvec. */
#define BLOCK 32

#if defined(__AVX2__) && defined(__FMA__)
/* Eight int8 weights at w widened to float32. */
static inline __m256 widen(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

/* Σ_i w[i]·x[i] over one block of 32, as a vector of 8 partial sums. */
static inline __m256 block_dot(const int8_t *w, const float *x) {
    __m256 a = _mm256_mul_ps(widen(w), _mm256_loadu_ps(x));
    __m256 b = _mm256_mul_ps(widen(w + 8), _mm256_loadu_ps(x + 8));
    a = _mm256_fmadd_ps(widen(w + 16), _mm256_loadu_ps(x + 16), a);
    b = _mm256_fmadd_ps(widen(w + 24), _mm256_loadu_ps(x + 24), b);
    return _mm256_add_ps(a, b);
}
#endif

/* One output: row n of W (values w, scales s) against x, K = blocks · 32. */
static float row_dot(const int8_t *w, const float *s, const float *x, int blocks) {
    int b = 0;
    float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; b < blocks; b++)
        acc = _mm256_fmadd_ps(block_dot(w + b * BLOCK, x + b * BLOCK), _mm256_set1_ps(s[b]), acc);
    sum = hsum(acc);
#endif
    for (; b < blocks; b++) {
        float block = 0.0f;
        for (int i = 0; i < BLOCK; i++) block += (float)w[b * BLOCK + i] * x[b * BLOCK + i];
        sum += s[b] * block;
    }
    return sum;
}

/* Four rows n..n+3 against one x row, sharing every load of x. */
static void rows4_dot(const int8_t *w, const float *s, const float *x, int blocks, float *y) {
#if defined(__AVX2__) && defined(__FMA__)
    const size_t K = (size_t)blocks * BLOCK;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const float *xb = x + b * BLOCK;
        const int8_t *wb = w + b * BLOCK;
        if (!(b & 1))  /* the next four rows' line at this offset (two blocks a line), as bf16_rows_n */
            for (int k = 4; k < 8; k++) _mm_prefetch((const char *)(wb + k * K), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(block_dot(wb, xb), _mm256_set1_ps(s[b]), a0);
        a1 = _mm256_fmadd_ps(block_dot(wb + K, xb), _mm256_set1_ps(s[blocks + b]), a1);
        a2 = _mm256_fmadd_ps(block_dot(wb + 2 * K, xb), _mm256_set1_ps(s[2 * blocks + b]), a2);
        a3 = _mm256_fmadd_ps(block_dot(wb + 3 * K, xb), _mm256_set1_ps(s[3 * blocks + b]), a3);
    }
    y[0] = hsum(a0); y[1] = hsum(a1); y[2] = hsum(a2); y[3] = hsum(a3);
#else
    for (int r = 0; r < 4; r++)
        y[r] = row_dot(w + (size_t)r * blocks * BLOCK, s + (size_t)r * blocks, x, blocks);
#endif
}

/* ---- bf16 -------------------------------------------------------------------------------------- */

/* bf16 bits → float32: bf16 is the upper half of a float32. */
static inline float bf16_to_float(uint16_t bits) {
    uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, sizeof value);
    return value;
}

/* float32 → bf16 bits, rounded to nearest even (what torch's .to(torch.bfloat16) does); NaN stays NaN. */
static inline uint16_t float_to_bf16(float value) {
    uint32_t word;
    memcpy(&word, &value, sizeof word);
    if ((word & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((word >> 16) | 0x40);
    return (uint16_t)((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
}

/* out[i] = bf16(x[i]) for i < n.  (vcvtne2ps2bf16 flushes float32 denormals, |x| < 1.2e-38, to zero;
 * the scalar loop rounds them: no activation is that small but for noise.) */
static void round_to_bf16(const float *x, uint16_t *out, int n) {
    int i = 0;
#if defined(LOOPLM_BF16_NATIVE)
    for (; i + 32 <= n; i += 32)
        _mm512_storeu_si512((void *)(out + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16),
                                                                          _mm512_loadu_ps(x + i)));
#endif
    for (; i < n; i++) out[i] = float_to_bf16(x[i]);
}

#if defined(__AVX2__) && defined(__FMA__)
/* Eight bf16 values at p widened to float32. */
static inline __m256 widen_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* y[k] = Σ_i W[k, i]·xb[i] for the n (≤ 4) bf16 rows starting at W (row stride cols): the rows share
 * every load of the input.  Called with constant n, so the loops over k unroll. */
static inline void bf16_rows_n(const uint16_t *W, const uint16_t *xb, int cols, int n, float *y) {
    int i = 0;
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(LOOPLM_BF16_NATIVE)
    __m512 acc[4];
    for (int k = 0; k < n; k++) acc[k] = _mm512_setzero_ps();
    for (; i < cols; i += 32) {
        const __mmask32 live = cols - i >= 32 ? 0xffffffffu : (1u << (cols - i)) - 1u;
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(live, xb + i);
        for (int k = 0; k < n; k++) {
            /* The same line of the row n rows on (the next call's): a bf16 row is short (1.5 KB at
             * d 768), too short for the hardware prefetcher to ramp up on each one. */
            _mm_prefetch((const char *)(W + (size_t)(k + n) * cols + i), _MM_HINT_T0);
            acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)_mm512_maskz_loadu_epi16(live, W + (size_t)k * cols + i), xv);
        }
    }
    for (int k = 0; k < n; k++) sums[k] = _mm512_reduce_add_ps(acc[k]);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc[4];
    for (int k = 0; k < n; k++) acc[k] = _mm256_setzero_ps();
    for (; i + 8 <= cols; i += 8) {
        const __m256 xv = widen_bf16(xb + i);
        for (int k = 0; k < n; k++) acc[k] = _mm256_fmadd_ps(widen_bf16(W + (size_t)k * cols + i), xv, acc[k]);
    }
    for (int k = 0; k < n; k++) sums[k] = hsum(acc[k]);
#endif
    for (; i < cols; i++)
        for (int k = 0; k < n; k++) sums[k] += bf16_to_float(W[(size_t)k * cols + i]) * bf16_to_float(xb[i]);
    for (int k = 0; k < n; k++) y[k] = sums[k];
}

/* y[r] = W[r, :] · xb for rows [begin, end) of a bf16 W, four rows at a time. */
static void bf16_rows(const uint16_t *W, const uint16_t *xb, float *y, int cols, int begin, int end) {
    int r = begin;
    for (; r + 4 <= end; r += 4) bf16_rows_n(W + (size_t)r * cols, xb, cols, 4, y + r);
    for (; r < end; r++) bf16_rows_n(W + (size_t)r * cols, xb, cols, 1, y + r);
}

/* ---- Q8_0 × Q8_0 ----------------------------------------------------------------------------------- */

/* The input row x [cols] (cols a multiple of 32) as Q8_0: per block b, d[b] = max|x_b|/127 and
 * q = round(x/d[b]) to nearest even — float32 arithmetic step for step as quantize_q8_0's. */
static void quantize_q8(const float *x, int8_t *q, float *d, int cols) {
    for (int b = 0; b < cols / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        int8_t *qb = q + b * BLOCK;
        float top = 0.0f;
        for (int i = 0; i < BLOCK; i++) top = fmaxf(top, fabsf(xb[i]));
        const float scale = top / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        d[b] = scale;
#if defined(__AVX2__)
        const __m256 by = _mm256_set1_ps(inverse);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb), by));  /* MXCSR: nearest even */
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8), by));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 16), by));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 24), by));
        /* pack 32 → 16 → 8 bits; the packs interleave 128-bit lanes, the permutation restores order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qb, packed);
#else
        for (int i = 0; i < BLOCK; i++) {
            float rounded = nearbyintf(xb[i] * inverse);
            qb[i] = (int8_t)(rounded > 127.0f ? 127.0f : rounded < -127.0f ? -127.0f : rounded);
        }
#endif
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* Σ w[i]·q[i] over one block of 32 signed bytes, as eight int32 partial sums (exact):
 * the unsigned × signed byte products take |w| and q with w's sign. */
static inline __m256i block_dot_i8(const int8_t *w, const int8_t *q) {
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w), qv = _mm256_loadu_si256((const __m256i *)q);
    const __m256i magnitude = _mm256_sign_epi8(wv, wv), signed_q = _mm256_sign_epi8(qv, wv);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, signed_q);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), magnitude, signed_q);
#else
    /* pairs of products: |each| ≤ 127·127, a pair ≤ 32,258, inside int16 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_q), _mm256_set1_epi16(1));
#endif
}
#endif

#if defined(LOOPLM_VNNI512)
/* p[0], p[1] in the two lowest lanes (the others undefined). */
static inline __m512 pair_of(const float *p) {
    return _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
}
#endif

/* y[k] for the n (≤ 4) Q8_0 rows starting at w (row stride cols; scales s, row stride cols/32)
 * against the Q8_0 input (q, d); the rows share every load of the input. */
static inline void q8q8_rows_n(const int8_t *w, const float *s, const int8_t *q, const float *d, int cols, int n,
                               float *y) {
    const int blocks = cols / BLOCK;
    int b = 0;
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(LOOPLM_VNNI512)
    /* two blocks per 512-bit vector: int32 lanes 0–7 hold block b's partial sums, 8–15 block b+1's */
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4];
    for (int k = 0; k < n; k++) acc[k] = _mm512_setzero_ps();
    for (; b + 2 <= blocks; b += 2) {
        const __m512i qv = _mm512_loadu_si512((const void *)(q + b * BLOCK));
        const __m512 dv = _mm512_permutexvar_ps(pick, pair_of(d + b));
        for (int k = 0; k < n; k++) {
            _mm_prefetch((const char *)(w + (size_t)(k + n) * cols + b * BLOCK), _MM_HINT_T0);  /* as bf16_rows_n */
            const __m512i wv = _mm512_loadu_si512((const void *)(w + (size_t)k * cols + b * BLOCK));
            const __m512i signed_q = _mm512_mask_sub_epi8(qv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), qv);
            const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), signed_q);
            const __m512 sv = _mm512_permutexvar_ps(pick, pair_of(s + (size_t)k * blocks + b));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(sv, dv), acc[k]);
        }
    }
    for (int k = 0; k < n; k++) sums[k] = _mm512_reduce_add_ps(acc[k]);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    __m256 rest[4];
    for (int k = 0; k < n; k++) rest[k] = _mm256_setzero_ps();
    for (; b < blocks; b++)
        for (int k = 0; k < n; k++)
            rest[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_i8(w + (size_t)k * cols + b * BLOCK, q + b * BLOCK)),
                                      _mm256_set1_ps(s[(size_t)k * blocks + b] * d[b]), rest[k]);
    for (int k = 0; k < n; k++) sums[k] += hsum(rest[k]);
#endif
    for (; b < blocks; b++)
        for (int k = 0; k < n; k++) {
            const int8_t *wb = w + (size_t)k * cols + b * BLOCK, *qb = q + b * BLOCK;
            int32_t dot_i8 = 0;
            for (int i = 0; i < BLOCK; i++) dot_i8 += (int32_t)wb[i] * (int32_t)qb[i];
            sums[k] += (float)dot_i8 * (s[(size_t)k * blocks + b] * d[b]);
        }
    for (int k = 0; k < n; k++) y[k] = sums[k];
}

/* y[r] for rows [begin, end) of a Q8_0 W (values, scales) against the Q8_0 input (q, d). */
static void q8q8_rows(const int8_t *values, const float *scales, const int8_t *q, const float *d, float *y, int cols,
                      int begin, int end) {
    const int blocks = cols / BLOCK;
    int r = begin;
    for (; r + 4 <= end; r += 4)
        q8q8_rows_n(values + (size_t)r * cols, scales + (size_t)r * blocks, q, d, cols, 4, y + r);
    for (; r < end; r++) q8q8_rows_n(values + (size_t)r * cols, scales + (size_t)r * blocks, q, d, cols, 1, y + r);
}

/* ---- ternary ------------------------------------------------------------------------------------ */

#define TERNARY_SCALE_FLOOR 1e-5f   /* looplm.model.bitlinear.SCALE_FLOOR */
#define TERNARY_LEVELS 127.0f       /* looplm.model.bitlinear.ACTIVATION_LEVELS */

/* The input row as int8 levels q, per token as quantize_activations; returns the factor f (q ≈ f·x). */
static inline float quantize_ternary_input(const float *x, int8_t *q, int cols) {
    float top = 0.0f;
    for (int i = 0; i < cols; i++) top = fmaxf(top, fabsf(x[i]));
    /* torch computes 127 / a (a number over a tensor) as reciprocal(a) · 127: two roundings, kept */
    const float factor = (1.0f / fmaxf(top, TERNARY_SCALE_FLOOR)) * TERNARY_LEVELS;
    for (int i = 0; i < cols; i++) {
        float level = nearbyintf(x[i] * factor);
        q[i] = (int8_t)(level > 127.0f ? 127.0f : level < -128.0f ? -128.0f : level);
    }
    return factor;
}

/* Σ_i c[i]·q[i] over n codes c ∈ {−1, 0, 1} and int8 levels q (|q| ≤ 127: |x·f| ≤ 127 up to rounding),
 * exact in int32. */
static inline int32_t ternary_dot(const int8_t *c, const int8_t *q, int n) {
    int i = 0;
    int32_t sum = 0;
#if defined(__AVX2__)
    __m256i acc = _mm256_setzero_si256();
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (; i + 32 <= n; i += 32) {
        /* q·c in [−127, 127] as signed bytes; pairs summed against unsigned ones (within int16), then to int32 */
        const __m256i product = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(q + i)),
                                                 _mm256_loadu_si256((const __m256i *)(c + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, product), ones16));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    sum = _mm_cvtsi128_si32(s);
#endif
    for (; i < n; i++) sum += (int32_t)c[i] * (int32_t)q[i];
    return sum;
}

/* y[r] for rows [begin, end) of a ternary W (2-bit codes, scale) against x. */
static void ternary_rows(const uint8_t *packed, float scale, const float *x, float *y, int cols, int begin, int end) {
    static int8_t table[256][4];  /* byte → its four codes, lowest bits first */
    static volatile int table_ready = 0;
    if (!table_ready) {  /* idempotent: racing threads write the same values */
        for (int b = 0; b < 256; b++)
            for (int f = 0; f < 4; f++) table[b][f] = (int8_t)(((b >> (2 * f)) & 3) - 1);
        table_ready = 1;
    }
    const int width = (cols + 3) / 4;
    int8_t q[cols], codes[4 * width];
    const float factor = quantize_ternary_input(x, q, cols), step = scale / factor;
    for (int r = begin; r < end; r++) {
        const uint8_t *row = packed + (size_t)r * width;
        for (int j = 0; j < width; j++) memcpy(codes + 4 * j, table[row[j]], 4);
        y[r] = (float)ternary_dot(codes, q, cols) * step;
    }
}

/* ---- any projection ------------------------------------------------------------------------------ */

/* y[r] = W[r, :] · x for rows [begin, end) of a projection in any form.  The bf16 and Q8_0 × Q8_0
 * forms round or quantise x first, into this call's stack (a few KiB: cols values): every thread
 * of a row-split product does it for itself, which costs cols operations against its
 * (end − begin)·cols. */
static void project_rows(const Projection *p, const float *x, float *y, int cols, int begin, int end) {
    if (p->ternary) {
        ternary_rows(p->ternary, p->ternary_scale, x, y, cols, begin, end);
        return;
    }
    if (p->bf16) {
        uint16_t rounded[cols];
        round_to_bf16(x, rounded, cols);
        bf16_rows(p->bf16, rounded, y, cols, begin, end);
        return;
    }
    if (p->values && p->quantize_input) {
        int8_t q[cols];
        float d[cols / BLOCK];
        quantize_q8(x, q, d, cols);
        q8q8_rows(p->values, p->scales, q, d, y, cols, begin, end);
        return;
    }
    if (!p->values) {
        matvec_rows(p->weights, x, y, cols, begin, end);
        return;
    }
    const int blocks = cols / BLOCK;
    int r = begin;
    for (; r + 4 <= end; r += 4)
        rows4_dot(p->values + (size_t)r * cols, p->scales + (size_t)r * blocks, x, blocks, y + r);
    for (; r < end; r++) y[r] = row_dot(p->values + (size_t)r * cols, p->scales + (size_t)r * blocks, x, blocks);
}


/* ---- several input rows ------------------------------------------------------------------------- */

#if defined(__AVX512F__)
/* Y[r·ys + o] = W[o, :] · X[r·xs, :] for four weight rows (w, w + cols, ...) and four input rows:
 * sixteen running sums in registers, so each load of a weight or an input vector feeds four
 * products (a plain matvec feeds one). */
static inline void f32_4x4(const float *w, int cols, const float *x, int xs, float *y, int ys) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    const float *w1 = w + cols, *w2 = w1 + cols, *w3 = w2 + cols;
    const float *x1 = x + xs, *x2 = x1 + xs, *x3 = x2 + xs;
    for (int i = 0; i < cols; i += 16) {
        const __mmask16 m = cols - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - i)) - 1);
        __m512 v0 = _mm512_maskz_loadu_ps(m, w + i), v1 = _mm512_maskz_loadu_ps(m, w1 + i);
        __m512 v2 = _mm512_maskz_loadu_ps(m, w2 + i), v3 = _mm512_maskz_loadu_ps(m, w3 + i);
        __m512 u = _mm512_maskz_loadu_ps(m, x + i);
        a00 = _mm512_fmadd_ps(v0, u, a00); a10 = _mm512_fmadd_ps(v1, u, a10);
        a20 = _mm512_fmadd_ps(v2, u, a20); a30 = _mm512_fmadd_ps(v3, u, a30);
        u = _mm512_maskz_loadu_ps(m, x1 + i);
        a01 = _mm512_fmadd_ps(v0, u, a01); a11 = _mm512_fmadd_ps(v1, u, a11);
        a21 = _mm512_fmadd_ps(v2, u, a21); a31 = _mm512_fmadd_ps(v3, u, a31);
        u = _mm512_maskz_loadu_ps(m, x2 + i);
        a02 = _mm512_fmadd_ps(v0, u, a02); a12 = _mm512_fmadd_ps(v1, u, a12);
        a22 = _mm512_fmadd_ps(v2, u, a22); a32 = _mm512_fmadd_ps(v3, u, a32);
        u = _mm512_maskz_loadu_ps(m, x3 + i);
        a03 = _mm512_fmadd_ps(v0, u, a03); a13 = _mm512_fmadd_ps(v1, u, a13);
        a23 = _mm512_fmadd_ps(v2, u, a23); a33 = _mm512_fmadd_ps(v3, u, a33);
    }
    y[0] = _mm512_reduce_add_ps(a00); y[1] = _mm512_reduce_add_ps(a10);
    y[2] = _mm512_reduce_add_ps(a20); y[3] = _mm512_reduce_add_ps(a30);
    y += ys;
    y[0] = _mm512_reduce_add_ps(a01); y[1] = _mm512_reduce_add_ps(a11);
    y[2] = _mm512_reduce_add_ps(a21); y[3] = _mm512_reduce_add_ps(a31);
    y += ys;
    y[0] = _mm512_reduce_add_ps(a02); y[1] = _mm512_reduce_add_ps(a12);
    y[2] = _mm512_reduce_add_ps(a22); y[3] = _mm512_reduce_add_ps(a32);
    y += ys;
    y[0] = _mm512_reduce_add_ps(a03); y[1] = _mm512_reduce_add_ps(a13);
    y[2] = _mm512_reduce_add_ps(a23); y[3] = _mm512_reduce_add_ps(a33);
}
#endif

/* Y[r, o] = W[o, :] · X[r, :] for output rows o in [begin, end) of a projection in any form and R
 * input rows (X: rows xs floats apart, Y: ys).  The outputs go in blocks of 16 weight rows, and
 * every input row meets a block while it sits in cache, so the weights are read from memory once
 * for all R rows.  Float32 weights take four weight rows × four input rows at a time where the
 * CPU has AVX-512; every other case runs ``project_rows`` per input row on the block. */
static void project_batch(const Projection *p, const float *X, int R, int xs, float *Y, int ys, int cols,
                          int begin, int end) {
    if (R == 1) {  /* one row: the matvec over the whole range (its input rounded or quantised once) */
        project_rows(p, X, Y, cols, begin, end);
        return;
    }
    const int plain = p->weights && !p->values && !p->bf16 && !p->ternary;
    for (int block = begin; block < end; block += 16) {
        const int stop = block + 16 < end ? block + 16 : end;
        int r = 0;
#if defined(__AVX512F__)
        if (plain && stop - block == 16) {
            for (; r + 4 <= R; r += 4)
                for (int o = block; o < stop; o += 4)
                    f32_4x4(p->weights + (size_t)o * cols, cols, X + (size_t)r * xs, xs, Y + (size_t)r * ys + o, ys);
        }
#else
        (void)plain;
#endif
        for (; r < R; r++) project_rows(p, X + (size_t)r * xs, Y + (size_t)r * ys, cols, block, stop);
    }
}

/* The index of y's first largest value of n, NaNs passed over (torch.argmax's pick for finite values;
 * a NaN first value gives 0, as the scalar loop `if (y[i] > y[top]) top = i` does).  AVX-512: the
 * largest value by ordered comparisons (false for NaN), then the first index holding it. */
static inline int vector_argmax(const float *y, int n) {
#if defined(__AVX512F__)
    if (n >= 32 && y[0] == y[0]) {
        __m512 best = _mm512_set1_ps(y[0]);
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(y + i);
            best = _mm512_mask_mov_ps(best, _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ), v);
        }
        const __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        if (tail) {
            const __m512 v = _mm512_maskz_loadu_ps(tail, y + i);
            best = _mm512_mask_mov_ps(best, _mm512_mask_cmp_ps_mask(tail, v, best, _CMP_GT_OQ), v);
        }
        const float top = _mm512_reduce_max_ps(best);  /* no NaN among the lanes */
        const __m512 wanted = _mm512_set1_ps(top);
        for (i = 0; i + 16 <= n; i += 16) {
            const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i), wanted, _CMP_EQ_OQ);
            if (hit) return i + __builtin_ctz(hit);
        }
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, y + i), wanted, _CMP_EQ_OQ);
        return i + __builtin_ctz(hit);  /* top is one of y's values */
    }
#endif
    int top = 0;
    for (int i = 1; i < n; i++)
        if (y[i] > y[top]) top = i;
    return top;
}

#if defined(__AVX512F__)
/* g (1 to 4, a constant where it is called) rows r.. of panel_rows' work on one panel chunk
 * [k0, k1): 4·g registers of sums, loaded from Y after the first chunk.  Every output's sum takes
 * its products in the order of k whatever g is, so the part-filled last group of a batch computes
 * the same values as a full one. */
static inline __attribute__((always_inline)) void panel_group(const float *panel, const __mmask16 m[4],
                                                              const float *X, int cols, int r, int g, int k0,
                                                              int k1, float *Y, int N, int o) {
    __m512 acc[4][4];
    const float *x[4];
    for (int rr = 0; rr < g; rr++) {
        x[rr] = X + (size_t)(r + rr) * cols;
        for (int j = 0; j < 4; j++)
            acc[rr][j] = k0 ? _mm512_maskz_loadu_ps(m[j], Y + (size_t)(r + rr) * N + o + 16 * j) : _mm512_setzero_ps();
    }
    for (int k = k0; k < k1; k++) {
        const float *w = panel + (size_t)k * 64;
        const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
        const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
        for (int rr = 0; rr < g; rr++) {
            const __m512 b = _mm512_set1_ps(x[rr][k]);
            acc[rr][0] = _mm512_fmadd_ps(w0, b, acc[rr][0]); acc[rr][1] = _mm512_fmadd_ps(w1, b, acc[rr][1]);
            acc[rr][2] = _mm512_fmadd_ps(w2, b, acc[rr][2]); acc[rr][3] = _mm512_fmadd_ps(w3, b, acc[rr][3]);
        }
    }
    for (int rr = 0; rr < g; rr++)
        for (int j = 0; j < 4; j++)
            _mm512_mask_storeu_ps(Y + (size_t)(r + rr) * N + o + 16 * j, m[j], acc[rr][j]);
}

/* Y[r, o] = Σ_k W[o, k] · X[r, k] for outputs o in [begin, end) (begin a multiple of 64) and all R
 * rows, from W packed in panels of 64 outputs: panel b is [cols, 64], P[(b·cols + k)·64 + j] =
 * W[64·b + j, k] (zero past the last output).  Four rows × 64 outputs at a time in sixteen
 * registers (the last one to three rows in a group of their own size), each a broadcast input times a
 * vector of weights read in order from one panel, so no horizontal sums (the LM head of a batch of
 * rows: its vocabulary is wide, its inputs short). */
static void panel_rows(const float *P, int N, int cols, const float *X, int R, float *Y, int begin, int end) {
    const int chunk = 128;  /* rows of a panel (32 KB) that stay in L1 while every group of rows passes */
    for (int o = begin; o < end; o += 64) {
        const int width = end - o < 64 ? end - o : 64;
        const float *panel = P + (size_t)(o / 64) * cols * 64;
        __mmask16 m[4];
        for (int j = 0; j < 4; j++) {
            const int lanes = width - 16 * j;
            m[j] = lanes >= 16 ? (__mmask16)0xFFFF : lanes <= 0 ? (__mmask16)0 : (__mmask16)((1u << lanes) - 1);
        }
        for (int k0 = 0; k0 < cols; k0 += chunk) {
            const int k1 = k0 + chunk < cols ? k0 + chunk : cols;
            int r = 0;
            for (; r + 4 <= R; r += 4) panel_group(panel, m, X, cols, r, 4, k0, k1, Y, N, o);
            switch (R - r) {  /* the last one to three rows: a group of their own size, no idle lanes */
            case 3: panel_group(panel, m, X, cols, r, 3, k0, k1, Y, N, o); break;
            case 2: panel_group(panel, m, X, cols, r, 2, k0, k1, Y, N, o); break;
            case 1: panel_group(panel, m, X, cols, r, 1, k0, k1, Y, N, o); break;
            }
        }
    }
}
#endif

#endif /* LOOPLM_MATVEC_H */
