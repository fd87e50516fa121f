/* The decoding state: cache slots in looplm.cache.KVCache's layout, and the KV layouts' rules for
 * a finished position (KVCache.after_step / finish / _fill_skipped).
 *
 * Slots: prelude layer i → i; core layer l at step t → P + t·(N + C) + l; coda layer l at step t
 * → P + t·(N + C) + N + l.  Attention slots of the loop share K/V storage by layout group: step t
 * uses group t (last_exited, full), t mod K (modulo) or 0 (last, first, avg; append_first for core
 * layers, whose steps after the first read step 1's K/V and write none, lr_reads_first_step; its coda
 * layers keep per-step groups); recurrent states and the ChannelMix input are per slot under every
 * layout. */
#include "lr_common.h"
#include "lr_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int lr_state_slot(const LrState *state, int stage, int layer, int step) {
    const LrConfig *c = &state->model->config;
    if (stage == LR_PRELUDE) return layer;
    return c->prelude + step * state->per_step + (stage == LR_CODA ? c->core : 0) + layer;
}

/* The K/V group loop step `step` uses for the layer at `offset` of the loop's per-step slots. */
static int group_of(const LrState *state, int step, int offset) {
    if (state->layout == LR_APPEND_FIRST && offset < state->model->config.core) return 0;
    return state->groups == state->max_steps ? step : step % state->groups;
}

int lr_reads_first_step(const LrState *state, int slot) {
    const LrConfig *c = &state->model->config;
    if (state->layout != LR_APPEND_FIRST || slot < c->prelude || state->slot[slot].kind != 'A') return 0;
    return (slot - c->prelude) / state->per_step > 0 && (slot - c->prelude) % state->per_step < c->core;
}

/* Floats of each part of a slot of kind `kind` (0 where the kind has no such part). */
static size_t part_floats(const LrState *state, char kind, int part) {
    const LrConfig *c = &state->model->config;
    const size_t D = c->d_model, H = c->n_heads, d = c->head_dim, W = H * d, L = state->max_len;
    if (part == LR_PART_FFN_PREVIOUS) return c->ffn == LR_FFN_CHANNELMIX ? D : 0;
    if (kind == 'A') {
        if (part > LR_PART_VALUES) return 0;
        if (c->attention == LR_ATTENTION_MLA) return L * (part == LR_PART_KEYS ? c->mla_kv_rank : c->mla_rope_dim);
        return (size_t)c->n_kv_heads * L * d;
    }
    if (kind == 'G') {
        const size_t segments = state->segments;
        switch (part) {
            case LR_PART_CONV: return 3 * W * (LR_CONV - 1);
            case LR_PART_STATE: return H * d * d;
            case LR_PART_SEGMENT_STATES: return c->mc_segment_size ? segments * H * d * d : 0;
            case LR_PART_SEGMENT_KEYS: return c->mc_segment_size ? segments * W : 0;
            case LR_PART_OPEN_KEY_SUM: return c->mc_segment_size ? W : 0;
            case LR_PART_LOOP_KEY_SUM: return c->loop_mc ? W : 0;
        }
        return 0;
    }
    switch (part) {  /* 'R' */
        case LR_PART_SHIFT: return LR_SHIFTS * D;
        case LR_PART_NUMERATOR: case LR_PART_DENOMINATOR: return (size_t)c->rwkv_slots * D;
    }
    return 0;
}

/* Whether some layer of the model is of kind `kind` (the pattern repeats: its first layers tell). */
static int has_layer_kind(const LrConfig *c, char kind) {
    int most = c->prelude > c->core ? c->prelude : c->core;
    if (c->coda > most) most = c->coda;
    for (int i = 0; i < most && i < LR_MAX_PATTERN; i++)
        if (lr_layer_kind(c, i) == kind) return 1;
    return 0;
}

