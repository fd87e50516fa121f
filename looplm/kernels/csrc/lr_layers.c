/* One layer for one token: the token mixers (attention MHA/GQA and gated, MLA, Gated DeltaNet
 * with memory caching and loop-axis memory, the RWKV slot mixer), the feed-forwards (SwiGLU,
 * ChannelMix, MoE) and the layer around them (pre or sandwich norm, global gates).
 *
 * Each function is the single-position form of the looplm module named beside it, with the same
 * operations in the same order (docs/C_RUNTIME.md maps them); weight × vector products go through
 * matvec.h.  Shapes are torch's: W [out, in], a head's vector [hd], caches as looplm.cache keeps them. */
#include <float.h>

#include "lr_common.h"
#include "lr_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define PARALLEL_FLOATS (1 << 16)  /* a projection smaller than this runs on one thread */

void lr_project(const LrState *state, const LrMatrix *m, const float *x, float *y) {
    const int rows = m->rows, threads = state->threads;
    if (threads <= 1 || (long)rows * m->cols < PARALLEL_FLOATS) {
        project_rows(&m->p, x, y, m->cols, 0, rows);
        return;
    }
    const int quads = (rows + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int q = 0; q < quads; q++) {
        int begin = 4 * q, end = begin + 4 < rows ? begin + 4 : rows;
        project_rows(&m->p, x, y, m->cols, begin, end);
    }
}

void lr_rms_norm(const float *x, const float *w, float *out, int n, float eps) {
    float scale = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w ? x[i] * scale * w[i] : x[i] * scale;
}

void lr_norm(const LrConfig *config, const float *x, const float *w, const float *b, float *out, int n) {
    if (!config->layer_norm) {
        lr_rms_norm(x, w, out, n, config->norm_eps);
        return;
    }
    float mean = 0.0f, variance = 0.0f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int i = 0; i < n; i++) variance += (x[i] - mean) * (x[i] - mean);
    const float scale = 1.0f / sqrtf(variance / (float)n + config->norm_eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * scale * w[i] + b[i];
}

/* W[row] · x for a float32 or Q8_0 matrix. */
static float row_times(const LrMatrix *m, int row, const float *x) {
    if (!m->p.values) return dot(m->p.weights + (size_t)row * m->cols, x, m->cols);
    return row_dot(m->p.values + (size_t)row * m->cols, m->p.scales + (size_t)row * (m->cols / BLOCK), x,
                   m->cols / BLOCK);
}

/* y += a · W[row]. */
static void row_axpy(const LrMatrix *m, int row, float a, float *y) {
    const int n = m->cols;
    if (!m->p.values) {
        const float *w = m->p.weights + (size_t)row * n;
        for (int i = 0; i < n; i++) y[i] += a * w[i];
        return;
    }
    const int8_t *q = m->p.values + (size_t)row * n;
    const float *s = m->p.scales + (size_t)row * (n / BLOCK);
    for (int i = 0; i < n; i++) y[i] += a * (s[i / BLOCK] * (float)q[i]);
}

/* x / max(‖x‖, 1e-12) (F.normalize), times `scale`. */
static void normalize(float *x, int n, float scale) {
    float norm = sqrtf(dot(x, x, n));
    float inverse = scale / (norm > 1e-12f ? norm : 1e-12f);
    for (int i = 0; i < n; i++) x[i] *= inverse;
}

