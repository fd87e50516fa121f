/* The model's weights: every tensor bound by its GGUF name (looplm.checkpoint.gguf), checked against
 * the shape the config gives it, and the tables derived from them once all are bound.
 *
 * One list, `layer_targets` / `model_targets`, says which tensors a config uses and where each
 * goes: binding looks a name up in it, finishing checks that every entry was bound. */
#include <math.h>

#include "lr_common.h"
#include "lr_internal.h"

typedef struct {
    const char *name;
    LrMatrix *matrix;       /* a projection (float32 or Q8_0) … */
    const float **vector;   /* … or a float32 tensor read as it lies */
    int ndim;
    int64_t shape[3];
    int ternary;            /* a ternary layer's projection (codes + scale) */
} Target;

#define MAX_TARGETS 64

static void matrix(Target *t, int *n, const char *name, LrMatrix *m, int64_t rows, int64_t cols) {
    t[(*n)++] = (Target){name, m, NULL, 2, {rows, cols, 0}, 0};
}

static void tensor(Target *t, int *n, const char *name, const float **v, int ndim, int64_t a, int64_t b, int64_t c) {
    t[(*n)++] = (Target){name, NULL, v, ndim, {a, b, c}, 0};
}

/* The tensors layer L (of kind L->kind; `looped` for core layers) holds under this config, by the
 * name inside its layer prefix. */