size_t lr_scratch_floats(const LrModel *model, int max_len, int max_steps) {
    /* The deepest chain of lr_take calls: run_token → lr_core_step → one of (injection, a layer
     * → its mixer or its FFN, depth LoRA); each piece rounded up to 16 floats (PAD). */
    const LrConfig *c = &model->config;
    const size_t PAD = 16, D = c->d_model, H = c->n_heads, d = c->head_dim, W = H * d, L = max_len;
    const size_t segments = c->mc_segment_size ? L / c->mc_segment_size + 1 : 1;
    const size_t candidates = (segments > (size_t)max_steps ? segments : (size_t)max_steps) + 1;
    const size_t attention = (2 * H + 2 * (size_t)c->n_kv_heads) * d + H * d + H * (L + 1) + 3 * PAD;
    size_t md = d;  /* MLA's widest per-head width */
    if ((size_t)c->mla_nope_dim > md) md = (size_t)c->mla_nope_dim;
    if ((size_t)c->mla_value_dim > md) md = (size_t)c->mla_value_dim;
    const size_t latent = H * (md + c->mla_rope_dim) + 3 * (size_t)c->mla_kv_rank + c->mla_rope_dim + L + 1 + H * md
                          + c->mla_q_rank + H * (L + 1) + 2 * H * md + 9 * PAD;  /* + the ternary recompute form's */
    const size_t deltanet = 4 * W + 2 * H + 3 * W + W + d + W + candidates * (d + 3) + 8 * PAD;
    const size_t rwkv = 7 * D + c->rwkv_decay_rank + 2 * (size_t)c->rwkv_slots + 8 * PAD;
    const int dense = c->ffn != LR_FFN_MOE || (c->moe_core && (c->prelude || c->coda));  /* a layer reads ffn_hidden */
    size_t hidden = dense ? (size_t)c->ffn_hidden : 0;
    if (c->ffn == LR_FFN_MOE && (size_t)c->shared_expert_hidden * c->n_shared_experts > hidden)
        hidden = (size_t)c->shared_expert_hidden * c->n_shared_experts;
    const size_t swiglu = 2 * hidden + PAD;
    const size_t mixture = 2 * (size_t)c->n_experts + 2 * (size_t)c->expert_hidden + D + c->moe_top_k + 5 * PAD + swiglu;
    size_t largest = attention;
    /* only the mixers and FFNs the model has: an unused feature's sizes are bound by no tensor */
    const size_t parts[] = {c->attention == LR_ATTENTION_MLA ? latent : 0, deltanet, has_layer_kind(c, 'R') ? rwkv : 0,
                            D + PAD + swiglu, c->ffn == LR_FFN_MOE ? mixture : 0};
    for (int i = 0; i < 5; i++) largest = parts[i] > largest ? parts[i] : largest;
    const size_t n = c->streams, SD = n * D;  /* mHC: the state is n streams */
    const size_t hyper = n > 1 ? 2 * n + n * n + PAD + SD + PAD : 0;  /* coefficients, then read's or write's */
    size_t stack = c->prelude > c->core ? c->prelude : c->core;  /* attention residuals: a pass's sources */
    if ((size_t)c->coda > stack) stack = c->coda;
    const size_t sources = c->attnres_block_size ? (2 * stack + 2) * D + PAD : 0;
    const size_t scores = c->attnres_block_size ? 2 * stack + 2 + PAD : 0;   /* lr_depth_read's */
    const size_t layer = 3 * D + 3 * PAD + largest + hyper + scores + sources;
    size_t step = layer;  /* lr_core_step's own update, then the largest of what it calls */
    if (2 * D + PAD > step) step = 2 * D + PAD;
    if (c->depth_lora_rank + D + 2 * PAD > step) step = c->depth_lora_rank + D + 2 * PAD;
    return 2 * SD + 2 * D + c->vocab + 5 * PAD + 2 * (SD + PAD) + step + PAD;  /* core step: its update and input */
}

