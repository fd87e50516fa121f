/* Row passes of a training step on a CPU: the loss's softmax cross-entropy and its gradient, and
 * RMSNorm forward and backward.
 *
 * looplm.training.fused_ce computes the head's logits a chunk of rows at a time with torch's
 * matmul; the softmax functions here do everything else to a chunk in one pass over each row (a
 * row of a 4,096-word vocabulary is 16 KB: it stays in the core's cache between its max, its
 * exponentials and its scaling).  The RMSNorm functions do a norm's forward (sum of squares,
 * scale, weight) and backward (the projection, the input's gradient, the weight's partial sums)
 * in one pass per row where torch takes six to eight passes over the activations.
 * The torch versions of the same math are in looplm/kernels/ops.py (the *_reference functions);
 * tests/test_train_kernel.py holds each pair equal.
 *
 * Why C: the torch versions make a separate read and write of the whole buffer per operation
 * (for the loss: widen bf16 logits to float32, max, subtract, exp, sum, divide; in backward
 * multiply, scatter, round to bf16) — up to 128 MB each at the reference shape; under bf16
 * autocast these passes cost more than the head's matmuls.
 *
 * Layouts: row-major, contiguous.  logits [rows, V] float32 or bf16 (`bf16` = 1); probs [rows, V]
 * float32 (may be the float32 logits themselves); targets [rows] int64; losses [rows] float32;
 * the gradient out [rows, V] float32 or bf16 (rounded to nearest even as torch rounds; a NaN
 * stays a NaN).  RMSNorm: x, normed [rows, D] float32, its output and incoming gradient float32
 * or bf16, inverse_rms [rows], weight [D].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "matvec.h"
#include "vexp.h"

#if defined(__AVX2__)
/* Eight floats rounded to bf16 (nearest even, as float_to_bf16) and stored; a NaN stays a NaN. */
static inline void store_bf16_8(uint16_t *out, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)),
                                             _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08)));
}
#endif

/* row[j] = bf16 logits[j] widened to float32. */
static void widen_row(const uint16_t *logits, float *row, long n) {
    long j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(row + j, widen_bf16(logits + j));
#endif
    for (; j < n; j++) row[j] = bf16_to_float(logits[j]);
}

static float row_max(const float *x, long n) {
    long j = 0;
    float top = -INFINITY;
#if defined(__AVX512F__)
    __m512 best = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(x + j));
    top = _mm512_reduce_max_ps(best);
#endif
    for (; j < n; j++) top = x[j] > top ? x[j] : top;
    return top;
}

static void scale_row(float *x, long n, float factor) {
    long j = 0;
#if defined(__AVX512F__)
    __m512 f = _mm512_set1_ps(factor);
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(x + j, _mm512_mul_ps(_mm512_loadu_ps(x + j), f));
#endif
    for (; j < n; j++) x[j] *= factor;
}

/* probs[i] = softmax(logits[i]); losses[i] = log Σ_j exp(l_ij − m_i) + m_i − l_i,targets[i].
 * Returns how many targets lie outside [0, vocab) (their rows are left untouched; the caller
 * raises). */
long looplm_softmax_xent(const void *logits, int bf16, const int64_t *targets, float *probs, float *losses,
                         long rows, long vocab, int threads) {
    long bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad)
    for (long i = 0; i < rows; i++) {
        int64_t target = targets[i];
        if (target < 0 || target >= vocab) {
            bad++;
            continue;
        }
        float *p = probs + i * vocab;
        const float *row;
        if (bf16) {
            widen_row((const uint16_t *)logits + i * vocab, p, vocab);
            row = p;
        } else {
            row = (const float *)logits + i * vocab;
        }
        float top = row_max(row, vocab), chosen = row[target];
        float total = exp_row(row, p, vocab, top);
        scale_row(p, vocab, 1.0f / total);
        losses[i] = (logf(total) + top) - chosen;
    }
    return bad;
}

/* out[i, j] = probs[i, j]·grad[i], minus grad[i] at j = targets[i] (that product first rounded
 * to float32, as torch's multiply-then-scatter-add rounds it); float32, or rounded to bf16. */
void looplm_softmax_xent_grad(const float *probs, const float *grad, const int64_t *targets, void *out, int bf16,
                              long rows, long vocab, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const float *p = probs + i * vocab;
        const float g = grad[i];
        const long target = (long)targets[i];
        const float product = p[target] * g;  /* two statements: no compiler fuses them into one FMA */
        const float at_target = product + (-g);
        long j = 0;
        if (bf16) {
            uint16_t *o = (uint16_t *)out + i * vocab;
#if defined(__AVX2__)
            const __m256 scale = _mm256_set1_ps(g);
            for (; j + 8 <= vocab; j += 8) store_bf16_8(o + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), scale));