static int layer_targets(const LrConfig *c, LrLayer *L, Target *t) {
    const int64_t D = c->d_model, hd = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads, W = H * hd;
    int n = 0;
    tensor(t, &n, "attn_norm.weight", &L->attn_norm, 1, D, 0, 0);
    tensor(t, &n, "ffn_norm.weight", &L->ffn_norm, 1, D, 0, 0);
    if (c->sandwich) {
        tensor(t, &n, "post_attention_norm.weight", &L->attn_post_norm, 1, D, 0, 0);
        tensor(t, &n, "post_ffw_norm.weight", &L->ffn_post_norm, 1, D, 0, 0);
    }
    if (c->layer_norm) {  /* LayerNorm's biases (their GGUF names keep looplm's own) */
        tensor(t, &n, "attn_norm.bias", &L->attn_norm_bias, 1, D, 0, 0);
        tensor(t, &n, "ffn_norm.bias", &L->ffn_norm_bias, 1, D, 0, 0);
        if (c->sandwich) {
            tensor(t, &n, "attn_post_norm.bias", &L->attn_post_norm_bias, 1, D, 0, 0);
            tensor(t, &n, "ffn_post_norm.bias", &L->ffn_post_norm_bias, 1, D, 0, 0);
        }
    }
    if (L->looped && c->global_gates) {
        tensor(t, &n, "global_gates.g_qk", &L->g_qk, 1, D, 0, 0);
        tensor(t, &n, "global_gates.g_ffn", &L->g_ffn, 1, D, 0, 0);
    }
    if (L->kind == 'A' && c->attention == LR_ATTENTION_MLA) {
        const int64_t nope = c->mla_nope_dim, vd = c->mla_value_dim, query = H * (nope + c->mla_rope_dim);
        if (c->mla_q_rank) {
            matrix(t, &n, "attn.q_down.weight", &L->q_down, c->mla_q_rank, D);
            tensor(t, &n, "attn_q_norm.weight", &L->mla_q_norm, 1, c->mla_q_rank, 0, 0);
            matrix(t, &n, "attn.q_up.weight", &L->q_up, query, c->mla_q_rank);
        } else {
            matrix(t, &n, "attn.q_proj.weight", &L->q_proj, query, D);
        }
        matrix(t, &n, "attn.kv_down.weight", &L->kv_down, c->mla_kv_rank + c->mla_rope_dim, D);
        tensor(t, &n, "attn.kv_norm.weight", &L->kv_norm, 1, c->mla_kv_rank, 0, 0);
        matrix(t, &n, "attn.kv_up.weight", &L->kv_up, H * (nope + vd), c->mla_kv_rank);
        matrix(t, &n, "attn_output.weight", &L->out, D, H * vd);
    } else if (L->kind == 'A') {
        const int gated = c->attention == LR_ATTENTION_GATED;
        matrix(t, &n, "attn_qkv.weight", &L->qkv, (H * (gated ? 2 : 1) + 2 * Hkv) * hd, D);
        matrix(t, &n, "attn_output.weight", &L->out, D, W);
        if (gated) {
            tensor(t, &n, "attn_q_norm.weight", &L->q_norm, 1, hd, 0, 0);
            tensor(t, &n, "attn_k_norm.weight", &L->k_norm, 1, hd, 0, 0);
        }
    } else if (L->kind == 'G') {
        matrix(t, &n, "attn.in_proj.weight", &L->in_proj, 4 * W + 2 * H, D);
        tensor(t, &n, "attn.conv.weight", &L->conv, 3, 3 * W, 1, LR_CONV);
        tensor(t, &n, "attn.a_log", &L->a_log, 1, H, 0, 0);
        tensor(t, &n, "attn.dt_bias", &L->dt_bias, 1, H, 0, 0);
        tensor(t, &n, "attn.out_norm.weight", &L->out_norm, 1, hd, 0, 0);
        matrix(t, &n, "attn_output.weight", &L->out, D, W);
        if (c->mc_segment_size) {
            matrix(t, &n, "attn.memory_router.weight", &L->memory_router, W, D);
            tensor(t, &n, "attn.memory_online_bias", &L->memory_online_bias, 1, H, 0, 0);
        }
        if (L->looped && c->loop_mc) {
            matrix(t, &n, "attn.loop_router.weight", &L->loop_router, W, D);
            tensor(t, &n, "attn.loop_online_bias", &L->loop_online_bias, 1, H, 0, 0);
        }
    } else {  /* 'R' */
        tensor(t, &n, "attn.time_shift", &L->time_shift, 2, 3, D, 0);
        tensor(t, &n, "attn.time_mix", &L->time_mix, 2, 3, D, 0);
        matrix(t, &n, "attn.decay_down.weight", &L->decay_down, c->rwkv_decay_rank, D);
        matrix(t, &n, "attn.decay_up.weight", &L->decay_up, D, c->rwkv_decay_rank);
        tensor(t, &n, "attn.decay_base", &L->decay_base, 1, D, 0, 0);
        tensor(t, &n, "attn.time_first", &L->time_first, 1, D, 0, 0);
        matrix(t, &n, "attn.receptance.weight", &L->receptance, D, D);
        matrix(t, &n, "attn.key.weight", &L->key, D, D);
        matrix(t, &n, "attn.value.weight", &L->value, D, D);
        matrix(t, &n, "attn_output.weight", &L->out, D, D);
        matrix(t, &n, "attn.write_gate.weight", &L->write_gate, c->rwkv_slots, D);
        matrix(t, &n, "attn.read_gate.weight", &L->read_gate, c->rwkv_slots, D);
    }
    if (L->ffn == LR_FFN_MOE) {
        const int64_t E = c->n_experts, h = c->expert_hidden, sh = c->shared_expert_hidden;
        matrix(t, &n, "ffn.router.weight", &L->router, E, D);
        tensor(t, &n, "ffn.experts_gate_up", &L->experts_gate_up, 3, E, D, 2 * h);
        tensor(t, &n, "ffn.experts_down", &L->experts_down, 3, E, h, D);
        tensor(t, &n, "ffn.balance_bias", &L->balance_bias, 1, E, 0, 0);
        if (c->n_shared_experts) {
            matrix(t, &n, "ffn.shared.gate_up.weight", &L->shared_gate_up, 2 * sh * c->n_shared_experts, D);
            matrix(t, &n, "ffn.shared.down.weight", &L->shared_down, D, sh * c->n_shared_experts);
        }
    } else {
        matrix(t, &n, "ffn_gate_up.weight", &L->gate_up, 2 * (int64_t)c->ffn_hidden, D);
        matrix(t, &n, "ffn_down.weight", &L->down, D, c->ffn_hidden);
        if (L->ffn == LR_FFN_CHANNELMIX) tensor(t, &n, "ffn.channel_mix", &L->channel_mix, 1, D, 0, 0);
    }
    /* model.ternary swaps every nn.Linear of the mixer and the FFN for a BitLinear but the MoE
     * router (looplm.model.bitlinear.ternary_layers): every projection above */
    for (int i = 0; i < n; i++)
        t[i].ternary = L->ternary && t[i].matrix && strcmp(t[i].name, "ffn.router.weight") != 0;
    if (c->streams > 1) {  /* mHC: each sub-layer's coefficients (float routers, never ternary) */
        const int64_t S = c->streams;
        static const char *const names[2][5] = {
            {"attn_residual.router.weight", "attn_residual.gain", "attn_residual.pre_bias", "attn_residual.post_bias",
             "attn_residual.mix_bias"},
            {"ffn_residual.router.weight", "ffn_residual.gain", "ffn_residual.pre_bias", "ffn_residual.post_bias",
             "ffn_residual.mix_bias"}};
        for (int j = 0; j < 2; j++) {
            LrHyper *hc = &L->hyper[j];
            matrix(t, &n, names[j][0], &hc->router, 2 * S + S * S, S * D);
            tensor(t, &n, names[j][1], &hc->gain, 1, 3, 0, 0);
            tensor(t, &n, names[j][2], &hc->pre_bias, 1, S, 0, 0);
            tensor(t, &n, names[j][3], &hc->post_bias, 1, S, 0, 0);
            tensor(t, &n, names[j][4], &hc->mix_bias, 2, S, S, 0);
        }
    }
    if (c->attnres_block_size) {  /* block attention residuals: each sub-layer's query and key norm */
        tensor(t, &n, "attn_residual.query", &L->depth[0].query, 1, D, 0, 0);
        tensor(t, &n, "attn_residual.key_norm.weight", &L->depth[0].key_norm, 1, D, 0, 0);
        tensor(t, &n, "ffn_residual.query", &L->depth[1].query, 1, D, 0, 0);
        tensor(t, &n, "ffn_residual.key_norm.weight", &L->depth[1].key_norm, 1, D, 0, 0);
    }
    return n;
}