/* 1 + the earlier slot whose K/V storage slot `s` shares for part `p`, or 0 when it has its own. */
static int shares_storage(const LrState *state, int s, int p) {
    const LrSlot *slot = &state->slot[s];
    if (slot->kind != 'A' || p > LR_PART_VALUES) return 0;
    for (int t = 0; t < s; t++)
        if (state->slot[t].kind == 'A' && state->slot[t].storage == slot->storage) return t + 1;
    return 0;
}

LrState *lr_state_new(const LrModel *model, int max_len, int max_steps, int layout, int modulo_slots, int allocate,
                      char *error) {
    const LrConfig *c = &model->config;
    if (!model->finished) { lr_fail(error, "the model is not finished (lr_model_finish)"); return NULL; }
    if (max_len < 1 || max_len > c->max_seq_len)
        { lr_fail(error, "a state for %d positions: the model's context is %d", max_len, c->max_seq_len); return NULL; }
    if (max_steps < 1) { lr_fail(error, "steps must be >= 1, got %d", max_steps); return NULL; }
    if (c->kv_append_first) layout = LR_APPEND_FIRST;  /* the model attends to step-1 K/V: nothing else to keep */
    if (layout < LR_LAST_EXITED || layout > LR_APPEND_FIRST || (layout == LR_MODULO && modulo_slots < 1))
        { lr_fail(error, "unknown KV layout %d (modulo needs modulo_slots >= 1)", layout); return NULL; }
    LrState *state = lr_calloc(1, sizeof(LrState), error);
    if (!state) return NULL;
    state->model = model;
    state->max_len = max_len;
    state->max_steps = max_steps;
    state->layout = layout;
    state->groups = layout == LR_FULL || layout == LR_LAST_EXITED || layout == LR_APPEND_FIRST ? max_steps
                    : layout == LR_MODULO ? (modulo_slots < max_steps ? modulo_slots : max_steps) : 1;
    state->per_step = c->core + c->coda;
    state->slots = c->prelude + max_steps * state->per_step;
    state->segments = c->mc_segment_size ? (max_len / c->mc_segment_size > 1 ? max_len / c->mc_segment_size : 1) : 0;
    state->threads = 1;
    state->slot = lr_calloc((size_t)state->slots, sizeof(LrSlot), error);
    state->gates_state = lr_calloc((size_t)c->core * c->d_model, sizeof(float), error);
    state->act_mixture = lr_calloc((size_t)c->d_model, sizeof(float), error);
    state->loop_storages = lr_calloc((size_t)state->slots, sizeof(int), error);
    state->scratch_floats = lr_scratch_floats(model, max_len, max_steps);
    state->scratch = lr_calloc(state->scratch_floats, sizeof(float), error);
    if (!state->slot || !state->gates_state || !state->act_mixture || !state->loop_storages || !state->scratch) goto fail;
    /* slot kinds and attention storage indices, assigned in slot order as KVCache does */
    int attention_storages = 0;
    for (int s = 0; s < state->slots; s++) {
        LrSlot *slot = &state->slot[s];
        int layer = s < c->prelude ? s : (s - c->prelude) % state->per_step;
        slot->kind = lr_layer_kind(c, s < c->prelude || layer < c->core ? layer : layer - c->core);
        slot->storage = -1;
        if (slot->kind != 'A') continue;
        if (s >= c->prelude) {
            int step = (s - c->prelude) / state->per_step, group = group_of(state, step, layer);
            for (int t = c->prelude; t < s && slot->storage < 0; t++) {
                int other_step = (t - c->prelude) / state->per_step, other_layer = (t - c->prelude) % state->per_step;
                if (other_layer == layer && group_of(state, other_step, other_layer) == group) slot->storage = state->slot[t].storage;
            }
        }
        if (slot->storage < 0) {
            slot->storage = attention_storages++;
            if (s >= c->prelude) state->loop_storages[state->loop_storage_count++] = s;  /* its first slot */
        }
    }
    size_t width = c->attention == LR_ATTENTION_MLA ? (size_t)c->mla_kv_rank + c->mla_rope_dim
                                                     : 2 * (size_t)c->n_kv_heads * c->head_dim;
    state->saved = lr_calloc((size_t)state->loop_storage_count * width + 1, sizeof(float), error);
    if (!state->saved) goto fail;
    if (allocate) {  /* one block; the slots of one attention storage share its K/V */
        size_t total = 0;
        for (int s = 0; s < state->slots; s++)
            for (int p = 0; p < LR_PARTS; p++)
                if (!shares_storage(state, s, p)) total += part_floats(state, state->slot[s].kind, p);
        state->memory = lr_calloc(total, sizeof(float), error);
        if (!state->memory) goto fail;
        state->owns_memory = 1;
        float *next = state->memory;
        for (int s = 0; s < state->slots; s++) {
            LrSlot *slot = &state->slot[s];
            for (int p = 0; p < LR_PARTS; p++) {
                size_t n = part_floats(state, slot->kind, p);
                int owner = shares_storage(state, s, p);
                if (owner) slot->part[p] = state->slot[owner - 1].part[p];
                else if (n) { slot->part[p] = next; next += n; }
            }
        }
    }
    return state;
fail:
    lr_state_free(state);
    return NULL;
}

