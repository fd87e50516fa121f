/* looplm's C runtime: one token at a time through every model family looplm can configure.
 *
 * Two doors use it: the standalone program (looplm_run.c, reading a GGUF file) and the in-process
 * `native` backend (looplm/kernels/runtime_stepper.py, through ctypes, reading the model's own
 * tensors and KVCache storage).  Both describe a model the same way: the config as JSON (the
 * `looplm.config` string of a GGUF file, `dataclasses.asdict(ModelConfig)` in Python), then every
 * tensor bound by its GGUF name (looplm.checkpoint.gguf.gguf_name), then `lr_model_finish`, which
 * checks that every tensor the config needs is there with the right shape.
 *
 * A state (`LrState`) holds what decoding keeps between tokens: per cache slot, attention K/V
 * (MLA: latent and rotated rope key), Gated DeltaNet and RWKV recurrent states and the ChannelMix
 * FFN's previous input, in exactly looplm.cache.KVCache's layout; the standalone program
 * allocates them, the Python door binds the KVCache's tensors (so prefill by torch, the Python
 * layout rules and this runtime all read and write the same storage).
 *
 * Shapes below are torch's order (row-major, last index fastest). */
#ifndef LOOPLM_RUNTIME_H
#define LOOPLM_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "matvec.h"

/* ---- configuration (looplm.config.ModelConfig) ---------------------------------------------- */
enum { LR_ATTENTION_MHA, LR_ATTENTION_GATED, LR_ATTENTION_MLA };
enum { LR_INJECT_IDENTITY, LR_INJECT_ADDITIVE, LR_INJECT_LTI, LR_INJECT_DIAGONAL, LR_INJECT_CONCAT,
       LR_INJECT_LTI_RESIDUAL };
enum { LR_FFN_DENSE, LR_FFN_MOE, LR_FFN_CHANNELMIX };
enum { LR_TERNARY_NONE, LR_TERNARY_CORE, LR_TERNARY_ALL };
enum { LR_LAST_EXITED, LR_FULL, LR_LAST, LR_FIRST, LR_AVG, LR_MODULO, LR_APPEND_FIRST };  /* looplm.cache.KV_LAYOUTS */
#define LR_MAX_PATTERN 64
#define LR_CONV 4      /* Gated DeltaNet's causal depthwise convolution kernel */
#define LR_SHIFTS 4    /* the RWKV mixer's token-shift history (shifts 1, 2, 4) */

typedef struct {
    int vocab, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden;
    int prelude, core, coda, loop_steps, max_seq_len;
    double rope_theta, rope_fraction;
    int rope_dim;                 /* rotated dims: head_dim·rope_fraction rounded down to even, or mla_rope_dim */
    int attention;                /* LR_ATTENTION_* */
    char layer_pattern[LR_MAX_PATTERN + 1];
    int mc_segment_size, mc_top_k, loop_mc, loop_mc_top_k, global_gates;
    int rwkv_slots, rwkv_decay_rank, mla_kv_rank, mla_q_rank, mla_rope_dim;
    int zero_centered_norm, sandwich, step_norm, tie_embeddings, exit_gate;
    int layer_norm;               /* model.norm_type=layer: LayerNorm (scale and bias) for every residual-stream norm */
    int embed_norm;               /* a norm right after the embedding (model.embed_norm) */
    float norm_eps;
    int injection, noise_initial_state, loop_index_embedding, depth_lora_rank;
    int ffn, n_experts, n_shared_experts, moe_top_k, expert_hidden;
    int shared_expert_hidden;     /* each shared expert's width (expert_hidden unless set) */
    int moe_core;                 /* model.moe_scope=core: prelude and coda layers keep the dense SwiGLU */
    int lora_output;              /* model.depth_lora_position=output: depth LoRA reads the core's output */
    int mla_nope_dim, mla_value_dim;   /* MLA's per-head key (unrotated) and value widths (head_dim unless set) */
    int act_mixing;               /* OpenMythos's ACT over the loop states: the gate reads each step's state, the
                                   * readout (coda) the ACT mixture of the states so far */
    float act_threshold;
    int ternary;                  /* LR_TERNARY_*: which layers' projections are ternary (model.ternary) */
    int streams;                  /* mHC residual streams (model.hyper_connections >= 2, else 1): the state is
                                   * [streams·D], the embedding enters as copies, the readout norms their mean */
    int attnres_block_size;       /* block attention residuals (model.attnres_block_size > 0; 0 = the plain sum):
                                   * each sub-layer reads a softmax over its stack pass's depth sources */
    int kv_append_first;          /* nanochat's loop: only step 1 writes the core's K/V (its states use LR_APPEND_FIRST) */
    /* the inference defaults the model records (ModelConfig.default_exit, min/max_loop_steps):
     * looplm-run uses them when no policy is named */
    char default_exit[LR_MAX_PATTERN + 1];
    int min_loop_steps, max_loop_steps;
} LrConfig;