/* The tensors outside the layers. */
static int model_targets(LrModel *m, Target *t) {
    const LrConfig *c = &m->config;
    const int64_t D = c->d_model;
    int n = 0;
    matrix(t, &n, "token_embd.weight", &m->embedding, c->vocab, D);
    if (!c->tie_embeddings) matrix(t, &n, "output.weight", &m->head, c->vocab, D);
    tensor(t, &n, "output_norm.weight", &m->final_norm, 1, D, 0, 0);
    if (c->layer_norm) tensor(t, &n, "norm.bias", &m->final_norm_bias, 1, D, 0, 0);
    if (c->embed_norm) {
        tensor(t, &n, "embed_norm.weight", &m->embed_norm, 1, D, 0, 0);
        if (c->layer_norm) tensor(t, &n, "embed_norm.bias", &m->embed_norm_bias, 1, D, 0, 0);
    }
    if (c->exit_gate) {
        tensor(t, &n, "exit_gate.weight", &m->gate_weight, 2, 1, D, 0);
        tensor(t, &n, "exit_gate.bias", &m->gate_bias, 1, 1, 0, 0);
    }
    if (c->injection == LR_INJECT_LTI || c->injection == LR_INJECT_LTI_RESIDUAL) {
        const int residual = c->injection == LR_INJECT_LTI_RESIDUAL;  /* one log_dt for all channels */
        tensor(t, &n, "injection.log_a", &m->lti_log_a, 1, D, 0, 0);
        tensor(t, &n, "injection.log_dt", &m->lti_log_dt, 1, residual ? 1 : D, 0, 0);
        tensor(t, &n, "injection.b", &m->lti_b, 1, D, 0, 0);
        if (residual) {
            tensor(t, &n, "injection.input_norm.weight", &m->inject_norm, 1, D, 0, 0);
            if (c->layer_norm) tensor(t, &n, "injection.input_norm.bias", &m->inject_norm_bias, 1, D, 0, 0);
        }
    } else if (c->injection == LR_INJECT_DIAGONAL) {
        tensor(t, &n, "injection.a_log", &m->diag_a_log, 1, D, 0, 0);
        tensor(t, &n, "injection.dt", &m->diag_dt, 1, D, 0, 0);
        matrix(t, &n, "injection.b.weight", &m->diag_b, D, D);
    } else if (c->injection == LR_INJECT_CONCAT) {
        matrix(t, &n, "injection.adapter.weight", &m->concat_adapter, D, 2 * D);
    }
    if (c->depth_lora_rank) {
        matrix(t, &n, "depth_lora.down.weight", &m->lora_down, c->depth_lora_rank, D);
        matrix(t, &n, "depth_lora.up.weight", &m->lora_up, D, c->depth_lora_rank);
        tensor(t, &n, "depth_lora.scale", &m->lora_scale, 2, c->loop_steps, c->depth_lora_rank, 0);
    }
    if (c->noise_initial_state)  /* one row per position of the whole state (every mHC stream) */
        tensor(t, &n, "noise.table", &m->noise_table, 2, c->max_seq_len, D * c->streams, 0);
    if (c->attnres_block_size) {  /* block attention residuals: each non-empty stack's output query */
        static const char *const names[3][2] = {
            {"stack_outputs.prelude.query", "stack_outputs.prelude.key_norm.weight"},
            {"stack_outputs.core.query", "stack_outputs.core.key_norm.weight"},
            {"stack_outputs.coda.query", "stack_outputs.coda.key_norm.weight"}};
        const int counts[3] = {c->prelude, c->core, c->coda};
        for (int s = 0; s < 3; s++)
            if (counts[s]) {
                tensor(t, &n, names[s][0], &m->stack_output[s].query, 1, D, 0, 0);
                tensor(t, &n, names[s][1], &m->stack_output[s].key_norm, 1, D, 0, 0);
            }
    }
    return n;
}