#endif
            for (; j < vocab; j++) o[j] = float_to_bf16(p[j] * g);
            o[target] = float_to_bf16(at_target);
        } else {
            float *o = (float *)out + i * vocab;
#if defined(__AVX512F__)
            const __m512 scale = _mm512_set1_ps(g);
            for (; j + 16 <= vocab; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(p + j), scale));
#endif
            for (; j < vocab; j++) o[j] = p[j] * g;
            o[target] = at_target;
        }
    }
}

/* RMSNorm of rows: inverse_rms[i] = 1/sqrt(mean_j x_ij² + eps), normed = x·inverse_rms (kept for
 * backward), out = normed·weight: float32, or rounded to bf16 (`out_bf16`, for a bf16 matmul next:
 * the value autocast's cast of the float32 output would give). */
void looplm_rms_norm_rows(const float *x, const float *weight, float eps, float *normed, float *inverse_rms,
                          void *out, int out_bf16, long rows, long dim, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * dim;
        float *ni = normed + i * dim;
        const float inverse = 1.0f / sqrtf(dot(xi, xi, (int)dim) / (float)dim + eps);
        inverse_rms[i] = inverse;
        for (long j = 0; j < dim; j++) ni[j] = xi[j] * inverse;
        if (out_bf16) {
            uint16_t *oi = (uint16_t *)out + i * dim;
            long j = 0;
#if defined(__AVX2__)
            for (; j + 8 <= dim; j += 8)
                store_bf16_8(oi + j, _mm256_mul_ps(_mm256_loadu_ps(ni + j), _mm256_loadu_ps(weight + j)));
#endif
            for (; j < dim; j++) oi[j] = float_to_bf16(ni[j] * weight[j]);
        } else {
            float *oi = (float *)out + i * dim;
            for (long j = 0; j < dim; j++) oi[j] = ni[j] * weight[j];
        }
    }
}

/* RMSNorm's backward for rows: with gn = grad·weight, grad_x = (gn − normed·mean_j(gn·normed))·
 * inverse_rms; grad_weight = Σ_rows grad·normed (when grad_weight is not NULL; summed per thread,
 * then over threads). */
void looplm_rms_norm_grad_rows(const void *grad, int grad_bf16, const float *normed, const float *inverse_rms,
                               const float *weight, float *grad_x, float *grad_weight, long rows, long dim,
                               int threads) {
    float *partial = grad_weight ? calloc((size_t)threads * (size_t)dim, sizeof(float)) : NULL;
    if (grad_weight && !partial) {  /* no room for per-thread sums: one thread sums into grad_weight */
        threads = 1;
        memset(grad_weight, 0, (size_t)dim * sizeof(float));
    }
#pragma omp parallel num_threads(threads)
    {
        float *mine = partial ? partial + (long)omp_get_thread_num() * dim : grad_weight;
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const float *ni = normed + i * dim;
            float *xi = grad_x + i * dim;
            const float *gi;
            if (grad_bf16) {  /* the incoming gradient widened into grad_x's row, then read from there */
                widen_row((const uint16_t *)grad + i * dim, xi, dim);
                gi = xi;
            } else {
                gi = (const float *)grad + i * dim;
            }
            if (mine)
                for (long j = 0; j < dim; j++) mine[j] += gi[j] * ni[j];
            float projection = 0.0f;
            for (long j = 0; j < dim; j++) {
                xi[j] = gi[j] * weight[j];  /* gn, replaced below */
                projection += xi[j] * ni[j];
            }
            projection /= (float)dim;
            const float inverse = inverse_rms[i];
            for (long j = 0; j < dim; j++) xi[j] = (xi[j] - ni[j] * projection) * inverse;
        }
    }
    if (partial) {
        for (long j = 0; j < dim; j++) {
            float total = 0.0f;
            for (int t = 0; t < threads; t++) total += partial[(long)t * dim + j];
            grad_weight[j] = total;
        }
        free(partial);
    }
}

/* One value of a row, float32 or bf16 (widened; stored rounded to nearest even). */
static inline float load_one(const void *row, int bf16, long j) {
    return bf16 ? bf16_to_float(((const uint16_t *)row)[j]) : ((const float *)row)[j];
}

static inline void store_one(void *row, int bf16, long j, float value) {
    if (bf16) ((uint16_t *)row)[j] = float_to_bf16(value);
    else ((float *)row)[j] = value;
}

#if defined(__AVX512F__) && defined(__AVX2__)
static inline __m512 load16(const void *row, int bf16, long j) {
    if (!bf16) return _mm512_loadu_ps((const float *)row + j);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + j)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