/* Rotate-half RoPE on the first r dims of v (the rest pass through): looplm.model.rope.apply_rope. */
static void rope(float *v, const float *cos, const float *sin, int r) {
    const int half = r / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* s[0..n) ← softmax(s) in place. */
static void softmax(float *s, int n) {
    float top = -INFINITY, total = 0.0f;
    for (int j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
    for (int j = 0; j < n; j++) total += s[j] = expf(s[j] - top);
    for (int j = 0; j < n; j++) s[j] /= total;
}

/* o = softmax(q·K[0..n)ᵀ · scale) V: one head over cached keys/values of stride hd. */
static void attend(const float *q, const float *keys, const float *values, int n, int hd, float scale, float *scores,
                   float *o) {
    for (int j = 0; j < n; j++) scores[j] = dot(q, keys + (size_t)j * hd, hd) * scale;
    softmax(scores, n);
    memset(o, 0, (size_t)hd * sizeof(float));
    for (int j = 0; j < n; j++) {
        const float *v = values + (size_t)j * hd;
        const float w = scores[j];
        for (int i = 0; i < hd; i++) o[i] += w * v[i];
    }
}

/* ---- attention (looplm.model.attention.Attention): MHA/GQA, or gated with QK norm ----------- */
/* shared: an append-first slot after step 1 (lr_reads_first_step): attend to the stored K/V, write none. */
static void attention(LrState *state, const LrLayer *L, const LrSlot *slot, const float *x, int pos, int shared,
                      float *out) {
    const LrConfig *c = &state->model->config;
    const int H = c->n_heads, Hkv = c->n_kv_heads, hd = c->head_dim, r = c->rope_dim, len = state->max_len;
    const int gated = c->attention == LR_ATTENTION_GATED, group = H / Hkv;
    const size_t mark = state->scratch_used;
    float *qkv = lr_take(state, (size_t)L->qkv.rows), *attended = lr_take(state, (size_t)H * hd);
    float *scores = lr_take(state, (size_t)H * (pos + 1));
    const float *cos = state->model->rope_cos + (size_t)pos * r, *sin = state->model->rope_sin + (size_t)pos * r;
    lr_project(state, &L->qkv, x, qkv);
    const int q_stride = gated ? 2 * hd : hd;
    float *k = qkv + (size_t)H * q_stride, *v = k + (size_t)Hkv * hd;
    for (int h = 0; h < H; h++) {
        float *q = qkv + (size_t)h * q_stride;
        if (gated) lr_rms_norm(q, L->q_norm, q, hd, c->norm_eps);
        rope(q, cos, sin, r);
    }
    for (int kv = 0; kv < Hkv && !shared; kv++) {
        float *key = k + (size_t)kv * hd;
        if (gated) lr_rms_norm(key, L->k_norm, key, hd, c->norm_eps);
        rope(key, cos, sin, r);
        memcpy(slot->part[LR_PART_KEYS] + ((size_t)kv * len + pos) * hd, key, (size_t)hd * sizeof(float));
        memcpy(slot->part[LR_PART_VALUES] + ((size_t)kv * len + pos) * hd, v + (size_t)kv * hd, (size_t)hd * sizeof(float));
    }
    const float scale = 1.0f / sqrtf((float)hd);
    #pragma omp parallel for num_threads(state->threads) if (state->threads > 1 && (long)H * pos * hd > PARALLEL_FLOATS)
    for (int h = 0; h < H; h++) {
        const size_t base = (size_t)(h / group) * len * hd;
        attend(qkv + (size_t)h * q_stride, slot->part[LR_PART_KEYS] + base, slot->part[LR_PART_VALUES] + base, pos + 1,
               hd, scale, scores + (size_t)h * (pos + 1), attended + (size_t)h * hd);
        if (gated) {
            const float *gate = qkv + (size_t)h * q_stride + hd;
            for (int i = 0; i < hd; i++) attended[(size_t)h * hd + i] *= lr_sigmoid(gate[i]);
        }
    }
    lr_project(state, &L->out, attended, out);
    state->scratch_used = mark;
}

/* ---- multi-head latent attention, absorbed decode form (looplm.model.mla) ------------------- */
/* MLA with a ternary kv_up (model.ternary), as the reference's recompute form: every cached latent
 * expanded to its keys and values (kv_up quantises each one per position), then attention.  q: the
 * queries [H, nope + dr] before RoPE (rotated here); o: [H, vd]. */
static void recomputed_latent_attention(LrState *state, const LrLayer *L, float *q, const float *latent,
                                        const float *rope_keys, int pos, float scale, float *o) {
    const LrConfig *c = &state->model->config;
    const int H = c->n_heads, nope = c->mla_nope_dim, vd = c->mla_value_dim, dr = c->mla_rope_dim;
    const int rank = c->mla_kv_rank, n = pos + 1, row = nope + vd;
    const float *cos = state->model->rope_cos + (size_t)pos * dr, *sin = state->model->rope_sin + (size_t)pos * dr;
    float *scores = lr_take(state, (size_t)H * n), *expanded = lr_take(state, (size_t)H * row);
    for (int h = 0; h < H; h++) rope(q + (size_t)h * (nope + dr) + nope, cos, sin, dr);
    for (int l = 0; l < n; l++) {
        lr_project(state, &L->kv_up, latent + (size_t)l * rank, expanded);
        for (int h = 0; h < H; h++) {
            const float *q_nope = q + (size_t)h * (nope + dr);
            scores[(size_t)h * n + l] = (dot(q_nope, expanded + (size_t)h * row, nope)
                                         + dot(q_nope + nope, rope_keys + (size_t)l * dr, dr)) * scale;
        }
    }
    for (int h = 0; h < H; h++) softmax(scores + (size_t)h * n, n);
    memset(o, 0, (size_t)H * vd * sizeof(float));
    for (int l = 0; l < n; l++) {
        lr_project(state, &L->kv_up, latent + (size_t)l * rank, expanded);
        for (int h = 0; h < H; h++) {
            const float weight = scores[(size_t)h * n + l], *v = expanded + (size_t)h * row + nope;
            for (int i = 0; i < vd; i++) o[(size_t)h * vd + i] += weight * v[i];
        }
    }
}

static void latent_attention(LrState *state, const LrLayer *L, const LrSlot *slot, const float *x, int pos, int shared,
                             float *out) {
    const LrConfig *c = &state->model->config;
    const int H = c->n_heads, nope = c->mla_nope_dim, vd = c->mla_value_dim, dr = c->mla_rope_dim;
    const int rank = c->mla_kv_rank, row = nope + vd;  /* kv_up rows per head: [key (nope) ; value (vd)] */
    const size_t mark = state->scratch_used;
    float *q = lr_take(state, (size_t)H * (nope + dr)), *kv = lr_take(state, (size_t)rank + dr);
    float *q_latent = lr_take(state, (size_t)rank), *context = lr_take(state, (size_t)rank);
    float *scores = lr_take(state, (size_t)pos + 1), *o = lr_take(state, (size_t)H * vd);
    const float *cos = state->model->rope_cos + (size_t)pos * dr, *sin = state->model->rope_sin + (size_t)pos * dr;
    if (c->mla_q_rank) {
        float *down = lr_take(state, (size_t)c->mla_q_rank);
        lr_project(state, &L->q_down, x, down);
        lr_rms_norm(down, L->mla_q_norm, down, c->mla_q_rank, c->norm_eps);
        lr_project(state, &L->q_up, down, q);
    } else {
        lr_project(state, &L->q_proj, x, q);
    }
    float *latent = slot->part[LR_PART_KEYS], *rope_keys = slot->part[LR_PART_VALUES];
    if (!shared) {  /* an append-first slot after step 1 reads step 1's latent and rope key of pos */
        lr_project(state, &L->kv_down, x, kv);
        lr_rms_norm(kv, L->kv_norm, latent + (size_t)pos * rank, rank, c->norm_eps);
        rope(kv + rank, cos, sin, dr);
        memcpy(rope_keys + (size_t)pos * dr, kv + rank, (size_t)dr * sizeof(float));
    }
    const float scale = 1.0f / sqrtf((float)(nope + dr));
    if (L->kv_up.p.ternary) {  /* a ternary kv_up quantises each cached latent apart: the recompute form */
        recomputed_latent_attention(state, L, q, latent, rope_keys, pos, scale, o);
        lr_project(state, &L->out, o, out);
        state->scratch_used = mark;
        return;
    }
    for (int h = 0; h < H; h++) {
        float *q_nope = q + (size_t)h * (nope + dr), *q_rope = q_nope + nope;
        rope(q_rope, cos, sin, dr);
        memset(q_latent, 0, (size_t)rank * sizeof(float));  /* q̃ = q_nope · W_uk (the key half of kv_up) */
        for (int n = 0; n < nope; n++) row_axpy(&L->kv_up, h * row + n, q_nope[n], q_latent);
        for (int l = 0; l <= pos; l++)
            scores[l] = (dot(q_latent, latent + (size_t)l * rank, rank) + dot(q_rope, rope_keys + (size_t)l * dr, dr)) * scale;
        softmax(scores, pos + 1);
        memset(context, 0, (size_t)rank * sizeof(float));
        for (int l = 0; l <= pos; l++) {
            const float *cl = latent + (size_t)l * rank;
            for (int i = 0; i < rank; i++) context[i] += scores[l] * cl[i];
        }
        for (int v = 0; v < vd; v++) o[(size_t)h * vd + v] = row_times(&L->kv_up, h * row + nope + v, context);
    }
    lr_project(state, &L->out, o, out);
    state->scratch_used = mark;
}

/* SSC aggregation (looplm.model.gdn.select_and_blend) for one head: keep the top-k of `count`
 * candidate scores, softmax them with the online logit, mix the online output with theirs.
 * work: 2·(count + 1) floats. */
static void select_and_blend(float *online, const float *scores, const float *candidates, int count, float online_logit,
                             int top_k, int dim, float *work) {
    const int k = top_k < count ? top_k : count;
    float *logits = work;
    int *chosen = (int *)(work + count + 1);
    for (int i = 0; i < k; i++) {  /* top-k, largest first; the earlier index wins a tie (as torch.topk here) */
        int best = -1;
        for (int j = 0; j < count; j++) {
            int taken = 0;
            for (int t = 0; t < i; t++) taken |= chosen[t] == j;
            if (!taken && (best < 0 || scores[j] > scores[best])) best = j;
        }
        chosen[i] = best;
    }
    logits[0] = online_logit;
    for (int i = 0; i < k; i++) logits[i + 1] = scores[chosen[i]];
    softmax(logits, k + 1);
    for (int d = 0; d < dim; d++) {
        float mixed = 0.0f;
        for (int i = 0; i < k; i++) mixed += logits[i + 1] * candidates[(size_t)chosen[i] * dim + d];
        online[d] = logits[0] * online[d] + mixed;
    }
}

/* M ∈ R^{dk×dv} of one head: M ← α M + k βᵀ(v − α Mᵀk); returns o = Mᵀ q. */
static void delta_rule(float *M, const float *q, const float *k, const float *v, float g, float beta, int d, float *o,
                       float *update) {
    const float alpha = expf(g);
    for (int i = 0; i < d * d; i++) M[i] *= alpha;
    for (int j = 0; j < d; j++) update[j] = 0.0f;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) update[j] += M[(size_t)i * d + j] * k[i];
    for (int j = 0; j < d; j++) update[j] = beta * (v[j] - update[j]);
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) M[(size_t)i * d + j] += k[i] * update[j];
    for (int j = 0; j < d; j++) o[j] = 0.0f;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) o[j] += M[(size_t)i * d + j] * q[i];
}