/* Read a ModelConfig JSON object; every key must be known (a newer looplm's feature is refused by
 * name rather than ignored) and every value valid. */
int lr_config_parse(const char *json, size_t length, LrConfig *config, char *error);
/* "A", "G" or "R" for layer `index` of a stack (the layer pattern repeated). */
char lr_layer_kind(const LrConfig *config, int index);

/* ---- weights ----------------------------------------------------------------------------------- */
typedef struct {
    Projection p;       /* float32 weights, Q8_0 values + scales, or ternary codes + scale (matvec.h) */
    int rows, cols;     /* W [rows, cols]: y = W x */
} LrMatrix;

/* One sub-layer's mHC coefficients (looplm.model.residual.HyperConnection): router φ [2n + n², n·D],
 * gain α [3], biases pre [n], post [n], mix [n, n]. */
typedef struct {
    LrMatrix router;
    const float *gain, *pre_bias, *post_bias, *mix_bias;
} LrHyper;

/* One block-attention-residual query (looplm.model.residual.DepthAttention): w [D] and its key
 * RMSNorm's scale [D] (1 + w applied for zero-centred norms); closes_block: the sub-layer ends a
 * block of attnres_block_size sub-layers of its stack (never set for a stack's output query). */
typedef struct {
    const float *query, *key_norm;
    int closes_block;
} LrDepthQuery;

typedef struct {
    char kind;          /* 'A' attention, 'G' Gated DeltaNet, 'R' RWKV slot mixer */
    int looped;         /* a core layer (global gates and loop-axis memory live only there) */
    int ternary;        /* its token mixer's and FFN's projections are ternary (MoE routers excepted) */
    int ffn;            /* LR_FFN_*: the config's, but dense outside the core under model.moe_scope=core */
    /* norms (effective scales, 1 + w already applied for zero-centred norms); post norms NULL = pre-norm */
    const float *attn_norm, *attn_post_norm, *ffn_norm, *ffn_post_norm;
    /* their biases (LayerNorm only; NULL under RMSNorm) */
    const float *attn_norm_bias, *attn_post_norm_bias, *ffn_norm_bias, *ffn_post_norm_bias;
    LrMatrix out;       /* every mixer's output projection */
    /* attention (mha / gated): qkv rows [q (gated: q|gate per head) ; k ; v]; per-head q/k norms */
    LrMatrix qkv;
    const float *q_norm, *k_norm;
    /* MLA */
    LrMatrix q_proj, q_down, q_up, kv_down, kv_up;
    const float *mla_q_norm, *kv_norm;
    /* Gated DeltaNet: in_proj rows [q k v z b a]; conv [3W, 4]; memory caching; loop-axis memory */
    LrMatrix in_proj, memory_router, loop_router;
    const float *conv, *a_log, *dt_bias, *out_norm, *memory_online_bias, *loop_online_bias;
    /* RWKV slot mixer */
    const float *time_shift, *time_mix, *decay_base, *time_first;   /* [3, D], [3, D], [D], [D] */
    LrMatrix decay_down, decay_up, receptance, key, value, write_gate, read_gate;
    /* feed-forward: SwiGLU gate_up [2F, D] (gate rows then up rows), down [D, F]; ChannelMix μ */
    LrMatrix gate_up, down;
    const float *channel_mix;
    /* MoE: router [E, D], experts_gate_up [E, D, 2h], experts_down [E, h, D], balancing bias [E] */
    LrMatrix router, shared_gate_up, shared_down;
    const float *experts_gate_up, *experts_down, *balance_bias;
    /* nanochat global gates (core layers) */
    const float *g_qk, *g_ffn;
    /* mHC hyper-connections (config streams > 1): the mixer's and the FFN's */
    LrHyper hyper[2];
    /* block attention residuals (config attnres_block_size > 0): the mixer's and the FFN's queries */
    LrDepthQuery depth[2];
} LrLayer;

