/* Decode kernel for looplm's standard layer (MHA/GQA + RoPE, SwiGLU, pre or sandwich RMSNorm):
 * one call runs a run of layers on the hidden states of one or more rows, in place.  The layers
 * are written once, in looplm_rows_layers (rows of a batched cache, each at its own loop step,
 * position and cache row); looplm_layers is that function for one row.
 *
 * It is a fast path beside two torch implementations of the same math (the model's own modules
 * and looplm/fast_decode.py); tests/test_native_decode.py (one row) and tests/test_native_rows.py
 * (rows) hold them equal.
 *
 * Why C: at batch 1 every projection is a matrix-vector product, and a layer is ~20 small
 * tensor ops whose per-op dispatch costs more than their arithmetic.  Here a layer is one pass
 * over its weights, inside one OpenMP parallel region per call: each thread owns a range of
 * output rows of every projection (each weight block read once for all rows) and a share of the
 * (row, head) attention tasks; the short vector steps in between (norms, residuals, RoPE, the
 * cache writes) are split over rows between barriers.
 *
 * Layouts (float32 unless said, row-major, as torch stores them):
 *   weights  qkv [(H + 2·Hkv)·hd, D], out [D, H·hd], gate_up [2F, D], down [D, F]; a projection
 *            may instead be int8 Q8_0 (looplm/quant.py): values int8 [rows, cols] and one float32
 *            scale per 32 inputs, scales [rows, cols/32], W[r, c] = scales[r, c/32]·values[r, c]
 *            (optionally multiplied by the input quantised to Q8_0), or bf16 [rows, cols] (matvec.h)
 *   cache    keys, values of one slot: [B, Hkv, max_len, hd]; a token's K/V go to its cache row's
 *            position `pos`
 *   rope     cos, sin: the tables [max_len, hd] (rotate-half layout); a token reads row `pos`
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "exit_rule.h"
#include "matvec.h"
#include "vexp.h"

typedef struct {
    int d_model, n_heads, n_kv_heads, head_dim, hidden, max_len;
    float eps;
} Dims;


typedef struct {
    const float *attn_norm, *attn_post_norm, *ffn_norm, *ffn_post_norm; /* post norms: NULL = pre-norm */
    Projection qkv, out, gate_up, down;
    float *keys, *values;
} Layer;

long looplm_rows_scratch_floats(const Dims *dims, int rows, int threads);

#define MOST_THREADS 64  /* looplm_layers' scratch holds a score row for up to this many threads */

/* Scratch floats needed by looplm_layers for these dims (one row; a score row per thread). */
long looplm_scratch_floats(const Dims *dims) {
    return looplm_rows_scratch_floats(dims, 1, MOST_THREADS);
}

/* gate[i] = silu(gate[i]) · up[i] for i in [begin, end). */
static void swiglu(float *gate, const float *up, int begin, int end) {
    int i = begin;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 8 <= end; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < end; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* This thread's share [begin, end) of n items, in blocks of `align` so row quads stay whole. */
static void share(int n, int align, int *begin, int *end) {
    int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    int blocks = (n + align - 1) / align;
    int lo = (int)((long)blocks * thread / threads), hi = (int)((long)blocks * (thread + 1) / threads);
    *begin = lo * align < n ? lo * align : n;
    *end = hi * align < n ? hi * align : n;
}

/* out = x / sqrt(mean(x²) + eps) · w  (w NULL: no weight).  out may alias x. */
static void rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w ? x[i] * scale * w[i] : x[i] * scale;
}