/* y = Mᵀ q for one head's state M [d, d]. */
static void read_state(const float *M, const float *q, int d, float *y) {
    for (int j = 0; j < d; j++) y[j] = 0.0f;
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) y[j] += M[(size_t)i * d + j] * q[i];
}

/* ---- Gated DeltaNet (looplm.model.gdn.GatedDeltaNet), recurrent form ------------------------- */
static void gated_deltanet(LrState *state, const LrLayer *L, int slot_index, const float *x, int pos, int step,
                           float *out) {
    const LrConfig *c = &state->model->config;
    const LrSlot *slot = &state->slot[slot_index];
    const int H = c->n_heads, d = c->head_dim, W = H * d, width = 3 * W;
    const size_t mark = state->scratch_used;
    float *projected = lr_take(state, (size_t)L->in_proj.rows), *mixed = lr_take(state, (size_t)width);
    float *o = lr_take(state, (size_t)W), *update = lr_take(state, (size_t)d), *route = lr_take(state, (size_t)W);
    const int candidates_max = (state->segments > state->max_steps ? state->segments : state->max_steps) + 1;
    float *scores = lr_take(state, (size_t)candidates_max), *reads = lr_take(state, (size_t)candidates_max * d);
    float *work = lr_take(state, 2 * (size_t)candidates_max);
    lr_project(state, &L->in_proj, x, projected);
    const float *z = projected + width, *b = z + W, *a = b + H;
    float *history = slot->part[LR_PART_CONV];  /* [3W, 3]: the last three conv inputs per channel */
    for (int ch = 0; ch < width; ch++) {
        const float *w = L->conv + (size_t)ch * LR_CONV;
        float *past = history + (size_t)ch * (LR_CONV - 1);
        float sum = w[0] * past[0] + w[1] * past[1] + w[2] * past[2] + w[3] * projected[ch];
        mixed[ch] = lr_silu(sum);
        past[0] = past[1];
        past[1] = past[2];
        past[2] = projected[ch];
    }
    float *q = mixed, *k = mixed + W, *v = mixed + 2 * W;
    float *M = slot->part[LR_PART_STATE];
    for (int h = 0; h < H; h++) {
        normalize(q + (size_t)h * d, d, 1.0f / sqrtf((float)d));
        normalize(k + (size_t)h * d, d, 1.0f);
        const float g = -expf(L->a_log[h]) * lr_softplus(a[h] + L->dt_bias[h]);
        const float beta = lr_sigmoid(b[h]);
        delta_rule(M + (size_t)h * d * d, q + (size_t)h * d, k + (size_t)h * d, v + (size_t)h * d, g, beta, d,
                   o + (size_t)h * d, update);
    }
    if (c->mc_segment_size) {  /* memory caching along the sequence: completed segments only */
        const int size = c->mc_segment_size, first = pos / size;
        float *segment_states = slot->part[LR_PART_SEGMENT_STATES], *segment_keys = slot->part[LR_PART_SEGMENT_KEYS];
        float *key_sum = slot->part[LR_PART_OPEN_KEY_SUM];
        lr_project(state, &L->memory_router, x, route);
        for (int h = 0; h < H; h++) {
            normalize(route + (size_t)h * d, d, 1.0f);
            if (!first) continue;
            for (int j = 0; j < first; j++) {
                scores[j] = dot(route + (size_t)h * d, segment_keys + ((size_t)j * H + h) * d, d) / sqrtf((float)d);
                read_state(segment_states + ((size_t)j * H + h) * d * d, q + (size_t)h * d, d, reads + (size_t)j * d);
            }
            select_and_blend(o + (size_t)h * d, scores, reads, first, L->memory_online_bias[h], c->mc_top_k, d, work);
        }
        for (int i = 0; i < W; i++) key_sum[i] += k[i];
        if ((pos + 1) % size == 0) {  /* the segment is complete: cache its state and mean key */
            memcpy(segment_states + (size_t)first * H * d * d, M, (size_t)H * d * d * sizeof(float));
            for (int i = 0; i < W; i++) {
                segment_keys[(size_t)first * W + i] = key_sum[i] / (float)size;
                key_sum[i] = 0.0f;
            }
        }
    }
    if (L->looped && c->loop_mc) {  /* loop-axis memory: this layer's earlier loops at this position */
        float *loop_sum = slot->part[LR_PART_LOOP_KEY_SUM];
        for (int i = 0; i < W; i++) loop_sum[i] += k[i];
        if (step > 0) {
            lr_project(state, &L->loop_router, x, route);
            const int layer = slot_index - lr_state_slot(state, LR_CORE, 0, step);
            for (int h = 0; h < H; h++) {
                normalize(route + (size_t)h * d, d, 1.0f);
                for (int s = 0; s < step; s++) {
                    const LrSlot *earlier = &state->slot[lr_state_slot(state, LR_CORE, layer, s)];
                    float *key = reads + (size_t)s * d;  /* the direction of loop s' keys so far */
                    memcpy(key, earlier->part[LR_PART_LOOP_KEY_SUM] + (size_t)h * d, (size_t)d * sizeof(float));
                    normalize(key, d, 1.0f);
                    scores[s] = dot(route + (size_t)h * d, key, d) / sqrtf((float)d);
                    read_state(earlier->part[LR_PART_STATE] + (size_t)h * d * d, q + (size_t)h * d, d, key);
                }
                select_and_blend(o + (size_t)h * d, scores, reads, step, L->loop_online_bias[h], c->loop_mc_top_k, d, work);
            }
        }
    }
    for (int h = 0; h < H; h++) {  /* gated output norm: RMSNorm(o) ⊙ SiLU(z) per head */
        float *oh = o + (size_t)h * d;
        lr_rms_norm(oh, L->out_norm, oh, d, c->norm_eps);
        for (int i = 0; i < d; i++) oh[i] *= lr_silu(z[(size_t)h * d + i]);
    }
    lr_project(state, &L->out, o, out);
    state->scratch_used = mark;
}