int lr_model_own(LrModel *model, void *memory, char *error) {
    if (!memory) return lr_fail(error, "out of memory");
    if (model->owned_count == model->owned_capacity) {
        int capacity = model->owned_capacity ? 2 * model->owned_capacity : 64;
        void **owned = realloc(model->owned, (size_t)capacity * sizeof(void *));
        if (!owned) { free(memory); return lr_fail(error, "out of memory"); }
        model->owned = owned;
        model->owned_capacity = capacity;
    }
    model->owned[model->owned_count++] = memory;
    return 1;
}

LrModel *lr_model_new(const char *config_json, size_t length, char *error) {
    LrModel *model = lr_calloc(1, sizeof(LrModel), error);
    if (!model) return NULL;
    if (!lr_config_parse(config_json, length, &model->config, error)) { free(model); return NULL; }
    const LrConfig *c = &model->config;
    model->prelude = lr_calloc((size_t)c->prelude + 1, sizeof(LrLayer), error);
    model->core = lr_calloc((size_t)c->core, sizeof(LrLayer), error);
    model->coda = lr_calloc((size_t)c->coda + 1, sizeof(LrLayer), error);
    if (!model->prelude || !model->core || !model->coda) { lr_model_free(model); return NULL; }
    const int outer = c->ternary == LR_TERNARY_ALL, inner = c->ternary != LR_TERNARY_NONE;
    const int outer_ffn = c->ffn == LR_FFN_MOE && c->moe_core ? LR_FFN_DENSE : c->ffn;
    for (int i = 0; i < c->prelude; i++) {
        model->prelude[i].kind = lr_layer_kind(c, i);
        model->prelude[i].ternary = outer;
        model->prelude[i].ffn = outer_ffn;
    }
    for (int i = 0; i < c->core; i++) {
        model->core[i].kind = lr_layer_kind(c, i);
        model->core[i].looped = 1;
        model->core[i].ternary = inner;
        model->core[i].ffn = c->ffn;
    }
    for (int i = 0; i < c->coda; i++) {
        model->coda[i].kind = lr_layer_kind(c, i);
        model->coda[i].ternary = outer;
        model->coda[i].ffn = outer_ffn;
    }
    if (c->attnres_block_size) {  /* sub-layers 2i and 2i + 1 of a stack; a block ends every s of them */
        LrLayer *stacks[] = {model->prelude, model->core, model->coda};
        const int counts[] = {c->prelude, c->core, c->coda};
        for (int s = 0; s < 3; s++)
            for (int i = 0; i < counts[s]; i++)
                for (int j = 0; j < 2; j++)
                    stacks[s][i].depth[j].closes_block = (2 * i + j + 1) % c->attnres_block_size == 0;
    }
    return model;
}