/* Rotate-half RoPE of one head vector in place. */
static void rope(float *v, const float *cos, const float *sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* h += post(update) where post is the sandwich norm (or nothing for pre-norm). */
static void residual(float *h, float *update, const float *post_norm, int n, float eps) {
    if (post_norm) rms_norm(update, post_norm, update, n, eps);
    for (int i = 0; i < n; i++) h[i] += update[i];
}

/* o [hd] = softmax(q·kᵀ·scale) v over keys, values [n, hd] (one query and head); scores: [n] scratch. */
static void attend(const float *q, const float *keys, const float *values, int n, int hd, float scale,
                   float *scores, float *o) {
    float top = -INFINITY;
    for (int j = 0; j < n; j++) {
        scores[j] = dot(q, keys + (size_t)j * hd, hd) * scale;
        if (scores[j] > top) top = scores[j];
    }
    const float norm = 1.0f / exp_row(scores, scores, n, top);  /* scores become their exponentials */
    for (int i = 0; i < hd; i++) o[i] = 0.0f;
    for (int j = 0; j < n; j++) {
        const float *v = values + (size_t)j * hd, weight = scores[j] * norm;
        for (int i = 0; i < hd; i++) o[i] += weight * v[i];
    }
}

/* LAST_EXITED: a token that ran `ran` steps gives its K/V at `at` (floats into each slot's storage:
 * its cache row and position) to the skipped steps' slots steps[ran .. until). */
static void copy_skipped(const Layer *const *steps, int count, int ran, int until, size_t at, int Hkv, int L,
                         int hd) {
    for (int t = ran; t < until; t++) {
        for (int i = 0; i < count; i++) {
            const Layer *from = &steps[ran - 1][i], *to = &steps[t][i];
            for (int kv = 0; kv < Hkv; kv++) {
                const size_t head = at + (size_t)kv * L * hd;
                memcpy(to->keys + head, from->keys + head, hd * sizeof(float));
                memcpy(to->values + head, from->values + head, hd * sizeof(float));
            }
        }
    }
}

void looplm_rows_layers(const Dims *dims, const Layer *const *steps, int count, int R, float *h, const int *h_rows,
                        const int *step, const int *slot, const int *pos, long slot_floats,
                        const float *cos, const float *sin, float *scratch, const float *final_norm,
                        int threads);

/* Run `count` layers on h [D] in place for the token at `pos`, writing its K/V into each
 * layer's cache slot; then, if final_norm is not NULL, h = rms_norm(h) · final_norm.  cos, sin:
 * the RoPE tables' rows for `pos`.  This is looplm_rows_layers for one row. */
void looplm_layers(const Dims *dims, const Layer *layers, int count, float *h, int pos,
                   const float *cos, const float *sin, float *scratch, const float *final_norm,
                   int threads) {
    const Layer *steps[1] = {layers};
    const int zero = 0;
    const size_t row = (size_t)pos * dims->head_dim;  /* the tables' first row: rows_layers offsets by pos */
    looplm_rows_layers(dims, steps, count, 1, h, NULL, &zero, &zero, &pos, 0, cos - row, sin - row, scratch,
                       final_norm, threads < MOST_THREADS ? threads : MOST_THREADS);
}

/* One token's whole loop (batch 1, the plain Ouro loop: step norm, no coda) in one call:
 * run steps[0..max_steps) (each a packed array of `count` core layers with that step's cache
 * slots) on h; after every step but the last, when gate_w is not NULL, read the exit gate
 * z = w·h + b and stop at the first step n >= min_steps whose exit CDF 1 − Π(1 − σ(z_j)) reaches
 * q (the decoder's arithmetic: float dot, double survival).  Then, if fill, copy the last step's
 * K/V at pos into every deeper step's slots (LAST_EXITED); if head is not NULL, logits = head · h
 * (head: a projection [vocab, D], float32 or bf16) and *best = the index of its first largest
 * logit (greedy decoding's token, as torch.argmax picks it for finite logits).  Returns the steps run; h holds the last step's
 * state, which is its readout. */
void looplm_project(const Projection *p, const float *x, float *y, int rows, int cols, int threads);

int looplm_exit_loop(const Dims *dims, const Layer *const *steps, int count, int max_steps, int min_steps,
                     float *h, int pos, const float *cos, const float *sin, float *scratch,
                     const float *final_norm, int threads, const float *gate_w, float gate_b, double q,
                     int fill, const Projection *head, float *logits, int vocab, int *best) {
    const int D = dims->d_model, Hkv = dims->n_kv_heads, hd = dims->head_dim, L = dims->max_len;
    double log_survival = 0.0;
    int ran = max_steps;
    for (int s = 0; s < max_steps; s++) {
        looplm_layers(dims, steps[s], count, h, pos, cos, sin, scratch, final_norm, threads);
        if (s + 1 == max_steps || gate_w == NULL) continue;
        if (q_exit_reached((double)dot(gate_w, h, D) + (double)gate_b, &log_survival, q) && s + 1 >= min_steps) {
            ran = s + 1;
            break;
        }
    }
    if (fill) copy_skipped(steps, count, ran, max_steps, (size_t)pos * hd, Hkv, L, hd);
    if (head) {
        looplm_project(head, h, logits, vocab, D, threads);
        *best = vector_argmax(logits, vocab);
    }
    return ran;
}

/* y = W x for W [rows, cols] (the LM head and the exit gate), rows split over threads. */
void looplm_matvec(const float *W, const float *x, float *y, int rows, int cols, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int begin, end;
        share(rows, 4, &begin, &end);
        matvec_rows(W, x, y, cols, begin, end);
    }
}

/* y = W x for a projection W [rows, cols] in any form (the LM head), rows split over threads. */
void looplm_project(const Projection *p, const float *x, float *y, int rows, int cols, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int begin, end;
        share(rows, 4, &begin, &end);
        project_rows(p, x, y, cols, begin, end);
    }
}