typedef struct {
    LrConfig config;
    LrLayer *prelude, *core, *coda;
    LrMatrix embedding, head;           /* head: the embedding itself when tied */
    const float *final_norm, *final_norm_bias, *gate_weight, *gate_bias;
    const float *embed_norm, *embed_norm_bias;   /* model.embed_norm (bias: LayerNorm only) */
    /* loop mechanics */
    const float *lti_log_a, *lti_log_dt, *lti_b, *diag_a_log, *diag_dt;
    const float *inject_norm, *inject_norm_bias;   /* lti_residual: the norm of the core's input */
    LrMatrix diag_b, concat_adapter, lora_down, lora_up;
    const float *lora_scale, *noise_table;
    /* block attention residuals: each non-empty stack's output query (LR_PRELUDE, LR_CORE, LR_CODA) */
    LrDepthQuery stack_output[3];
    /* derived when finished: RoPE tables [max_seq_len, rope_dim], injection decays, RWKV head decays */
    float *rope_cos, *rope_sin, *inject_decay, *inject_input_scale, *rwkv_head_decay;
    /* owned memory (norm scales, converted tensors) freed with the model */
    void **owned;
    int owned_count, owned_capacity;
    int finished;
} LrModel;

/* A model from its config JSON, with no tensors yet. */
LrModel *lr_model_new(const char *config_json, size_t length, char *error);
/* Bind one tensor by its GGUF name.  kind LR_BIND_F32: `data` float32 of `shape`; LR_BIND_Q8_0:
 * `data` int8 values [N, K] and `scales` float32 [N, K/32]; LR_BIND_TERNARY (a ternary layer's
 * projection only): `data` uint8 2-bit codes [N, ceil(K/4)] in looplm's layout, `scales` its one
 * float32 scale, `shape` [N, K].  The memory must outlive the model (the model reads it in place).
 * A ternary layer's projection bound as float32 (the shadow weight of an f32 file) is ternarised
 * here as looplm.model.bitlinear.ternary_codes does (absmean scale, codes rounded and clamped). */
enum { LR_BIND_F32 = 0, LR_BIND_Q8_0 = 1, LR_BIND_TERNARY = 2 };
int lr_model_bind(LrModel *model, const char *name, int kind, const void *data, const float *scales, int ndim,
                  const int64_t *shape, char *error);
/* Check that every tensor the config needs is bound; derive the tables. */
int lr_model_finish(LrModel *model, char *error);
void lr_model_free(LrModel *model);
/* Memory the model frees with itself (converted tensors of a GGUF file). */
int lr_model_own(LrModel *model, void *memory, char *error);

/* ---- decoding state ------------------------------------------------------------------------- */
/* Parts of a slot, in looplm.cache.recurrent_state_shapes' order, then the ChannelMix input. */
enum {
    LR_PART_KEYS = 0, LR_PART_VALUES = 1,                        /* attention: [Hkv, L, hd] (MLA [1, L, r] / [1, L, d_rope]) */
    LR_PART_CONV = 0, LR_PART_STATE = 1, LR_PART_SEGMENT_STATES = 2, LR_PART_SEGMENT_KEYS = 3,
    LR_PART_OPEN_KEY_SUM = 4, LR_PART_LOOP_KEY_SUM = 5,          /* Gated DeltaNet */
    LR_PART_SHIFT = 0, LR_PART_NUMERATOR = 1, LR_PART_DENOMINATOR = 2,   /* RWKV */
    LR_PART_FFN_PREVIOUS = 6,                                    /* ChannelMix FFN input of the previous position */
    LR_PARTS = 7
};

typedef struct {
    char kind;              /* the slot's mixer kind */
    int storage;            /* attention: index of its K/V storage (slots of one layout group share) */
    float *part[LR_PARTS];  /* state memory (NULL where the kind has no such part) */
} LrSlot;

typedef struct {
    const LrModel *model;
    int max_len, max_steps, layout, groups, slots, per_step, segments;
    LrSlot *slot;
    int owns_memory;
    float *memory;          /* one block for every part when the state allocated them */
    int threads;
    /* scratch and per-token carry (global gates, the LAST_EXITED bookkeeping of first/avg) */
    float *scratch;
    size_t scratch_floats, scratch_used;
    float *gates_state;     /* [core, D]: the running mean G of each core layer's updates (global gates) */
    /* act_mixing: this token's ACT state after its latest step (looplm.model.exit.act_mixing_step):
     * the mixture m [D], the cumulative halting probability, halted, and the step's halting logit */
    float *act_mixture, act_cumulative, act_logit;
    int act_halted;
    float *saved;           /* first / avg layouts: [loop attention storages, 2, Hkv·width] of this position */
    int *loop_storages, loop_storage_count;
} LrState;