int lr_state_bind(LrState *state, int slot, int part, float *memory, char *error) {
    if (slot < 0 || slot >= state->slots || part < 0 || part >= LR_PARTS)
        return lr_fail(error, "no slot %d part %d in this state", slot, part);
    if (!part_floats(state, state->slot[slot].kind, part))
        return lr_fail(error, "slot %d (kind %c) has no part %d", slot, state->slot[slot].kind, part);
    state->slot[slot].part[part] = memory;
    return 1;
}

int lr_state_ready(const LrState *state, char *error) {
    for (int s = 0; s < state->slots; s++)
        for (int p = 0; p < LR_PARTS; p++)
            if (part_floats(state, state->slot[s].kind, p) && !state->slot[s].part[p])
                return lr_fail(error, "slot %d part %d has no memory", s, p);
    return 1;
}

void lr_state_set_threads(LrState *state, int threads) { state->threads = threads < 1 ? 1 : threads; }

void lr_state_free(LrState *state) {
    if (!state) return;
    if (state->owns_memory) free(state->memory);
    free(state->slot);
    free(state->gates_state);
    free(state->act_mixture);
    free(state->loop_storages);
    free(state->saved);
    free(state->scratch);
    free(state);
}

/* Rows of one position in an attention slot: K/V entries of `pos`, per kv head (MLA: one head). */
void lr_position_rows(const LrState *state, size_t *heads, size_t *key_width, size_t *value_width) {
    const LrConfig *c = &state->model->config;
    int latent = c->attention == LR_ATTENTION_MLA;
    *heads = latent ? 1 : (size_t)c->n_kv_heads;
    *key_width = latent ? (size_t)c->mla_kv_rank : (size_t)c->head_dim;
    *value_width = latent ? (size_t)c->mla_rope_dim : (size_t)c->head_dim;
}

/* K/V of `pos` from slot `from`'s storage to slot `to`'s (or to/from `buffer` [heads·(kw + vw)]). */
static void copy_position(const LrState *state, const LrSlot *from, const LrSlot *to, int pos, float *buffer,
                          int into_buffer, float scale) {
    size_t heads, kw, vw;
    lr_position_rows(state, &heads, &kw, &vw);
    const size_t L = state->max_len;
    for (size_t h = 0; h < heads; h++) {
        const size_t widths[2] = {kw, vw};
        for (int p = 0; p < 2; p++) {
            const size_t w = widths[p], at = (h * L + pos) * w;
            float *entry_buffer = buffer + h * (kw + vw) + (p ? kw : 0);
            if (!buffer) memcpy(to->part[p] + at, from->part[p] + at, w * sizeof(float));
            else if (into_buffer) memcpy(entry_buffer, from->part[p] + at, w * sizeof(float));
            else for (size_t i = 0; i < w; i++) to->part[p][at + i] = entry_buffer[i] / scale;
        }
    }
}