static inline void store16(void *row, int bf16, long j, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps((float *)row + j, v);
        return;
    }
    store_bf16_8((uint16_t *)row + j, _mm512_castps512_ps256(v));
    store_bf16_8((uint16_t *)row + j + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#endif

/* SwiGLU's product for rows of gate_up [rows, 2·hidden] (the gate's half first): out [rows, hidden]
 * = silu(gate)·up, in float32 from the inputs (bf16 widened), then stored in their dtype (bf16
 * rounded once, where torch rounds silu's output and the product each). */
void looplm_swiglu_rows(const void *gate_up, void *out, int bf16, long rows, long hidden, int threads) {
    const size_t width = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const char *gate = (const char *)gate_up + (size_t)i * 2 * hidden * width;
        const char *up = gate + (size_t)hidden * width;
        char *o = (char *)out + (size_t)i * hidden * width;
        long j = 0;
#if defined(__AVX512F__) && defined(__AVX2__)
        for (; j + 16 <= hidden; j += 16) {
            __m512 g = load16(gate, bf16, j);
            store16(o, bf16, j, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), load16(up, bf16, j)));
        }
#endif
        for (; j < hidden; j++) {
            float g = load_one(gate, bf16, j);
            store_one(o, bf16, j, g / (1.0f + expf(-g)) * load_one(up, bf16, j));
        }
    }
}

/* Its backward: with s = σ(gate), d_gate = grad·up·s·(1 + gate·(1 − s)) and d_up = grad·gate·s,
 * into grad_gate_up [rows, 2·hidden] (the gate's half first), float32 math, stored in the dtype. */
void looplm_swiglu_grad_rows(const void *gate_up, const void *grad, void *grad_gate_up, int bf16, long rows,
                             long hidden, int threads) {
    const size_t width = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < rows; i++) {
        const char *gate = (const char *)gate_up + (size_t)i * 2 * hidden * width;
        const char *up = gate + (size_t)hidden * width;
        const char *g_out = (const char *)grad + (size_t)i * hidden * width;
        char *d_gate = (char *)grad_gate_up + (size_t)i * 2 * hidden * width;
        char *d_up = d_gate + (size_t)hidden * width;
        long j = 0;
#if defined(__AVX512F__) && defined(__AVX2__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; j + 16 <= hidden; j += 16) {
            __m512 g = load16(gate, bf16, j), u = load16(up, bf16, j), d = load16(g_out, bf16, j);
            __m512 s = sigmoid16(g);
            __m512 gs = _mm512_mul_ps(g, s);
            store16(d_up, bf16, j, _mm512_mul_ps(d, gs));
            __m512 slope = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_sub_ps(g, gs)));  /* s·(1 + g − g·s) */
            store16(d_gate, bf16, j, _mm512_mul_ps(_mm512_mul_ps(d, u), slope));
        }
#endif
        for (; j < hidden; j++) {
            float g = load_one(gate, bf16, j), u = load_one(up, bf16, j), d = load_one(g_out, bf16, j);
            float s = 1.0f / (1.0f + expf(-g));
            store_one(d_up, bf16, j, d * (g * s));
            store_one(d_gate, bf16, j, (d * u) * (s * (1.0f + (g - g * s))));
        }
    }
}

/* Rotate-half RoPE of x [B, H, L, hd] (element strides sb, sh, sl; the last dimension contiguous)
 * into out [B, H, L, hd] (strides ob, oh, ol): the first `rotary` dims of each head vector at
 * position l are rotated by the tables' row l (cos, sin [L, rotary], float32), the rest copied;
 * sign −1 rotates the other way (the backward pass: the transpose of a rotation is its inverse).
 * x and out float32, or bf16 (read widened, written rounded once). */
void looplm_rope(const void *x, long sb, long sh, long sl, void *out, long ob, long oh, long ol, long batch, long heads,
                 long length, long head_dim, long rotary, const float *cos, const float *sin, float sign, int bf16,
                 int threads) {
    const long half = rotary / 2;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (long b = 0; b < batch; b++) {
        for (long h = 0; h < heads; h++) {
            for (long l = 0; l < length; l++) {
                const long in = b * sb + h * sh + l * sl, to = b * ob + h * oh + l * ol;
                const float *c = cos + l * rotary, *s = sin + l * rotary;
                for (long j = 0; j < half; j++) {
                    const float a = load_one(x, bf16, in + j), z = load_one(x, bf16, in + j + half);
                    store_one(out, bf16, to + j, a * c[j] - sign * z * s[j]);
                    store_one(out, bf16, to + j + half, z * c[j + half] + sign * a * s[j + half]);
                }
                for (long j = rotary; j < head_dim; j++) store_one(out, bf16, to + j, load_one(x, bf16, in + j));
            }
        }
    }
}