/* Which SIMD path each projection form was compiled to, e.g. "f32=avx2 bf16=avx512_bf16
 * q8_int8=avx512_vnni" ("scalar" where none): the host's -march=native decides at build time. */
const char *looplm_simd_paths(void) {
    return "f32=" LOOPLM_PATH_F32 " bf16=" LOOPLM_PATH_BF16 " q8_int8=" LOOPLM_PATH_Q8_INT8;
}

/* out = rms_norm(x) · w (w NULL: no weight); out may alias x. */
void looplm_rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    rms_norm(x, w, out, n, eps);
}

/* y [M, N] = x [M, K] · Wᵀ (+ bias [N] when not NULL) for Q8_0 W (Int8Linear's few-row path);
 * K must be a multiple of 32.  Each group of four rows meets every x row while it sits in L1.
 * quantize_input: each x row is quantised to Q8_0 once, up front, and the products are int8 × int8
 * (matvec.h); otherwise the weights are widened to float32. */
void looplm_q8_matmul(const int8_t *values, const float *scales, const float *bias, const float *x, float *y,
                      int M, int N, int K, int quantize_input, int threads) {
    const int blocks = K / BLOCK, groups = (N + 3) / 4;
    int8_t *q = NULL;
    float *d = NULL;
    if (quantize_input) {
        q = malloc((size_t)M * K);
        d = malloc((size_t)M * blocks * sizeof(float));
        if (!q || !d) {  /* out of memory: the float-input path needs no buffers */
            free(q);
            free(d);
            q = NULL;
            d = NULL;
        } else {
            for (int m = 0; m < M; m++)
                quantize_q8(x + (size_t)m * K, q + (size_t)m * K, d + (size_t)m * blocks, K);
        }
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int g = 0; g < groups; g++) {
        const int n = 4 * g, count = n + 4 <= N ? 4 : N - n;
        const int8_t *w = values + (size_t)n * K;
        const float *s = scales + (size_t)n * blocks;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            float *ym = y + (size_t)m * N + n;
            if (q) {
                q8q8_rows(values, scales, q + (size_t)m * K, d + (size_t)m * blocks, y + (size_t)m * N, K, n,
                          n + count);
            } else if (count == 4) {
                rows4_dot(w, s, xm, blocks, ym);
            } else {
                for (int r = 0; r < count; r++)
                    ym[r] = row_dot(w + (size_t)r * K, s + (size_t)r * blocks, xm, blocks);
            }
            if (bias)
                for (int r = 0; r < count; r++) ym[r] += bias[n + r];
        }
    }
    free(q);
    free(d);
}

/* Everything about one decoder's token loop that stays fixed from token to token, set up once
 * (``NativeStepper``), so a token is one call with five numbers: the argument conversions of a
 * twenty-argument call cost a small model's token several microseconds. */
typedef struct {
    const Dims *dims;
    const Layer *const *steps;
    int count, threads, vocab;
    float *h;
    const float *cos, *sin;            /* the RoPE tables' row 0; row pos is pos·head_dim further */
    float *scratch;
    const float *final_norm, *gate_w;  /* gate_w NULL: no exit gate */
    float gate_b;
    const Projection *head;            /* the LM head [vocab, D] (float32 or bf16) */
    const float *embedding;
    float *logits;
    int *best;
} TokenLoop;

/* One token from its id: embedding row, looplm_exit_loop with LAST_EXITED fill, logits and
 * argmax.  q > 1 (or no gate): every step. */
int looplm_token(const TokenLoop *t, int token, int pos, int max_steps, int min_steps, double q) {
    const int D = t->dims->d_model, hd = t->dims->head_dim;
    const float *gate = q <= 1.0 ? t->gate_w : NULL;
    memcpy(t->h, t->embedding + (size_t)token * D, (size_t)D * sizeof(float));
    return looplm_exit_loop(t->dims, t->steps, t->count, max_steps, min_steps, t->h, pos,
                            t->cos + (size_t)pos * hd, t->sin + (size_t)pos * hd, t->scratch, t->final_norm,
                            t->threads, gate, t->gate_b, q, 1, t->head, t->logits, t->vocab, t->best);
}

/* Decode attention for a batch of rows read in place (the scheduler's rows, each at its own loop
 * step and position).  q [count, H, hd] (RoPE applied); keys, values: storage seen as rows of
 * [Hkv, max_len, hd] (a cache's [slots, B, Hkv, max_len, hd] is slots·B such rows); query i
 * attends row rows[i]'s keys [0, ends[i]); out [count, H, hd].  Each (query, head) pair is one
 * task: scores, a max-shifted softmax, then the weighted sum of values. */