void lr_after_step(LrState *state, int step, int pos) {
    if ((state->layout != LR_FIRST && state->layout != LR_AVG) || !state->loop_storage_count) return;
    size_t heads, kw, vw;
    lr_position_rows(state, &heads, &kw, &vw);
    const size_t width = heads * (kw + vw);
    for (int i = 0; i < state->loop_storage_count; i++) {
        float *saved = state->saved + (size_t)i * width;
        const LrSlot *slot = &state->slot[state->loop_storages[i]];
        if (step == 0) {
            copy_position(state, slot, NULL, pos, saved, 1, 1.0f);
        } else if (state->layout == LR_AVG) {
            const size_t L = state->max_len;
            for (size_t h = 0; h < heads; h++) {
                for (size_t j = 0; j < kw; j++) saved[h * (kw + vw) + j] += slot->part[0][(h * L + pos) * kw + j];
                for (size_t j = 0; j < vw; j++) saved[h * (kw + vw) + kw + j] += slot->part[1][(h * L + pos) * vw + j];
            }
        }
    }
}

/* A slot's recurrent parts copied whole into another slot (segment memories: the ones completed). */
static void copy_recurrent(const LrState *state, const LrSlot *from, const LrSlot *to, int pos) {
    const LrConfig *c = &state->model->config;
    for (int p = 0; p < LR_PARTS; p++) {
        if (p == LR_PART_FFN_PREVIOUS || !from->part[p]) continue;
        size_t n = part_floats(state, from->kind, p);
        if (from->kind == 'G' && (p == LR_PART_SEGMENT_STATES || p == LR_PART_SEGMENT_KEYS)) {
            /* segments not yet completed are zero in every slot */
            size_t completed = (size_t)(pos + 1) / c->mc_segment_size;
            if (completed > (size_t)state->segments) completed = state->segments;
            n = n / state->segments * completed;
        }
        memcpy(to->part[p], from->part[p], n * sizeof(float));
    }
}

void lr_finish(LrState *state, int pos, int ran) {
    const LrConfig *c = &state->model->config;
    if (ran < state->max_steps) {  /* LAST_EXITED: the skipped steps take the last step's entries */
        for (int offset = 0; offset < state->per_step; offset++) {
            const LrSlot *source = &state->slot[c->prelude + (ran - 1) * state->per_step + offset];
            int done[64] = {0};
            for (int step = ran; step < state->max_steps; step++) {
                LrSlot *target = &state->slot[c->prelude + step * state->per_step + offset];
                if (source->part[LR_PART_FFN_PREVIOUS])
                    memcpy(target->part[LR_PART_FFN_PREVIOUS], source->part[LR_PART_FFN_PREVIOUS],
                           (size_t)c->d_model * sizeof(float));
                if (source->kind != 'A') {
                    copy_recurrent(state, source, target, pos);
                    continue;
                }
                int group = group_of(state, step, offset), written = 0;
                for (int s = 0; s < ran; s++) written |= group_of(state, s, offset) == group;
                if (written || (group < 64 && done[group])) continue;
                if (group < 64) done[group] = 1;
                copy_position(state, source, target, pos, NULL, 0, 1.0f);
            }
        }
    }
    if ((state->layout == LR_FIRST || state->layout == LR_AVG) && state->loop_storage_count) {
        size_t heads, kw, vw;
        lr_position_rows(state, &heads, &kw, &vw);
        const float scale = state->layout == LR_AVG ? (float)ran : 1.0f;
        for (int i = 0; i < state->loop_storage_count; i++)
            copy_position(state, NULL, &state->slot[state->loop_storages[i]], pos,
                          state->saved + (size_t)i * heads * (kw + vw), 0, scale);
    }
}