/* ---- RWKV-style slot mixer (looplm.model.rwkv.RWKVSlotMixer), recurrent form ----------------- */
static void rwkv_mixer(LrState *state, const LrLayer *L, const LrSlot *slot, const float *zin, float *out) {
    const LrConfig *c = &state->model->config;
    const int D = c->d_model, S = c->rwkv_slots;
    const size_t mark = state->scratch_used;
    float *x = lr_take(state, 3 * (size_t)D), *r = lr_take(state, (size_t)D), *k = lr_take(state, (size_t)D);
    float *v = lr_take(state, (size_t)D), *low = lr_take(state, (size_t)c->rwkv_decay_rank);
    float *decay = lr_take(state, (size_t)D), *write = lr_take(state, (size_t)S), *read = lr_take(state, (size_t)S);
    float *history = slot->part[LR_PART_SHIFT];  /* [4, D]: inputs at t−4 … t−1 */
    float *numerator = slot->part[LR_PART_NUMERATOR], *denominator = slot->part[LR_PART_DENOMINATOR];
    static const int shifts[3] = {1, 2, 4};
    for (int i = 0; i < D; i++) {
        float weights[3], total = 0.0f, shifted = 0.0f;
        for (int s = 0; s < 3; s++) {
            weights[s] = lr_sigmoid(L->time_shift[(size_t)s * D + i]);
            shifted += weights[s] * history[(size_t)(LR_SHIFTS - shifts[s]) * D + i];
        }
        total = weights[0] + weights[1] + weights[2];
        shifted /= total + 1e-6f;
        for (int m = 0; m < 3; m++) {
            float mix = lr_sigmoid(L->time_mix[(size_t)m * D + i]);
            x[(size_t)m * D + i] = mix * zin[i] + (1.0f - mix) * shifted;
        }
    }
    lr_project(state, &L->receptance, x, r);
    lr_project(state, &L->key, x + D, k);
    lr_project(state, &L->value, x + 2 * D, v);
    lr_project(state, &L->decay_down, zin, low);
    lr_project(state, &L->decay_up, low, decay);
    lr_project(state, &L->write_gate, zin, write);
    lr_project(state, &L->read_gate, zin, read);
    softmax(write, S);
    softmax(read, S);
    const float *head_decay = state->model->rwkv_head_decay;
    for (int i = 0; i < D; i++) {
        const float ki = expf(fminf(fmaxf(k[i], -10.0f), 10.0f));
        const float bonus = expf(fminf(fmaxf(L->time_first[i], -10.0f), 10.0f));
        const float y = L->decay_base[i] + decay[i];  /* log σ(y), stably, minus the head's slope */
        const float log_decay = (y >= 0 ? -log1pf(expf(-y)) : y - log1pf(expf(y))) - head_decay[i];
        const float kv = ki * v[i];
        float read_num = 0.0f, read_den = 0.0f;
        for (int s = 0; s < S; s++) {
            read_num += read[s] * numerator[(size_t)s * D + i];
            read_den += read[s] * denominator[(size_t)s * D + i];
        }
        const float wkv = (read_num + bonus * kv) / (read_den + bonus * ki + 1e-6f);
        const float a = expf(log_decay);
        for (int s = 0; s < S; s++) {
            numerator[(size_t)s * D + i] = a * numerator[(size_t)s * D + i] + write[s] * kv;
            denominator[(size_t)s * D + i] = a * denominator[(size_t)s * D + i] + write[s] * ki;
        }
        r[i] = lr_sigmoid(r[i]) * wkv;
    }
    memmove(history, history + D, (size_t)(LR_SHIFTS - 1) * D * sizeof(float));
    memcpy(history + (size_t)(LR_SHIFTS - 1) * D, zin, (size_t)D * sizeof(float));
    lr_project(state, &L->out, r, out);
    state->scratch_used = mark;
}