void looplm_rows_attention(const float *q, const float *keys, const float *values, const int64_t *rows,
                           const int64_t *ends, int count, int H, int Hkv, int max_len, int hd, float *out,
                           int threads) {
    const int group = H / Hkv;
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel num_threads(threads)
    {
        float *scores = malloc((size_t)(max_len > 0 ? max_len : 1) * sizeof(float)); /* heap: long contexts */
        #pragma omp for schedule(static)
        for (long task = 0; task < (long)count * H; task++) {
            const int i = (int)(task / H), head = (int)(task % H), n = (int)ends[i];
            const float *query = q + (size_t)task * hd;
            float *o = out + (size_t)task * hd;
            if (n <= 0) {
                memset(o, 0, hd * sizeof(float));
                continue;
            }
            const size_t base = ((size_t)rows[i] * Hkv + head / group) * max_len * hd;
            attend(query, keys + base, values + base, n, hd, scale, scores, o);
        }
        free(scores);
    }
}

/* Scratch floats looplm_rows_layers needs for `rows` rows and `threads` threads. */
long looplm_rows_scratch_floats(const Dims *dims, int rows, int threads) {
    long d = dims->d_model, hd = dims->head_dim;
    long per_row = 2 * d + (long)(dims->n_heads + 2 * dims->n_kv_heads) * hd + (long)dims->n_heads * hd
                   + 2L * dims->hidden;
    return per_row * rows + (long)threads * dims->max_len;
}

/* Rows of a batched cache, each at its own loop step, position and cache row, through `count`
 * layers in one call: h [R, D] in place.  Row r uses the layers of steps[step[r]] (the same weights
 * at every step; the step picks the K/V slots), cache row slot[r] (slot_floats floats further into
 * each slot's storage [B, Hkv, max_len, hd]), position pos[r] (its RoPE row, where its K/V go, and
 * the keys [0, pos] it attends); row r's state is h + r·D, or h + h_rows[r]·D where h_rows is not NULL
 * (a table of every cache row's state).  Then, if final_norm is not NULL, each row is normalised.  The
 * math is looplm_layers' per row; the projections read each weight block once for all rows
 * (matvec.h project_batch), the short per-row steps (norms, RoPE, the cache write, residuals) are
 * split over rows, and attention over (row, head) pairs. */
void looplm_rows_layers(const Dims *dims, const Layer *const *steps, int count, int R, float *h, const int *h_rows,
                        const int *step, const int *slot, const int *pos, long slot_floats,
                        const float *cos, const float *sin, float *scratch, const float *final_norm,
                        int threads) {
    const int D = dims->d_model, H = dims->n_heads, Hkv = dims->n_kv_heads, hd = dims->head_dim;
    const int F = dims->hidden, L = dims->max_len, group = H / Hkv;
    const float eps = dims->eps, scale = 1.0f / sqrtf((float)hd);
    const int qkv_rows = (H + 2 * Hkv) * hd;
    float *x = scratch, *update = x + (size_t)R * D, *qkv = update + (size_t)R * D;
    float *attended = qkv + (size_t)R * qkv_rows, *gate = attended + (size_t)R * H * hd;
    float *up = gate + (size_t)R * F, *all_scores = up + (size_t)R * F;
#define HROW(r) (h + (size_t)(h_rows ? h_rows[r] : (r)) * D)

    #pragma omp parallel num_threads(threads)
    {
        int begin, end;
        float *scores = all_scores + (size_t)omp_get_thread_num() * L;
        for (int index = 0; index < count; index++) {
            const Layer *layer = &steps[0][index];  /* the weights; steps[step[r]][index] holds row r's K/V */
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) rms_norm(HROW(r), layer->attn_norm, x + (size_t)r * D, D, eps);
            share(qkv_rows, 4, &begin, &end);
            project_batch(&layer->qkv, x, R, D, qkv, qkv_rows, D, begin, end);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                float *row = qkv + (size_t)r * qkv_rows;
                const Layer *own = &steps[step[r]][index];
                const size_t at = (size_t)slot[r] * slot_floats + (size_t)pos[r] * hd;
                for (int head = 0; head < H + Hkv; head++)
                    rope(row + head * hd, cos + (size_t)pos[r] * hd, sin + (size_t)pos[r] * hd, hd);
                for (int kv = 0; kv < Hkv; kv++) {
                    memcpy(own->keys + at + (size_t)kv * L * hd, row + (H + kv) * hd, hd * sizeof(float));
                    memcpy(own->values + at + (size_t)kv * L * hd, row + (H + Hkv + kv) * hd, hd * sizeof(float));
                }
            }
            #pragma omp for schedule(static)
            for (long task = 0; task < (long)R * H; task++) {
                const int r = (int)(task / H), head = (int)(task % H), n = pos[r] + 1;
                const Layer *own = &steps[step[r]][index];
                const size_t base = (size_t)slot[r] * slot_floats + (size_t)(head / group) * L * hd;
                const float *q = qkv + (size_t)r * qkv_rows + head * hd;
                attend(q, own->keys + base, own->values + base, n, hd, scale, scores, attended + (size_t)task * hd);
            }
            share(D, 4, &begin, &end);
            project_batch(&layer->out, attended, R, H * hd, update, D, H * hd, begin, end);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                residual(HROW(r), update + (size_t)r * D, layer->attn_post_norm, D, eps);
                rms_norm(HROW(r), layer->ffn_norm, x + (size_t)r * D, D, eps);
            }
            share(F, 4, &begin, &end);
            Projection upper = layer->gate_up;  /* rows F..2F of gate_up: the "up" half */
            upper.weights = upper.weights ? upper.weights + (size_t)F * D : NULL;
            upper.values = upper.values ? upper.values + (size_t)F * D : NULL;
            upper.scales = upper.scales ? upper.scales + (size_t)F * (D / BLOCK) : NULL;
            upper.bf16 = upper.bf16 ? upper.bf16 + (size_t)F * D : NULL;
            project_batch(&layer->gate_up, x, R, D, gate, F, D, begin, end);
            project_batch(&upper, x, R, D, up, F, D, begin, end);
            for (int r = 0; r < R; r++) swiglu(gate + (size_t)r * F, up + (size_t)r * F, begin, end);
            #pragma omp barrier
            share(D, 4, &begin, &end);
            project_batch(&layer->down, gate, R, F, update, D, F, begin, end);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) residual(HROW(r), update + (size_t)r * D, layer->ffn_post_norm, D, eps);
        }
        if (final_norm) {
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) rms_norm(HROW(r), final_norm, HROW(r), D, eps);
        }
    }
}
#undef HROW

