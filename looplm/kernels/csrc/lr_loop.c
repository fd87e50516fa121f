/* The loop around the layers for one token (looplm.model.lm.LoopLM's building blocks and
 * looplm.model.loop's mechanics), and the token's exit decision (looplm.generate.Decoder.step /
 * prefill with looplm.exit_policy.ExitRule.decide_one's arithmetic). */
#include <float.h>

#include "lr_common.h"
#include "exit_rule.h"
#include "lr_internal.h"

/* The weight × vector path matvec.h compiled (its intrinsics are AVX2/FMA; under -march=native the
 * compiler may also widen the runtime's plain loops, to AVX-512 where the CPU has it). */
const char *lr_simd(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* A row of a float32 or Q8_0 matrix into `out` (the embedding lookup). */
static void matrix_row(const LrMatrix *m, int row, float *out) {
    const int n = m->cols;
    if (!m->p.values) {
        memcpy(out, m->p.weights + (size_t)row * n, (size_t)n * sizeof(float));
        return;
    }
    const int8_t *q = m->p.values + (size_t)row * n;
    const float *s = m->p.scales + (size_t)row * (n / BLOCK);
    for (int i = 0; i < n; i++) out[i] = s[i / BLOCK] * (float)q[i];
}

/* One pass of x through a stack's layers at loop step `step` (looplm.model.lm.LoopLM._stack): with
 * block attention residuals the pass starts its depth sources from x (b₀; nothing carried from
 * another pass or token) and x becomes the stack's output query over them; otherwise the layers
 * update x ([streams·D]) in place. */
static void run_stack(LrState *state, int stage, int step, int pos, float *x) {
    const LrModel *m = state->model;
    const LrConfig *c = &m->config;
    const LrLayer *layers = stage == LR_PRELUDE ? m->prelude : stage == LR_CORE ? m->core : m->coda;
    const int count = stage == LR_PRELUDE ? c->prelude : stage == LR_CORE ? c->core : c->coda, D = c->d_model;
    if (!count) return;
    const size_t mark = state->scratch_used;
    LrDepth sources = {NULL, 1, 0}, *depth = NULL;
    if (c->attnres_block_size) {  /* (one stream: ModelConfig refuses attention residuals with mHC) */
        sources.values = lr_take(state, (2 * (size_t)count + 2) * D);
        memcpy(sources.values, x, (size_t)D * sizeof(float));
        depth = &sources;
    }
    for (int l = 0; l < count; l++)
        lr_layer(state, &layers[l], lr_state_slot(state, stage, l, step), x, pos, step,
                 stage == LR_CORE && c->global_gates ? state->gates_state + (size_t)l * D : NULL, depth);
    if (depth) lr_depth_read(state, &m->stack_output[stage], depth, x);
    state->scratch_used = mark;
}

void lr_embed(LrState *state, int token, int pos, float *e) {
    const LrModel *m = state->model;
    const int D = m->config.d_model;
    matrix_row(&m->embedding, token, e);
    if (m->config.embed_norm) lr_norm(&m->config, e, m->embed_norm, m->embed_norm_bias, e, D);
    for (int i = 1; i < m->config.streams; i++) memcpy(e + (size_t)i * D, e, (size_t)D * sizeof(float));  /* n copies */
    run_stack(state, LR_PRELUDE, 0, pos, e);
}

void lr_initial_state(const LrState *state, const float *e, int pos, float *h) {
    const LrModel *m = state->model;
    const size_t width = (size_t)m->config.d_model * m->config.streams;
    memmove(h, m->noise_table ? m->noise_table + (size_t)pos * width : e, width * sizeof(float));
}

/* h += the loop-index signal of `step`: a sinusoid (base 10000) on the first D/8 channels,
 * computed in float64 as looplm.model.loop.loop_index_signal. */
static void add_loop_index(float *h, int step, int D) {
    const int half = D / 8 / 2;
    for (int i = 0; i < half; i++) {
        double angle = step * pow(10000.0, -(double)i / (half > 1 ? half : 1));
        h[i] += (float)sin(angle);
        h[half + i] += (float)cos(angle);
    }
}

/* u = inject(h, e) in place on h (looplm.model.loop.Injection), one stream's h and e [D]. */
static void inject(LrState *state, float *h, const float *e) {
    const LrModel *m = state->model;
    const int D = m->config.d_model;
    const size_t mark = state->scratch_used;
    switch (m->config.injection) {
        case LR_INJECT_ADDITIVE:
            for (int i = 0; i < D; i++) h[i] += e[i];
            break;
        case LR_INJECT_LTI:
            for (int i = 0; i < D; i++) h[i] = m->inject_decay[i] * h[i] + m->inject_input_scale[i] * e[i];
            break;
        case LR_INJECT_DIAGONAL: {
            float *be = lr_take(state, (size_t)D);
            lr_project(state, &m->diag_b, e, be);
            for (int i = 0; i < D; i++) h[i] = m->inject_decay[i] * h[i] + m->inject_input_scale[i] * be[i];
            break;
        }
        case LR_INJECT_CONCAT: {
            float *both = lr_take(state, 2 * (size_t)D);
            memcpy(both, h, (size_t)D * sizeof(float));
            memcpy(both + D, e, (size_t)D * sizeof(float));
            lr_project(state, &m->concat_adapter, both, h);
            break;
        }
    }
    state->scratch_used = mark;
}

/* OpenMythos's ACT over the loop states (looplm.model.exit.act_mixing_step): the gate reads the
 * step's state h, p = σ(z), r = max(1 − c, 0); w = r where c + p ≥ threshold, else p (0 once
 * halted); m ← m + w·h; c ← c + p (not halted); halted once c ≥ threshold.  Step 0 starts afresh. */
static void act_mixing_step(LrState *state, const float *h, int step) {
    const LrModel *m = state->model;
    const int D = m->config.d_model;
    const float threshold = m->config.act_threshold;
    if (step == 0) {
        state->act_cumulative = 0.0f;
        state->act_halted = 0;
        memset(state->act_mixture, 0, (size_t)D * sizeof(float));
    }
    const float z = dot(m->gate_weight, h, D) + m->gate_bias[0], p = lr_sigmoid(z), c = state->act_cumulative;
    const float running = state->act_halted ? 0.0f : 1.0f;
    const float weight = (c + p >= threshold ? fmaxf(1.0f - c, 0.0f) : p) * running;
    for (int i = 0; i < D; i++) state->act_mixture[i] += weight * h[i];
    state->act_cumulative = c + p * running;
    state->act_halted |= state->act_cumulative >= threshold;
    state->act_logit = z;
}

void lr_core_step(LrState *state, float *h, int step, int pos, const float *e) {
    const LrModel *m = state->model;
    const LrConfig *c = &m->config;
    const int D = c->d_model, residual = c->injection == LR_INJECT_LTI_RESIDUAL, n = c->streams;
    const size_t mark = state->scratch_used, width = (size_t)n * D;
    float *update = lr_take(state, width), *input = h;
    if (residual) {  /* OpenMythos: the core reads x = n(h + signal + e); h itself stays unsignalled */
        input = lr_take(state, width);
        memcpy(input, h, width * sizeof(float));
        for (int s = 0; s < n; s++) {  /* every mHC stream alike */
            float *stream = input + (size_t)s * D;
            if (c->loop_index_embedding) add_loop_index(stream, step, D);
            for (int i = 0; i < D; i++) stream[i] += e[(size_t)s * D + i];
            lr_norm(c, stream, m->inject_norm, m->inject_norm_bias, stream, D);
        }
    } else {
        for (int s = 0; s < n; s++) {
            if (c->loop_index_embedding) add_loop_index(h + (size_t)s * D, step, D);
            if (c->injection != LR_INJECT_IDENTITY) inject(state, h + (size_t)s * D, e + (size_t)s * D);
        }
    }
    memcpy(update, input, width * sizeof(float));
    run_stack(state, LR_CORE, step, pos, update);
    if (c->depth_lora_rank) {  /* (down(u) ⊙ scale[min(t, T − 1)]) @ up, u the core's input (or its output) */
        const int rank = c->depth_lora_rank, row = step < c->loop_steps ? step : c->loop_steps - 1;
        const size_t lora_mark = state->scratch_used;
        float *low = lr_take(state, (size_t)rank), *delta = lr_take(state, (size_t)D);
        for (int s = 0; s < n; s++) {  /* per mHC stream */
            const size_t at = (size_t)s * D;
            lr_project(state, &m->lora_down, (c->lora_output ? update : input) + at, low);
            for (int i = 0; i < rank; i++) low[i] *= m->lora_scale[(size_t)row * rank + i];
            lr_project(state, &m->lora_up, low, delta);
            for (int i = 0; i < D; i++) update[at + i] += delta[i];
        }
        state->scratch_used = lora_mark;
    }
    if (residual)  /* h ← A ⊙ h + B ⊙ e + y */
        for (size_t i = 0; i < width; i++)
            update[i] = m->inject_decay[i % D] * h[i] + m->inject_input_scale[i % D] * e[i] + update[i];
    if (c->act_mixing) act_mixing_step(state, update, step);  /* (one stream: lr_config refuses it with mHC) */
    if (c->step_norm)
        for (int s = 0; s < n; s++)
            lr_norm(c, update + (size_t)s * D, m->final_norm, m->final_norm_bias, h + (size_t)s * D, D);
    else memcpy(h, update, width * sizeof(float));
    state->scratch_used = mark;
}

void lr_readout(LrState *state, const float *h, int step, int pos, float *out) {
    const LrModel *m = state->model;
    const LrConfig *c = &m->config;
    if (c->act_mixing) h = state->act_mixture;  /* the coda reads the ACT mixture of the states so far */
    if (c->streams > 1) {  /* mHC: the coda on the streams, then the norm of their mean */
        const int D = c->d_model, n = c->streams;
        const size_t mark = state->scratch_used;
        float *streams = lr_take(state, (size_t)n * D);
        memcpy(streams, h, (size_t)n * D * sizeof(float));
        run_stack(state, LR_CODA, step, pos, streams);
        for (int i = 0; i < D; i++) {
            float sum = 0.0f;
            for (int s = 0; s < n; s++) sum += streams[(size_t)s * D + i];
            out[i] = sum / (float)n;
        }
        lr_norm(c, out, m->final_norm, m->final_norm_bias, out, D);
        state->scratch_used = mark;
        return;
    }
    if (!c->coda) {
        if (c->step_norm) memmove(out, h, (size_t)c->d_model * sizeof(float));
        else lr_norm(c, h, m->final_norm, m->final_norm_bias, out, c->d_model);
        return;
    }
    memmove(out, h, (size_t)c->d_model * sizeof(float));
    run_stack(state, LR_CODA, step, pos, out);
    lr_norm(c, out, m->final_norm, m->final_norm_bias, out, c->d_model);
}

float lr_gate_logit(const LrState *state, const float *readout) {
    const LrModel *m = state->model;
    if (m->config.act_mixing) return state->act_logit;
    return dot(m->gate_weight, readout, m->config.d_model) + m->gate_bias[0];
}

void lr_logits(const LrState *state, const float *readout, float *logits) {
    lr_project(state, &state->model->head, readout, logits);
}

int lr_argmax(const float *values, int n) {
    return vector_argmax(values, n);
}

/* One token's loop (see lr_token).  `full_depth`: every step runs whatever the exit (prefill, the
 * `full` layout); `every_readout`: the readout (coda) runs after every step, as the batched forward
 * and the first/avg layouts with a coda do. */
static int run_token(LrState *state, int token, int pos, const LrExit *exit, int full_depth, int every_readout,
                     float *logits, int *best) {
    const LrModel *m = state->model;
    const LrConfig *c = &m->config;
    const int D = c->d_model, active = exit->q < 1.0 && c->exit_gate;
    const size_t mark = state->scratch_used, width = (size_t)D * c->streams;
    float *e = lr_take(state, width), *h = lr_take(state, width), *readout = lr_take(state, (size_t)D);
    float *chosen = lr_take(state, (size_t)D), *step_logits = exit->dump ? lr_take(state, (size_t)c->vocab) : NULL;
    lr_embed(state, token, pos, e);
    lr_initial_state(state, e, pos, h);
    double log_survival = 0.0;
    int exit_step = 0, step = 0, have_chosen = 0;
    for (; step < exit->max_steps; step++) {
        lr_core_step(state, h, step, pos, e);
        const int last = step + 1 == exit->max_steps;
        if (last || active || every_readout || exit->dump) lr_readout(state, h, step, pos, readout);
        if (exit->dump) {
            lr_logits(state, readout, step_logits);
            exit->dump(exit->dump_context, pos, step + 1, step_logits, c->vocab);
        }
        lr_after_step(state, step, pos);
        if (last) break;
        if (!exit_step && active) {
            if (q_exit_reached((double)lr_gate_logit(state, readout), &log_survival, exit->q)
                && step + 1 >= exit->min_steps) {
                exit_step = step + 1;
                if (!full_depth) break;
                memcpy(chosen, readout, (size_t)D * sizeof(float));
                have_chosen = 1;
            }
        }
    }
    const int ran = step + 1 < exit->max_steps ? step + 1 : exit->max_steps;
    lr_finish(state, pos, ran);
    if (logits) {
        lr_logits(state, have_chosen ? chosen : readout, logits);
        if (best) *best = lr_argmax(logits, c->vocab);
    }
    state->scratch_used = mark;
    return exit_step ? exit_step : ran;
}

int lr_token(LrState *state, int token, int pos, const LrExit *exit, float *logits, int *best) {
    const int coda = state->model->config.coda > 0;
    const int averaging = state->layout == LR_FIRST || state->layout == LR_AVG;
    return run_token(state, token, pos, exit, state->layout == LR_FULL, coda && averaging, logits, best);
}

/* The prompt's tokens one by one at full depth; the last one decides the exit. */
static int prefill_tokens(LrState *state, const int *tokens, int count, int start, const LrExit *exit, float *logits,
                          int *best) {
    const int coda = state->model->config.coda > 0;
    LrExit every = *exit;
    every.min_steps = 1;
    every.q = 2.0;  /* the prompt's tokens before the last decide nothing */
    for (int i = 0; i + 1 < count; i++) run_token(state, tokens[i], start + i, &every, 1, coda, NULL, NULL);
    return run_token(state, tokens[count - 1], start + count - 1, exit, 1, coda, logits, best);
}

/* Layouts whose steps share K/V storage (last, first, avg, modulo) prefill as the batched forward
 * does: inside the prompt every step attends over that step's own K/V.  So the prompt runs on
 * per-step K/V (as last_exited keeps them), which are then folded into the shared storage by the
 * layout's rule for finished positions: the last step's K/V (last), the first's (first), their mean
 * (avg), or per group the last step that used it (modulo). */
static int prefill_shared(LrState *state, const int *tokens, int count, int start, const LrExit *exit, float *logits,
                          int *best) {
    const LrConfig *c = &state->model->config;
    const int first = c->prelude, layout = state->layout, groups = state->groups;
    const size_t L = state->max_len;
    size_t heads, widths[2];
    lr_position_rows(state, &heads, &widths[0], &widths[1]);
    int loop_slots = 0;
    for (int s = first; s < state->slots; s++) loop_slots += state->slot[s].kind == 'A';
    const size_t per_slot = heads * L * (widths[0] + widths[1]);
    float *own = loop_slots ? malloc((size_t)loop_slots * per_slot * sizeof(float)) : NULL;
    float **shared = loop_slots ? malloc(2 * (size_t)state->slots * sizeof(float *)) : NULL;
    if (loop_slots && (!own || !shared)) {
        free(own);
        free(shared);
        return -1;
    }
    float *next = own;
    for (int s = first; s < state->slots; s++) {  /* each loop attention slot on its own K/V, earlier positions copied */
        LrSlot *slot = &state->slot[s];
        if (slot->kind != 'A') continue;
        for (int p = 0; p < 2; p++) {
            shared[2 * s + p] = slot->part[p];
            for (size_t h = 0; h < heads; h++)
                memcpy(next + h * L * widths[p], slot->part[p] + h * L * widths[p], (size_t)start * widths[p] * sizeof(float));
            slot->part[p] = next;
            next += heads * L * widths[p];
        }
    }
    state->layout = LR_LAST_EXITED;
    state->groups = state->max_steps;
    int steps = prefill_tokens(state, tokens, count, start, exit, logits, best);
    state->layout = layout;
    state->groups = groups;
    for (int offset = 0; offset < state->per_step; offset++) {
        const int base = first + offset;
        if (state->slot[base].kind != 'A') continue;
        for (int step = 0; step < state->max_steps; step++) {  /* the step whose K/V each group keeps */
            const int target = base + step * state->per_step;
            int source = step;  /* modulo: the last step of its group; last: the last step; first: 0 */
            if (layout == LR_LAST || layout == LR_AVG) source = state->max_steps - 1;
            else if (layout == LR_FIRST) source = 0;
            else while (source + groups < state->max_steps) source += groups;
            for (int p = 0; p < 2; p++) {
                const size_t w = widths[p];
                float *out = shared[2 * target + p];
                for (size_t h = 0; h < heads; h++) {
                    float *row = out + (h * L + (size_t)start) * w;
                    const size_t n = (size_t)count * w;
                    if (layout != LR_AVG) {
                        memcpy(row, state->slot[base + source * state->per_step].part[p] + (h * L + start) * w, n * sizeof(float));
                        continue;
                    }
                    memcpy(row, state->slot[base].part[p] + (h * L + start) * w, n * sizeof(float));
                    for (int t = 1; t < state->max_steps; t++) {
                        const float *add = state->slot[base + t * state->per_step].part[p] + (h * L + start) * w;
                        for (size_t i = 0; i < n; i++) row[i] += add[i];
                    }
                    for (size_t i = 0; i < n; i++) row[i] /= (float)state->max_steps;
                }
            }
        }
    }
    for (int s = first; s < state->slots; s++)
        if (state->slot[s].kind == 'A')
            for (int p = 0; p < 2; p++) state->slot[s].part[p] = shared[2 * s + p];
    free(own);
    free(shared);
    return steps;
}

int lr_prefill(LrState *state, const int *tokens, int count, int start, const LrExit *exit, float *logits, int *best) {
    if (state->groups < state->max_steps) return prefill_shared(state, tokens, count, start, exit, logits, best);
    return prefill_tokens(state, tokens, count, start, exit, logits, best);
}