/* ---- feed-forwards -------------------------------------------------------------------------- */
/* SwiGLU (looplm.model.ffn.SwiGLU): down(silu(gate x) ⊙ up x), gate_up rows [gate; up]. */
static void swiglu(LrState *state, const LrMatrix *gate_up, const LrMatrix *down, const float *x, float *out) {
    const int F = gate_up->rows / 2;
    const size_t mark = state->scratch_used;
    float *hidden = lr_take(state, (size_t)gate_up->rows);
    lr_project(state, gate_up, x, hidden);
    for (int i = 0; i < F; i++) hidden[i] = lr_silu(hidden[i]) * hidden[F + i];
    lr_project(state, down, hidden, out);
    state->scratch_used = mark;
}

/* y = x W for W [rows, cols] (an expert's weight as the MoE stores it, input-major). */
static void vector_matrix(const float *x, const float *W, int rows, int cols, float *y) {
    memset(y, 0, (size_t)cols * sizeof(float));
    for (int i = 0; i < rows; i++) {
        const float *w = W + (size_t)i * cols, a = x[i];
        for (int j = 0; j < cols; j++) y[j] += a * w[j];
    }
}

/* Mixture of experts (looplm.model.moe.MoE) for one token: the top-k of router logits + balancing
 * bias, weighted by their renormalised softmax scores, plus the shared experts. */