/* Outputs [begin, end) of looplm_rows_head's Y (the calling thread alone). */
static void rows_head_part(const Projection *p, const float *panels, const float *X, int R, float *Y, int rows,
                           int cols, int begin, int end) {
#if defined(__AVX512F__)
    if (panels) {
        panel_rows(panels, rows, cols, X, R, Y, begin, end);
        return;
    }
#endif
    project_batch(p, X, R, cols, Y, rows, cols, begin, end);
}

/* Row r of Y [R, rows]: best[r] = the index of its first largest value, top[r] (top not NULL) that value. */
static inline void row_best(const float *Y, int r, int rows, int *best, float *top) {
    best[r] = vector_argmax(Y + (size_t)r * rows, rows);
    if (top) top[r] = Y[(size_t)r * rows + best[r]];
}

/* looplm_rows_head's argmax and top of rows [0, R) by the calling thread alone. */
static void rows_best(const float *Y, int R, int rows, int *best, float *top) {
    for (int r = 0; r < R; r++) row_best(Y, r, rows, best, top);
}

/* Y [R, rows] = X [R, cols] · Wᵀ for a projection W [rows, cols] in any form (the LM head or the
 * exit gate over a batch of rows), the weights read once for all rows (project_batch), or, where
 * panels is not NULL and the CPU has AVX-512, a float32 W packed in panels of 64 outputs (matvec.h
 * panel_rows: broadcast products, no horizontal sums); if best is not NULL, best[r] = the index of
 * row r's first largest value (torch.argmax's pick for finite logits) and, if top is not NULL, top[r] that
 * value (a caller sampling greedily checks it is finite without reading the logits again). */
void looplm_rows_head(const Projection *p, const float *panels, const float *X, int R, float *Y, int rows, int cols,
                      int *best, float *top, int threads) {
#if !defined(__AVX512F__)
    panels = NULL;
#endif
    #pragma omp parallel num_threads(threads)
    {
        int begin, end;
        share(rows, panels ? 64 : 16, &begin, &end);
        rows_head_part(p, panels, X, R, Y, rows, cols, begin, end);
        #pragma omp barrier
        if (best) {
            #pragma omp for schedule(static)
            for (int r = 0; r < R; r++) row_best(Y, r, rows, best, top);
        }
    }
}

/* keys, values [G, B, H, L, w] (float32, contiguous; values may be NULL): for each i < count, the
 * H vectors of width w at group target[i], cache row rows[i], position positions[i] become those
 * at group source[i] (the K/V a token that left the loop early gives the steps it skipped). */
