/* Weight-only Q8_0 matmul for small batches (batch-1 decode): y = x Wᵀ with W held as int8.
 *
 * W [N, K] is stored as blocks of 32 along K: values int8 [N, K] and one float32 scale per
 * block, scales [N, K/32], so W[n, k] = scales[n, k/32] · values[n, k] (looplm/quant.py).
 * The weights are widened to float32 in registers and never written back: each output is
 *     y[m, n] = Σ_b scales[n, b] · Σ_{i<32} values[n, 32b + i] · x[m, 32b + i]
 * i.e. the reference dequantise-then-matmul with the same products, summed in another order.
 *
 * Why: at batch 1 a projection is a matrix-vector product whose cost is reading W; int8 reads
 * a quarter of the float32 bytes.  Rows are split over OpenMP threads in groups of four that
 * share each load of x; every x row is processed against a group before moving on, so the
 * group's int8 rows stay in L1 while M > 1.
 */
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define BLOCK 32

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* y [M, N] = x [M, K] · Wᵀ (+ bias [N] when not NULL); K must be a multiple of 32. */
void looplm_q8_matmul(const int8_t *values, const float *scales, const float *bias, const float *x, float *y,
                      int M, int N, int K, int threads) {
    const int blocks = K / BLOCK, groups = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < groups; g++) {
        const int n = 4 * g;
        const int8_t *w = values + (size_t)n * K;
        const float *s = scales + (size_t)n * blocks;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            float *ym = y + (size_t)m * N + n;
            if (n + 4 <= N) {
                rows4_dot(w, s, xm, blocks, ym);
            } else {
                for (int r = 0; n + r < N; r++) ym[r] = row_dot(w + (size_t)r * K, s + (size_t)r * blocks, xm, blocks);
            }
            if (bias)
                for (int r = 0; r < 4 && n + r < N; r++) ym[r] += bias[n + r];
        }
    }
}