static void mixture(LrState *state, const LrLayer *L, const float *x, float *out) {
    const LrConfig *c = &state->model->config;
    const int D = c->d_model, E = c->n_experts, h = c->expert_hidden, k = c->moe_top_k;
    const size_t mark = state->scratch_used;
    float *logits = lr_take(state, (size_t)E), *scores = lr_take(state, (size_t)E);
    float *hidden = lr_take(state, 2 * (size_t)h), *expert = lr_take(state, (size_t)D);
    int *chosen = (int *)lr_take(state, (size_t)k);
    lr_project(state, &L->router, x, logits);
    memcpy(scores, logits, (size_t)E * sizeof(float));
    softmax(scores, E);
    float total = 0.0f;
    for (int i = 0; i < k; i++) {  /* top-k of logits + bias, largest first */
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int t = 0; t < i; t++) taken |= chosen[t] == e;
            if (!taken && (best < 0 || logits[e] + L->balance_bias[e] > logits[best] + L->balance_bias[best])) best = e;
        }
        chosen[i] = best;
        total += scores[best];
    }
    memset(out, 0, (size_t)D * sizeof(float));
    for (int i = 0; i < k; i++) {
        const int e = chosen[i];
        vector_matrix(x, L->experts_gate_up + (size_t)e * D * 2 * h, D, 2 * h, hidden);
        for (int j = 0; j < h; j++) hidden[j] = lr_silu(hidden[j]) * hidden[h + j];
        vector_matrix(hidden, L->experts_down + (size_t)e * h * D, h, D, expert);
        const float weight = scores[e] / total;
        for (int j = 0; j < D; j++) out[j] += expert[j] * weight;
    }
    if (c->n_shared_experts) {
        swiglu(state, &L->shared_gate_up, &L->shared_down, x, expert);
        for (int j = 0; j < D; j++) out[j] += expert[j];
    }
    state->scratch_used = mark;
}

static void feed_forward(LrState *state, const LrLayer *L, const LrSlot *slot, const float *x, float *out) {
    const LrConfig *c = &state->model->config;
    if (L->ffn == LR_FFN_MOE) {
        mixture(state, L, x, out);
        return;
    }
    if (L->ffn == LR_FFN_DENSE) {
        swiglu(state, &L->gate_up, &L->down, x, out);
        return;
    }
    /* ChannelMix: a one-step token shift, then SwiGLU; the slot keeps the previous input */
    const int D = c->d_model;
    const size_t mark = state->scratch_used;
    float *shifted = lr_take(state, (size_t)D), *previous = slot->part[LR_PART_FFN_PREVIOUS];
    for (int i = 0; i < D; i++) {
        const float mix = lr_sigmoid(L->channel_mix[i]);
        shifted[i] = mix * x[i] + (1.0f - mix) * previous[i];
    }
    memcpy(previous, x, (size_t)D * sizeof(float));
    swiglu(state, &L->gate_up, &L->down, shifted, out);
    state->scratch_used = mark;
}