void looplm_copy_positions(float *keys, float *values, const int64_t *source, const int64_t *target,
                           const int64_t *rows, const int64_t *positions, int count, int B, int H, int L, int w) {
    const size_t row = (size_t)H * L * w, group = (size_t)B * row;
    for (int i = 0; i < count; i++) {
        const size_t at = (size_t)rows[i] * row + (size_t)positions[i] * w;
        const size_t from = (size_t)source[i] * group + at, to = (size_t)target[i] * group + at;
        for (int head = 0; head < H; head++) {
            const size_t offset = (size_t)head * L * w;
            memcpy(keys + to + offset, keys + from + offset, (size_t)w * sizeof(float));
            if (values) memcpy(values + to + offset, values + from + offset, (size_t)w * sizeof(float));
        }
    }
}

/* The exit step of a token whose readouts after steps 1..steps are X [steps, D] (a prompt's last
 * token, prefilled at full depth): Q-exit decided as rows_exit_step decides it, from no
 * survival — the first step n >= min_steps, n < steps, whose exit CDF reaches q; else steps. */
int looplm_q_exit_replay(const float *X, int steps, int D, const float *gate_w, float gate_b, int min_steps,
                         double q) {
    double log_survival = 0.0;
    for (int s = 0; s + 1 < steps; s++)
        if (q_exit_reached((double)(dot(gate_w, X + (size_t)s * D, D) + gate_b), &log_survival, q) && s + 1 >= min_steps)
            return s + 1;
    return steps;
}

#define SMALL_WORK (32L * 1024)  /* bytes: below this a parallel region costs more than it saves */

/* One scheduler iteration of rows that exit by Q-exit or at a fixed depth (the plain loop without a
 * coda, LAST_EXITED): looplm_rows_layers' core step of every row (h: the states of every cache row
 * [B, D], row r's at slot[r], updated in place), then for each row its readout
 * (h itself after a step norm, else rms_norm(h) · norm), and its decision: a row at its last step
 * (max_steps[r]) is done; otherwise, where q[r] <= 1, the gate's z = w · readout + b updates the
 * row's log survival (survival[slot[r]], float64, the scheduler's table) by log σ(−z) and the row is
 * done once step + 1 >= min_steps[r] and 1 − survival >= q[r] (Q-exit's rule, in the scheduler's
 * arithmetic).  done[r] = the steps its token ran (0: it runs on).  A done row's K/V at its position
 * are copied into the deeper steps' slots (steps[ran .. cache_steps)), and its logits go to row k of
 * logits [R, V] (k counting the done rows in order; head_panels: the head packed for panel_rows, or NULL), their
 * argmax to best[k] and its value to top[k] (top may be NULL).  Returns the number of done rows.  readout: scratch [R, D].  A row with
 * tokens[r] >= 0 enters first (the plain loop without a prelude): its state and its row of e [B, D]
 * become that token's embedding row and its survival 1. */
static int rows_exit_step(const Dims *dims, const Layer *const *steps, int count, int cache_steps, int R, float *h,
                          const int *step, const int *slot, const int *pos, long slot_floats, const float *cos,
                          const float *sin, float *scratch, const float *step_norm, const float *norm,
                          const int *max_steps, const int *min_steps, const double *q, double *survival,
                          const float *gate_w, float gate_b, float *readout, int *done, const Projection *head,
                          const float *head_panels, int vocab, float *logits, int *best, float *top,
                          const int *tokens, const float *embedding, float *e, int threads) {
    const int D = dims->d_model, Hkv = dims->n_kv_heads, hd = dims->head_dim, L = dims->max_len;
    for (int r = 0; r < R; r++) {  /* rows entering with their token: h = e = its embedding row, no survival yet */
        if (tokens[r] < 0) continue;
        const float *row = embedding + (size_t)tokens[r] * D;
        memcpy(h + (size_t)slot[r] * D, row, (size_t)D * sizeof(float));
        memcpy(e + (size_t)slot[r] * D, row, (size_t)D * sizeof(float));
        survival[slot[r]] = 0.0;
    }
    looplm_rows_layers(dims, steps, count, R, h, slot, step, slot, pos, slot_floats, cos, sin, scratch, step_norm,
                       threads);
    int finished = 0;
    for (int r = 0; r < R; r++) {  /* the decisions, in row order (the done rows' readouts packed) */
        const float *x = h + (size_t)slot[r] * D;  /* the table of every cache row's state */
        float *out = readout + (size_t)finished * D;
        if (step_norm) memcpy(out, x, (size_t)D * sizeof(float));
        else rms_norm(x, norm, out, D, dims->eps);
        const int ran = step[r] + 1;
        done[r] = 0;
        if (ran >= max_steps[r]) {
            done[r] = ran;
        } else if (q[r] <= 1.0 && gate_w) {
            if (q_exit_reached((double)(dot(gate_w, out, D) + gate_b), survival + slot[r], q[r]) && ran >= min_steps[r])
                done[r] = ran;
        }
        finished += done[r] > 0;
    }
    /* LAST_EXITED: a done row's skipped steps take its last step's K/V, then the done rows' logits.
     * A small head (weights under a MiB, products for these rows under 2^20: a few microseconds) runs
     * on one thread, since waking a team for it costs more, while the other threads make the copies,
     * which wait on cold cache lines rather than arithmetic.  Otherwise large copies go to every
     * thread (their misses overlap) and small ones stay on this one, and then a large head is shared. */
    long copied = 0;
    for (int r = 0; r < R; r++)
        if (done[r]) copied += (long)(cache_steps - done[r]) * count * Hkv * hd * 2 * (long)sizeof(float);
    const long head_products = (long)finished * vocab * D, head_bytes = (long)vocab * D * (long)sizeof(float);
    const int small_head = head_bytes < 32 * SMALL_WORK && head_products < (1L << 20);
    if (small_head && copied && threads > 1) {
        #pragma omp parallel num_threads(threads)
        {
            #pragma omp single nowait
            {
                rows_head_part(head, head_panels, readout, finished, logits, vocab, D, 0, vocab);
                rows_best(logits, finished, vocab, best, top);
            }
            #pragma omp for schedule(dynamic, 1) nowait
            for (int r = 0; r < R; r++)
                if (done[r])
                    copy_skipped(steps, count, done[r], cache_steps, (size_t)slot[r] * slot_floats + (size_t)pos[r] * hd,
                                 Hkv, L, hd);
        }
        return finished;
    }
    #pragma omp parallel for num_threads(copied >= SMALL_WORK ? threads : 1) schedule(static)
    for (int r = 0; r < R; r++)
        if (done[r])
            copy_skipped(steps, count, done[r], cache_steps, (size_t)slot[r] * slot_floats + (size_t)pos[r] * hd,
                         Hkv, L, hd);
    if (finished)
        looplm_rows_head(head, head_panels, readout, finished, logits, vocab, D, best, top, small_head ? 1 : threads);
    return finished;
}