/* The layer a name's prefix names ("blk.3." etc.), and the rest of the name; NULL when the name
 * has no layer prefix. */
static LrLayer *layer_of(LrModel *model, const char *name, const char **inner, char *error, int *bad) {
    static const char *const prefixes[] = {"prelude_blk.", "blk.", "coda_blk."};
    const LrConfig *c = &model->config;
    LrLayer *stacks[] = {model->prelude, model->core, model->coda};
    const int counts[] = {c->prelude, c->core, c->coda};
    for (int s = 0; s < 3; s++) {
        size_t n = strlen(prefixes[s]);
        if (strncmp(name, prefixes[s], n) != 0) continue;
        char *end;
        long index = strtol(name + n, &end, 10);
        if (end == name + n || *end != '.' || index < 0 || index >= counts[s]) {
            *bad = 1;
            lr_fail(error, "tensor %s names a layer the config does not have", name);
            return NULL;
        }
        *inner = end + 1;
        return &stacks[s][index];
    }
    return NULL;
}

static int projection_bound(const Projection *p) { return p->weights || p->values || p->ternary; }

/* A ternary layer's float32 (shadow) weight W [rows, cols] as its codes and scale, as
 * looplm.model.bitlinear.ternary_codes: s = max(mean|W|, 1e-5), c = clamp(round(W / s), −1, 1)
 * (nearest even), packed in looplm's 2-bit layout.  The mean is summed in double: torch's float32
 * sum differs from it by rounding only. */
static int ternarize(LrModel *model, LrMatrix *m, const float *W, char *error) {
    const size_t rows = (size_t)m->rows, cols = (size_t)m->cols, width = (cols + 3) / 4;
    double total = 0.0;
    for (size_t i = 0; i < rows * cols; i++) total += fabs((double)W[i]);
    const float scale = fmaxf((float)(total / (double)(rows * cols)), TERNARY_SCALE_FLOOR);
    const size_t bytes = rows * width;
    uint8_t *packed = malloc(bytes ? bytes : 1);
    if (!lr_model_own(model, packed, error)) return 0;
    memset(packed, 0x55, bytes);  /* every field 1: code 0 (the padding past cols) */
    for (size_t r = 0; r < rows; r++)
        for (size_t i = 0; i < cols; i++) {
            float code = nearbyintf(W[r * cols + i] / scale);
            code = code > 1.0f ? 1.0f : code < -1.0f ? -1.0f : code;
            uint8_t *byte = packed + r * width + i / 4;
            const int shift = 2 * (int)(i % 4);
            *byte = (uint8_t)((*byte & ~(3u << shift)) | (unsigned)((int)code + 1) << shift);
        }
    m->p.ternary = packed;
    m->p.ternary_scale = scale;
    return 1;
}