/* σ(gate) ⊙ x + (1 − σ(gate)) ⊙ G (looplm.model.global_gates.GlobalGates.mix). */
static void gate_mix(float *x, const float *global, const float *gate, int n) {
    for (int i = 0; i < n; i++) {
        const float weight = lr_sigmoid(gate[i]);
        x[i] = weight * x[i] + (1.0f - weight) * global[i];
    }
}

/* ---- mHC hyper-connections (looplm.model.residual.HyperConnection) ---------------------------- */
/* The sub-layer's coefficients from the streams H [n·D]: pre [n], post [n], mix [n, n] into
 * `coefficients` [2n + n²], and its input x = Σ_i pre_i H_i [D]. */
static void hyper_read(LrState *state, const LrHyper *hc, const float *streams, float *coefficients, float *x) {
    const LrConfig *c = &state->model->config;
    const int n = c->streams, D = c->d_model;
    const size_t mark = state->scratch_used;
    float *flat = lr_take(state, (size_t)n * D);
    lr_rms_norm(streams, NULL, flat, n * D, c->norm_eps);
    lr_project(state, &hc->router, flat, coefficients);
    float *pre = coefficients, *post = coefficients + n, *mix = coefficients + 2 * n;
    for (int i = 0; i < n; i++) {
        pre[i] = lr_sigmoid(hc->gain[0] * pre[i] + hc->pre_bias[i]);
        post[i] = 2.0f * lr_sigmoid(hc->gain[1] * post[i] + hc->post_bias[i]);
    }
    for (int i = 0; i < n * n; i++) mix[i] = hc->gain[2] * mix[i] + hc->mix_bias[i];
    for (int iteration = 0; iteration < LR_SINKHORN_ITERATIONS; iteration++)  /* log-space Sinkhorn–Knopp */
        for (int axis = 0; axis < 2; axis++)      /* rows (over j), then columns (over i) */
            for (int a = 0; a < n; a++) {
                const int stride = axis ? n : 1, first = axis ? a : a * n;
                float top = -INFINITY, sum = 0.0f;
                for (int b = 0; b < n; b++) top = fmaxf(top, mix[first + b * stride]);
                for (int b = 0; b < n; b++) sum += expf(mix[first + b * stride] - top);
                const float lse = top + logf(sum);
                for (int b = 0; b < n; b++) mix[first + b * stride] -= lse;
            }
    for (int i = 0; i < n * n; i++) mix[i] = expf(mix[i]);
    memset(x, 0, (size_t)D * sizeof(float));
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) x[d] += pre[i] * streams[(size_t)i * D + d];
    state->scratch_used = mark;
}

/* H ← mix · H + post ⊗ update (update [D]). */
static void hyper_write(LrState *state, const float *coefficients, float *streams, const float *update) {
    const LrConfig *c = &state->model->config;
    const int n = c->streams, D = c->d_model;
    const float *post = coefficients + n, *mix = coefficients + 2 * n;
    const size_t mark = state->scratch_used;
    float *mixed = lr_take(state, (size_t)n * D);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) {
            float sum = 0.0f;
            for (int j = 0; j < n; j++) sum += mix[i * n + j] * streams[(size_t)j * D + d];
            mixed[(size_t)i * D + d] = sum + post[i] * update[d];
        }
    memcpy(streams, mixed, (size_t)n * D * sizeof(float));
    state->scratch_used = mark;
}

/* ---- block attention residuals (looplm.model.residual.DepthAttention / DepthSources) ----------- */
void lr_depth_read(LrState *state, const LrDepthQuery *q, const LrDepth *depth, float *x) {
    const LrConfig *c = &state->model->config;
    const int D = c->d_model, count = depth->blocks + depth->partial;
    if (count == 1) {  /* one source: itself (no softmax) */
        memmove(x, depth->values, (size_t)D * sizeof(float));
        return;
    }
    const size_t mark = state->scratch_used;
    float *scores = lr_take(state, (size_t)count), top = -INFINITY, total = 0.0f;
    for (int i = 0; i < count; i++) {  /* w · RMSNorm(V_i) */
        const float *v = depth->values + (size_t)i * D;
        float square = 0.0f, score = 0.0f;
        for (int d = 0; d < D; d++) square += v[d] * v[d];
        const float inverse = 1.0f / sqrtf(square / (float)D + c->norm_eps);
        for (int d = 0; d < D; d++) score += v[d] * inverse * q->key_norm[d] * q->query[d];
        scores[i] = score;
        top = fmaxf(top, score);
    }
    for (int i = 0; i < count; i++) total += scores[i] = expf(scores[i] - top);
    memset(x, 0, (size_t)D * sizeof(float));
    for (int i = 0; i < count; i++) {
        const float *v = depth->values + (size_t)i * D, weight = scores[i] / total;
        for (int d = 0; d < D; d++) x[d] += weight * v[d];
    }
    state->scratch_used = mark;
}