/* Everything about a batch's looplm_rows_run calls that stays put from call to call, set up once
 * (``NativeRowsStepper``): the model's fixed arguments and the per-row arrays, as long as the batch,
 * that the caller fills before a call (step .. final) and reads after it (done .. counts); a call's
 * argument conversions would otherwise cost a small model more than a token's arithmetic.  A call's
 * rows are R running rows and S waiting ones after them (entries 0 .. R+S−1: rows whose first
 * token is fed, each to take the place of a running row whose request ends in the call). */
typedef struct {
    const Dims *dims;
    const Layer *const *steps;   /* the core's layers at each loop step's cache slots */
    int count, cache_steps, threads, vocab;
    long slot_floats;
    const float *cos, *sin, *step_norm, *norm, *gate_w;  /* step_norm NULL: the readout is rms_norm(h) · norm */
    float gate_b;
    const Projection *head;
    const float *head_panels, *embedding;
    float *readout;              /* scratch [rows, D] */
    /* per entry in; per place out (the entry at place r is at[r]; step, pos and tokens as the last
     * iteration read them) */
    int *step, *slot, *pos, *max_steps, *min_steps, *tokens, *left, *final;
    double *q;
    int *done, *best;            /* per place of the last iteration, out */
    float *top;
    const int *stop_ids;
    int n_stop;
    int leave;                   /* a row whose request ends may leave with no waiting row to take its place */
    /* the tokens fed back: entry e's tokens and their steps at fed_tokens, fed_steps + fed_offset[e]
     * (Σ left + final over the entries before it as the call began), fed_count[e] of them;
     * fed_order: the entry of each token in the order taken */
    int *fed_tokens, *fed_steps, *fed_order, *fed_count, *fed_offset;
    int *at, *applied, *ended;   /* out: per place, its entry; per entry, the iterations it ran, whether
                                    its request ended (its last token fed back) */
    int counts[4];
} RowsRun;

/* A row's per-place values (its cache row, position, token, exit settings and feeds) from index
 * from to place to (a waiting entry taking a place, or a place closing up). */
static void move_place(RowsRun *run, int from, int to) {
    run->slot[to] = run->slot[from], run->pos[to] = run->pos[from], run->tokens[to] = run->tokens[from];
    run->max_steps[to] = run->max_steps[from], run->min_steps[to] = run->min_steps[from], run->q[to] = run->q[from];
    run->left[to] = run->left[from], run->final[to] = run->final[from];
}