int lr_model_bind(LrModel *model, const char *name, int kind, const void *data, const float *scales, int ndim,
                  const int64_t *shape, char *error) {
    Target targets[MAX_TARGETS];
    const char *inner = name;
    int bad = 0;
    LrLayer *layer = layer_of(model, name, &inner, error, &bad);
    if (bad) return 0;
    int count = layer ? layer_targets(&model->config, layer, targets) : model_targets(model, targets);
    for (int i = 0; i < count; i++) {
        Target *t = &targets[i];
        if (strcmp(t->name, inner) != 0) continue;
        int same = ndim == t->ndim;
        for (int d = 0; same && d < ndim; d++) same = shape[d] == t->shape[d];
        if (!same) {
            char got[64] = "", want[64] = "";
            for (int d = 0; d < ndim && d < 4; d++) snprintf(got + strlen(got), 16, d ? ", %lld" : "%lld", (long long)shape[d]);
            for (int d = 0; d < t->ndim; d++) snprintf(want + strlen(want), 16, d ? ", %lld" : "%lld", (long long)t->shape[d]);
            return lr_fail(error, "tensor %s has shape [%s], the config needs [%s]", name, got, want);
        }
        if (t->matrix) {
            if (projection_bound(&t->matrix->p)) return lr_fail(error, "tensor %s given twice", name);
            if (kind == LR_BIND_Q8_0 && (t->shape[1] % BLOCK || !scales))
                return lr_fail(error, "tensor %s: Q8_0 needs rows a multiple of %d long and scales", name, BLOCK);
            if (kind == LR_BIND_TERNARY && (!t->ternary || !scales))
                return lr_fail(error, "tensor %s: ternary codes are read for the projections of model.ternary's"
                                      " layers only, with their scale", name);
            if (t->ternary && kind == LR_BIND_Q8_0)
                return lr_fail(error, "tensor %s belongs to a ternary layer: store it as f32 or ternary, not q8_0",
                               name);
            t->matrix->rows = (int)t->shape[0];
            t->matrix->cols = (int)t->shape[1];
            if (kind == LR_BIND_TERNARY) {
                t->matrix->p.ternary = data;
                t->matrix->p.ternary_scale = *scales;
                return 1;
            }
            if (t->ternary) return ternarize(model, t->matrix, data, error);
            t->matrix->p.weights = kind == LR_BIND_F32 ? data : NULL;
            t->matrix->p.values = kind == LR_BIND_Q8_0 ? data : NULL;
            t->matrix->p.scales = kind == LR_BIND_Q8_0 ? scales : NULL;
        } else {
            if (kind != LR_BIND_F32) return lr_fail(error, "tensor %s must be float (it is not a projection)", name);
            if (*t->vector) return lr_fail(error, "tensor %s given twice", name);
            *t->vector = data;
        }
        return 1;
    }
    return lr_fail(error, "tensor %s is not used by this model's config (a feature this runtime does not know?)", name);
}

static int bound(const Target *t) {
    return t->matrix ? projection_bound(&t->matrix->p) : *t->vector != NULL;
}

/* Zero-centred norms (Qwen3.5) scale by 1 + w: keep that sum once instead of adding per token. */
static int center(LrModel *model, const float **norm, int n, char *error) {
    if (!model->config.zero_centered_norm || !*norm) return 1;
    float *scale = malloc((size_t)n * sizeof(float));
    if (!lr_model_own(model, scale, error)) return 0;
    for (int i = 0; i < n; i++) scale[i] = 1.0f + (*norm)[i];
    *norm = scale;
    return 1;
}

static int center_layer(LrModel *model, LrLayer *L, char *error) {
    const LrConfig *c = &model->config;
    const float **norms[] = {&L->attn_norm, &L->attn_post_norm, &L->ffn_norm, &L->ffn_post_norm, &L->q_norm,
                             &L->k_norm, &L->mla_q_norm, &L->kv_norm, &L->out_norm, &L->depth[0].key_norm,
                             &L->depth[1].key_norm};
    const int sizes[] = {c->d_model, c->d_model, c->d_model, c->d_model, c->head_dim, c->head_dim, c->mla_q_rank,
                         c->mla_kv_rank, c->head_dim, c->d_model, c->d_model};
    for (int i = 0; i < 11; i++)
        if (!center(model, norms[i], sizes[i], error)) return 0;
    return 1;
}

static float *owned_floats(LrModel *model, size_t n, char *error) {
    float *memory = calloc(n ? n : 1, sizeof(float));
    return lr_model_own(model, memory, error) ? memory : NULL;
}

/* The derived tables: RoPE, injection decays (float32, capped one epsilon below 1), RWKV head
 * decays.  Computed as looplm computes them (RoPE angles and the loop signal in float64). */