/* The sub-layer's output joins the open block's partial sum; a block's last sub-layer closes it. */
static void depth_write(const LrConfig *c, const LrDepthQuery *q, LrDepth *depth, const float *update) {
    const int D = c->d_model;
    float *partial = depth->values + (size_t)depth->blocks * D;
    if (depth->partial) for (int d = 0; d < D; d++) partial[d] += update[d];
    else memcpy(partial, update, (size_t)D * sizeof(float));
    if (q->closes_block) { depth->blocks++; depth->partial = 0; }
    else depth->partial = 1;
}

/* ---- one layer (looplm.model.block.Layer) ---------------------------------------------------- */
void lr_layer(LrState *state, const LrLayer *L, int slot_index, float *h, int pos, int step, float *gates,
              LrDepth *depth) {
    const LrConfig *c = &state->model->config;
    const int D = c->d_model, n = c->streams;
    const LrSlot *slot = &state->slot[slot_index];
    const size_t mark = state->scratch_used;
    float *x = lr_take(state, (size_t)D), *mixed = lr_take(state, (size_t)D), *ffn = lr_take(state, (size_t)D);
    float *coefficients = n > 1 ? lr_take(state, 2 * (size_t)n + (size_t)n * n) : NULL;
    const int mixing = gates && step > 0;  /* step 0 has no global state yet: the plain layer */
    if (depth) {  /* block attention residuals: the sub-layer reads its query's mix of the depth sources */
        lr_depth_read(state, &L->depth[0], depth, x);
        lr_norm(c, x, L->attn_norm, L->attn_norm_bias, x, D);
    } else if (n > 1) {  /* mHC: h is the n streams; the sub-layer reads Σ pre_i H_i */
        hyper_read(state, &L->hyper[0], h, coefficients, x);
        lr_norm(c, x, L->attn_norm, L->attn_norm_bias, x, D);
    } else {
        lr_norm(c, h, L->attn_norm, L->attn_norm_bias, x, D);
    }
    if (mixing) gate_mix(x, gates, L->g_qk, D);
    if (L->kind == 'G') gated_deltanet(state, L, slot_index, x, pos, step, mixed);
    else if (L->kind == 'R') rwkv_mixer(state, L, slot, x, mixed);
    else if (c->attention == LR_ATTENTION_MLA)
        latent_attention(state, L, slot, x, pos, lr_reads_first_step(state, slot_index), mixed);
    else attention(state, L, slot, x, pos, lr_reads_first_step(state, slot_index), mixed);
    if (L->attn_post_norm) lr_norm(c, mixed, L->attn_post_norm, L->attn_post_norm_bias, mixed, D);
    if (depth) {
        depth_write(c, &L->depth[0], depth, mixed);
        lr_depth_read(state, &L->depth[1], depth, x);
        lr_norm(c, x, L->ffn_norm, L->ffn_norm_bias, x, D);
    } else if (n > 1) {
        hyper_write(state, coefficients, h, mixed);
        hyper_read(state, &L->hyper[1], h, coefficients, x);
        lr_norm(c, x, L->ffn_norm, L->ffn_norm_bias, x, D);
    } else {
        for (int i = 0; i < D; i++) h[i] += mixed[i];
        lr_norm(c, h, L->ffn_norm, L->ffn_norm_bias, x, D);
    }
    if (mixing) gate_mix(x, gates, L->g_ffn, D);
    feed_forward(state, L, slot, x, ffn);
    if (L->ffn_post_norm) lr_norm(c, ffn, L->ffn_post_norm, L->ffn_post_norm_bias, ffn, D);
    if (gates)  /* G_{s+1} = (s·G_s + ½(Δattn + Δffn)) / (s + 1) */
        for (int i = 0; i < D; i++) {
            const float update = 0.5f * (mixed[i] + ffn[i]);
            gates[i] = step == 0 ? update : ((float)step * gates[i] + update) / (float)(step + 1);
        }
    if (depth) depth_write(c, &L->depth[1], depth, ffn);
    else if (n > 1) hyper_write(state, coefficients, h, ffn);
    else for (int i = 0; i < D; i++) h[i] += ffn[i];
    state->scratch_used = mark;
}
