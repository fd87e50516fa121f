/* Weight-matrix × vector products shared by the C kernels: float32 and Q8_0 (int8 blocks of 32,
 * one float32 scale each) projections, rows split by the caller (OpenMP threads own row ranges).
 *
 * Every function here is a plain loop with SIMD paths chosen at compile time from the host's
 * -march=native flags (the kernel is built per CPU and cached under a hash of its flags);
 * the scalar loops are the fallback every path must agree with. */
#ifndef LOOPLM_MATVEC_H
#define LOOPLM_MATVEC_H

#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* A projection: float32 weights, or (when `values` is not NULL) Q8_0 int8 values and scales. */
typedef struct {
    const float *weights;
    const int8_t *values;
    const float *scales;
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

/* y[r] = W[r, :] · x for rows [begin, end) of a float32 or Q8_0 projection. */
static void project_rows(const Projection *p, const float *x, float *y, int cols, int begin, int end) {
    if (!p->values) {
        matvec_rows(p->weights, x, y, cols, begin, end);
        return;
    }
    const int blocks = cols / BLOCK;
    int r = begin;
    for (; r + 4 <= end; r += 4) rows4_dot(p->values + (size_t)r * cols, p->scales + (size_t)r * blocks, x, blocks, y + r);
    for (; r < end; r++) y[r] = row_dot(p->values + (size_t)r * cols, p->scales + (size_t)r * blocks, x, blocks);
}


#endif /* LOOPLM_MATVEC_H */