/* A state for `max_len` positions and `max_steps` loop steps under KV layout `layout` (LR_*),
 * `modulo_slots` groups for LR_MODULO.  A model with kv_append_first always gets LR_APPEND_FIRST
 * (its layout is fixed, as KVCache fixes it): core attention slots of every step share step 1's
 * K/V storage, and the steps after the first read it and write nothing.  allocate: 1 = own every part (the standalone program),
 * 0 = bind them with lr_state_bind (the Python door). */
LrState *lr_state_new(const LrModel *model, int max_len, int max_steps, int layout, int modulo_slots, int allocate,
                      char *error);
/* Cache slots: prelude layer i → i; core layer l at step t → P + t·(N + C) + l; coda → … + N + l. */
int lr_state_slot(const LrState *state, int stage, int layer, int step);
enum { LR_PRELUDE, LR_CORE, LR_CODA };
int lr_state_bind(LrState *state, int slot, int part, float *memory, char *error);
/* Whether every part the model needs has memory. */
int lr_state_ready(const LrState *state, char *error);
/* OpenMP threads for the large projections and attention (1: none). */
void lr_state_set_threads(LrState *state, int threads);
void lr_state_free(LrState *state);

/* ---- one token ---------------------------------------------------------------------------- */
/* Below, e and h are the state of config.streams residual streams, [streams·D] (mHC), else [D]. */
/* e = prelude(embedding[token]) for the token at `pos` (writes the prelude slots). */
void lr_embed(LrState *state, int token, int pos, float *e);
/* h₀: e itself, or the eval noise table's row `pos`. */
void lr_initial_state(const LrState *state, const float *e, int pos, float *h);
/* One loop step (0-based `step`) on h in place: loop-index signal, injection of e, the core layers,
 * depth LoRA, step norm.  Steps of one token must run in order from 0 (they share a carry). */
void lr_core_step(LrState *state, float *h, int step, int pos, const float *e);
/* The normed state the head and the exit gate read after step `step` (runs the coda). */
void lr_readout(LrState *state, const float *h, int step, int pos, float *out);
/* The exit gate's logit of a readout; with act_mixing the halting logit of the latest core step
 * (the gate read the state there; `readout` is not read). */
float lr_gate_logit(const LrState *state, const float *readout);
void lr_logits(const LrState *state, const float *readout, float *logits);
int lr_argmax(const float *values, int n);

/* Layout bookkeeping of one position (looplm.cache.KVCache.after_step / finish). */
void lr_after_step(LrState *state, int step, int pos);
void lr_finish(LrState *state, int pos, int ran);

/* One token's whole loop with its exit rule and the layout's rules, as looplm.generate.Decoder.step:
 * at most max_steps steps; Q-exit at the first step n >= min_steps whose exit CDF reaches q (q > 1:
 * never); layouts that skip stop there, `full` runs on and keeps the exit step's readout.
 * logits (when not NULL) gets the chosen readout's logits and *best their argmax.  `dump`, when
 * not NULL, is called with every step's logits.  Returns the steps the token used. */
typedef void (*LrStepLogits)(void *context, int pos, int step, const float *logits, int vocab);
typedef struct {
    int max_steps, min_steps;
    double q;
    LrStepLogits dump;
    void *dump_context;
} LrExit;
int lr_token(LrState *state, int token, int pos, const LrExit *exit, float *logits, int *best);
/* A prompt at full depth (every token every step, as the batched forward prefill): the exit rule
 * decides on the last token only (its readout), as looplm.generate.Decoder.prefill.  Returns the
 * steps the last token used, or −1 when the memory for the per-step K/V of a shared-storage
 * layout (last, first, avg, modulo) cannot be had. */
int lr_prefill(LrState *state, const int *tokens, int count, int start, const LrExit *exit, float *logits,
               int *best);

/* Scratch floats one token needs at most, for `max_len` positions and `max_steps` loop steps. */
size_t lr_scratch_floats(const LrModel *model, int max_len, int max_steps);
/* "avx2" or "scalar": the weight × vector path (matvec.h) this build compiled. */
const char *lr_simd(void);

#endif
