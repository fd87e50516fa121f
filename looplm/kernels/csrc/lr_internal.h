/* What the runtime's sources share among themselves (not part of the C API in runtime.h). */
#ifndef LOOPLM_LR_INTERNAL_H
#define LOOPLM_LR_INTERNAL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "runtime.h"

/* Scratch memory taken stack-wise: a function notes `used` on entry and gives back on return. */
static inline float *lr_take(LrState *state, size_t floats) {
    float *memory = state->scratch + state->scratch_used;
    state->scratch_used += (floats + 15) & ~(size_t)15;  /* 64-byte steps keep vectors aligned */
    if (state->scratch_used > state->scratch_floats) {  /* lr_scratch_floats undercounted: a bug, never input */
        fputs("looplm runtime: internal error: scratch memory exhausted\n", stderr);
        abort();
    }
    return memory;
}

#define LR_SINKHORN_ITERATIONS 20   /* looplm.model.residual.SINKHORN_ITERATIONS */

static inline float lr_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float lr_silu(float x) { return x / (1.0f + expf(-x)); }
static inline float lr_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }  /* torch's threshold */

/* y = W x (rows split over the state's threads when the matrix is large enough to pay). */
void lr_project(const LrState *state, const LrMatrix *m, const float *x, float *y);
/* out = x / sqrt(mean(x²) + eps) · w (w NULL: no weight); out may alias x. */
void lr_rms_norm(const float *x, const float *w, float *out, int n, float eps);
/* The residual-stream norm of the config (looplm.model.norms.make_norm): RMSNorm with scale w, or
 * LayerNorm (model.norm_type=layer) (x − mean) / sqrt(var + eps) · w + b, var biased; out may alias x. */
void lr_norm(const LrConfig *config, const float *x, const float *w, const float *b, float *out, int n);
/* A stack pass's depth sources for block attention residuals (looplm.model.residual.DepthSources):
 * `values` rows [blocks] are b₀ (the stack's input) and the completed blocks' outputs, then row
 * [blocks] the open block's partial sum when `partial`; room for 2·(stack layers) + 2 rows. */
typedef struct {
    float *values;
    int blocks, partial;
} LrDepth;

/* x = Σ_i softmax_i(w · RMSNorm(V_i)) V_i over the depth sources [D] (DepthAttention.read). */
void lr_depth_read(LrState *state, const LrDepthQuery *query, const LrDepth *depth, float *x);

/* One layer (a token mixer and an FFN) on h [D] in place, its cache slot `slot`; `gates` is the
 * layer's global-gate state G [D] (core layers with global_gates; NULL otherwise) and `step` the
 * loop step (0 for the prelude).  With block attention residuals `depth` is the stack pass's
 * sources, which the layer reads and extends instead of h (then unread; NULL otherwise). */
void lr_layer(LrState *state, const LrLayer *layer, int slot, float *h, int pos, int step, float *gates,
              LrDepth *depth);

/* Whether attention slot `slot` reads step 1's K/V and writes none (LR_APPEND_FIRST, core, step > 0). */
int lr_reads_first_step(const LrState *state, int slot);

/* An attention slot's entries of one position: `heads` rows of key_width and value_width floats
 * (MLA: one row of the latent and one of the rope key). */
void lr_position_rows(const LrState *state, size_t *heads, size_t *key_width, size_t *value_width);

#endif
