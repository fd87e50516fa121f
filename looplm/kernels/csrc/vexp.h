/* The exponential of eight (AVX2 + FMA) or sixteen (AVX-512) floats at once, shared by the C
 * kernels (the decode kernel's softmax and SwiGLU, the training loss's softmax and SwiGLU), the
 * sigmoid built on it, and exp_row, a row's shifted exponentials and their sum with its scalar
 * fallback. */
#ifndef LOOPLM_VEXP_H
#define LOOPLM_VEXP_H
#include <math.h>
#include "matvec.h"  /* hsum */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* exp(x): x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact product), exp(r) by its
 * degree-6 minimax polynomial (the classic Cephes expf coefficients: 1 + r + r²·P(r)), times 2^n
 * built in the exponent bits.  Relative error about 1e-7 (the scalar expf's order); inputs are
 * clamped to [−87.3, 88.7], so the result never overflows or turns denormal.  The one method is
 * written for two vector widths with the constants below. */
#define VEXP_LO (-87.3f)
#define VEXP_HI 88.7f
#define VEXP_LOG2E 1.44269504088896341f
#define VEXP_LN2_HI 0.693359375f
#define VEXP_LN2_LO (-2.12194440e-4f)
static const float VEXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(VEXP_LO)), _mm256_set1_ps(VEXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(VEXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(VEXP_LN2_LO), _mm256_fnmadd_ps(n, _mm256_set1_ps(VEXP_LN2_HI), x));
    __m256 p = _mm256_set1_ps(VEXP_P[0]);
    for (int k = 1; k < 6; k++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(VEXP_P[k]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* σ(x) = 1 / (1 + exp(−x)) of eight floats (SwiGLU's gate). */
static inline __m256 sigmoid8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}
#endif

#if defined(__AVX512F__)
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(VEXP_LO)), _mm512_set1_ps(VEXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(VEXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(VEXP_LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(VEXP_LN2_HI), x));
    __m512 p = _mm512_set1_ps(VEXP_P[0]);
    for (int k = 1; k < 6; k++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(VEXP_P[k]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}

/* sigmoid8 on sixteen floats. */
static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
#endif

/* out[j] = exp(x[j] − top); returns their sum.  out may be x. */
static inline float exp_row(const float *x, float *out, long n, float top) {
    long j = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), shift = _mm512_set1_ps(top);
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), shift));
        _mm512_storeu_ps(out + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps(), shift = _mm256_set1_ps(top);
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift));
        _mm256_storeu_ps(out + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    total = hsum(acc);
#endif
    for (; j < n; j++) {
        out[j] = expf(x[j] - top);
        total += out[j];
    }
    return total;
}
#endif