static int derive(LrModel *model, char *error) {
    const LrConfig *c = &model->config;
    const int D = c->d_model, r = c->rope_dim, L = c->max_seq_len;
    model->rope_cos = owned_floats(model, (size_t)L * r, error);
    model->rope_sin = owned_floats(model, (size_t)L * r, error);
    if (!model->rope_cos || !model->rope_sin) return 0;
    for (int i = 0; i < r / 2; i++) {
        double inverse_frequency = 1.0 / pow(c->rope_theta, (double)(2 * i) / r);
        for (int p = 0; p < L; p++) {
            double angle = (double)p * inverse_frequency;
            model->rope_cos[(size_t)p * r + i] = model->rope_cos[(size_t)p * r + i + r / 2] = (float)cos(angle);
            model->rope_sin[(size_t)p * r + i] = model->rope_sin[(size_t)p * r + i + r / 2] = (float)sin(angle);
        }
    }
    const float cap = 1.0f - 1.1920928955078125e-07f;  /* 1 − float32 epsilon */
    const int lti = c->injection == LR_INJECT_LTI || c->injection == LR_INJECT_LTI_RESIDUAL;
    if (lti || c->injection == LR_INJECT_DIAGONAL) {
        model->inject_decay = owned_floats(model, (size_t)D, error);
        model->inject_input_scale = owned_floats(model, (size_t)D, error);
        if (!model->inject_decay || !model->inject_input_scale) return 0;
        for (int i = 0; i < D; i++) {
            float decay;
            if (lti) {
                const float log_dt = model->lti_log_dt[c->injection == LR_INJECT_LTI_RESIDUAL ? 0 : i];
                float exponent = fminf(fmaxf(log_dt + model->lti_log_a[i], -20.0f), 20.0f);
                decay = expf(-expf(exponent));
                model->inject_input_scale[i] = model->lti_b[i];
            } else {
                float step = lr_softplus(model->diag_dt[i]);
                float rate = expf(fminf(fmaxf(model->diag_a_log[i], -20.0f), 20.0f));
                decay = expf(-step * rate);
                model->inject_input_scale[i] = step;
            }
            model->inject_decay[i] = fminf(decay, cap);
        }
    }
    int rwkv = strchr(c->layer_pattern, 'R') != NULL;
    if (rwkv) {
        model->rwkv_head_decay = owned_floats(model, (size_t)D, error);
        if (!model->rwkv_head_decay) return 0;
        const int per_head = D / c->n_heads;
        for (int i = 0; i < D; i++)
            model->rwkv_head_decay[i] = powf(2.0f, -8.0f * (float)(i / per_head + 1) / (float)c->n_heads);
    }
    return 1;
}

int lr_model_finish(LrModel *model, char *error) {
    Target targets[MAX_TARGETS];
    const LrConfig *c = &model->config;
    LrLayer *stacks[] = {model->prelude, model->core, model->coda};
    const int counts[] = {c->prelude, c->core, c->coda};
    static const char *const prefixes[] = {"prelude_blk", "blk", "coda_blk"};
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < counts[s]; i++) {
            int n = layer_targets(c, &stacks[s][i], targets);
            for (int j = 0; j < n; j++)
                if (!bound(&targets[j]))
                    return lr_fail(error, "tensor %s.%d.%s is missing", prefixes[s], i, targets[j].name);
            if (!center_layer(model, &stacks[s][i], error)) return 0;
        }
    int n = model_targets(model, targets);
    for (int j = 0; j < n; j++)
        if (!bound(&targets[j])) {
            if (strcmp(targets[j].name, "noise.table") == 0)
                return lr_fail(error, "tensor noise.table is missing: initial_state=noise needs the eval noise table"
                                      " (files exported by an older looplm lack it: export the model again)");
            return lr_fail(error, "tensor %s is missing", targets[j].name);
        }
    if (c->tie_embeddings) model->head = model->embedding;
    if (!center(model, &model->final_norm, c->d_model, error) || !center(model, &model->embed_norm, c->d_model, error) ||
        !center(model, &model->inject_norm, c->d_model, error))
        return 0;
    for (int s = 0; s < 3; s++)  /* attention residuals' key norms are RMSNorms of the config's centring too */
        if (!center(model, &model->stack_output[s].key_norm, c->d_model, error)) return 0;
    if (!derive(model, error)) return 0;
    model->finished = 1;
    return 1;
}

void lr_model_free(LrModel *model) {
    if (!model) return;
    for (int i = 0; i < model->owned_count; i++) free(model->owned[i]);
    free(model->owned);
    free(model->prelude);
    free(model->core);
    free(model->coda);
    free(model);
}