/* rows_exit_step's iterations over R rows (the arrays of run; the states h [B, D], survival
 * [B], e [B, D], scratch and logits [R, V] given per call), run on here while every row done with
 * a token may take the next one at once: greedy decoding picks it (best[k]) and needs nothing else.
 * After each iteration, each done row r with a finite top logit that is not a stop id takes its
 * best token if left[r] > 0 (0 for a sampled row, or for one whose request this token ends), or,
 * where final[r] says that token ends its request and a waiting row is left for its place (or
 * leave says the row may go without one), takes it as its last (ended).  Either is recorded with
 * the steps it ran in its entry's part of fed_tokens and fed_steps, and the entry in fed_order
 * (the rows in the order they were done); left[r] drops by one and done[r] becomes −steps ran.
 * If every done row took its token, and fewer than max_iterations iterations and max_seconds have
 * passed, the next iteration runs: the fed rows enter with their token (tokens[r], step[r] = 0,
 * pos[r] + 1), each ended row's place goes to the next waiting entry (entering with its token at
 * its position) or, with none left, is closed up (the places after it move down, in order), and
 * every other row goes one step deeper (tokens[r] = −1, step[r] + 1); with no row left the run
 * stops.  Otherwise the run stops: the last iteration's done rows, logits, best and top are rows_exit_step's (the fed and ended rows' done[r] negative),
 * the rows with a positive done[r] for the caller to emit, the fed ones to enter next with their
 * recorded token; waiting entries not reached stay as they were.  counts: [iterations run, those
 * whose rows stood at different steps, tokens fed back, places at the end].  Returns the last
 * iteration's number of done rows. */
int looplm_rows_run(RowsRun *run, int R, int S, float *h, double *survival, float *e, float *scratch,
                    float *logits, int max_iterations, double max_seconds) {
    const double started = omp_get_wtime();
    const int entries = R + S;
    int iterations = 0, mixed = 0, recorded = 0, finished, next = R;  /* next: the next waiting entry */
    int *step = run->step, *pos = run->pos, *done = run->done, *best = run->best, *left = run->left;
    int *tokens = run->tokens, *at = run->at;
    const float *top = run->top;
    for (int entry = 0, offset = 0; entry < entries; entry++) {
        run->fed_offset[entry] = offset, run->fed_count[entry] = 0, run->applied[entry] = run->ended[entry] = 0;
        offset += (left[entry] > 0 ? left[entry] : 0) + (run->final[entry] != 0);
    }
    for (int r = 0; r < R; r++) at[r] = r;
    for (;;) {
        for (int r = 1; r < R; r++)
            if (step[r] != step[0]) {
                mixed++;
                break;
            }
        finished = rows_exit_step(run->dims, run->steps, run->count, run->cache_steps, R, h, step, run->slot, pos,
                                  run->slot_floats, run->cos, run->sin, scratch, run->step_norm, run->norm,
                                  run->max_steps, run->min_steps, run->q, survival, run->gate_w, run->gate_b,
                                  run->readout, done, run->head, run->head_panels, run->vocab, logits, best,
                                  run->top, tokens, run->embedding, e, run->threads);
        iterations++;
        for (int r = 0; r < R; r++) run->applied[at[r]]++;
        int stop = iterations >= max_iterations || omp_get_wtime() - started >= max_seconds, places = 0;
        for (int r = 0, k = 0; r < R; r++) {
            if (!done[r]) continue;
            int takes = isfinite(top[k]);
            for (int s = 0; s < run->n_stop && takes; s++) takes = best[k] != run->stop_ids[s];
            const int ends = takes && left[r] == 0 && run->final[r] && (next + places < entries || run->leave);
            if (takes && (left[r] > 0 || ends)) {
                const int entry = at[r], to = run->fed_offset[entry] + run->fed_count[entry]++;
                run->fed_tokens[to] = best[k], run->fed_steps[to] = done[r], run->fed_order[recorded++] = entry;
                done[r] = -done[r];
                if (ends) run->ended[entry] = 1, places++;
                else left[r]--;
            } else {
                stop = 1;
            }
            k++;
        }
        if (stop) break;
        int closing = 0;
        for (int r = 0, k = 0; r < R; r++) {
            if (!done[r]) {
                tokens[r] = -1, step[r]++;
                continue;
            }
            if (run->ended[at[r]] && next < entries) {  /* its request ended: the next waiting entry takes its place */
                move_place(run, next, r);
                at[r] = next++, step[r] = 0;
            } else if (run->ended[at[r]]) {  /* ... or none: the place closes */
                at[r] = -1, closing = 1;
            } else {
                tokens[r] = best[k], step[r] = 0, pos[r]++;
            }
            k++;
        }
        if (closing) {
            int kept = 0;
            for (int r = 0; r < R; r++)
                if (at[r] >= 0) {
                    if (kept != r) move_place(run, r, kept), at[kept] = at[r], step[kept] = step[r];
                    kept++;
                }
            R = kept;
            if (!R) break;
        }
    }
    run->counts[0] = iterations, run->counts[1] = mixed, run->counts[2] = recorded, run->counts[3] = R;
    return finished;
}
