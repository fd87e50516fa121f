/* The model config: looplm.config.ModelConfig as JSON → LrConfig.
 *
 * Every key of the JSON must be one this runtime knows: a key from a newer looplm (a feature this
 * runtime has never heard of) is refused by name, so nothing runs silently wrong.  Values are
 * checked as ModelConfig.__post_init__ checks them, plus what the runtime itself relies on. */
#include <math.h>

#include "lr_common.h"
#include "lr_json.h"
#include "runtime.h"

/* looplm.config.model's MAX_CONTEXT and MAX_VOCAB: the RoPE tables alone are max_seq_len x head dims */
#define LR_MAX_CONTEXT (1 << 20)
#define LR_MAX_VOCAB (1 << 24)
#define LR_MAX_ROPE_ENTRIES (1LL << 28)  /* ... and MAX_ROPE_ENTRIES: max_seq_len x RoPE dims */

/* Keys decoding does not read: training only (initialisation, balancing updates, gradient flow,
 * or folded into a stored tensor (initial_noise_std: the noise table). */
static const char *const UNUSED_KEYS[] = {"init_std", "loop_mc_detach", "moe_bias_update_rate",
                                            "moe_aux_loss_weight", "initial_noise_std", "mc_detach",
                                            "auto_size", "dropout"};

typedef struct {
    const char *name;
    int *target;
} IntKey;

static int choose(const JsonNode *node, const char *key, const char *const *names, int count, int *out, char *error) {
    if (!node || node->kind != JSON_STRING) return lr_fail(error, "model config: %s must be a string", key);
    for (int i = 0; i < count; i++)
        if (strcmp(node->string, names[i]) == 0) { *out = i; return 1; }
    return lr_fail(error, "model config: %s=%s is not supported by this runtime; decode with looplm generate"
                          " --backend reference", key, node->string);
}

static int boolean(const JsonNode *node, const char *key, int *out, char *error) {
    if (!node || node->kind != JSON_BOOL) return lr_fail(error, "model config: %s must be true or false", key);
    *out = (int)node->number;
    return 1;
}

static int integer(const JsonNode *node, const char *key, int *out, char *error) {
    if (!node || node->kind != JSON_NUMBER || node->number != floor(node->number) || fabs(node->number) > 1e9)
        return lr_fail(error, "model config: %s must be an integer", key);
    *out = (int)node->number;
    return 1;
}

char lr_layer_kind(const LrConfig *config, int index) {
    size_t length = strlen(config->layer_pattern);
    return length ? config->layer_pattern[index % length] : 'A';
}

static int check(int condition, char *error, const char *message) {
    return condition ? 1 : lr_fail(error, "model config: %s", message);
}

int lr_config_parse(const char *json, size_t length, LrConfig *config, char *error) {
    static const char *const attention[] = {"mha", "gated", "mla"};
    static const char *const injections[] = {"identity", "additive", "lti", "diagonal", "concat", "lti_residual"};
    static const char *const ffns[] = {"dense", "moe", "channelmix"};
    static const char *const norms[] = {"pre", "sandwich"};
    static const char *const initial[] = {"prelude", "noise"};
    static const char *const norm_types[] = {"rms", "layer"};
    JsonNode *root = json_parse(json, length, error);
    if (!root) return 0;
    int ok = 0, kv_heads_null = 0;
    memset(config, 0, sizeof(*config));
    if (root->kind != JSON_OBJECT) { lr_fail(error, "model config: not a JSON object"); goto done; }
    IntKey ints[] = {
        {"vocab_size", &config->vocab}, {"d_model", &config->d_model}, {"n_heads", &config->n_heads},
        {"ffn_hidden", &config->ffn_hidden}, {"n_prelude_layers", &config->prelude},
        {"n_core_layers", &config->core}, {"n_coda_layers", &config->coda}, {"loop_steps", &config->loop_steps},
        {"max_seq_len", &config->max_seq_len}, {"mc_segment_size", &config->mc_segment_size},
        {"mc_top_k", &config->mc_top_k}, {"loop_mc_top_k", &config->loop_mc_top_k},
        {"rwkv_slots", &config->rwkv_slots}, {"rwkv_decay_rank", &config->rwkv_decay_rank},
        {"mla_kv_rank", &config->mla_kv_rank}, {"mla_q_rank", &config->mla_q_rank},
        {"mla_rope_dim", &config->mla_rope_dim}, {"depth_lora_rank", &config->depth_lora_rank},
        {"n_experts", &config->n_experts}, {"n_shared_experts", &config->n_shared_experts},
        {"moe_top_k", &config->moe_top_k}, {"expert_hidden", &config->expert_hidden},
    };
    IntKey bools[] = {
        {"loop_mc", &config->loop_mc}, {"global_gates", &config->global_gates},
        {"zero_centered_norm", &config->zero_centered_norm}, {"step_norm", &config->step_norm},
        {"tie_embeddings", &config->tie_embeddings}, {"exit_gate", &config->exit_gate},
        {"loop_index_embedding", &config->loop_index_embedding},
    };
    const size_t n_ints = sizeof(ints) / sizeof(ints[0]), n_bools = sizeof(bools) / sizeof(bools[0]);
    for (size_t i = 0; i < root->length; i++) {  /* every key must be known */
        const char *key = root->keys[i];
        int known = 0;
        for (size_t j = 0; j < n_ints && !known; j++) known = strcmp(key, ints[j].name) == 0;
        for (size_t j = 0; j < n_bools && !known; j++) known = strcmp(key, bools[j].name) == 0;
        for (size_t j = 0; j < sizeof(UNUSED_KEYS) / sizeof(UNUSED_KEYS[0]) && !known; j++)
            known = strcmp(key, UNUSED_KEYS[j]) == 0;
        static const char *const others[] = {"n_kv_heads", "rope_theta", "rope_fraction", "attention",
                                             "layer_pattern", "norm", "norm_eps", "injection", "initial_state",
                                             "ffn", "ternary", "hyper_connections", "attnres_block_size",
                                             "kv_append_first", "default_exit", "min_loop_steps",
                                             "max_loop_steps", "norm_type", "embed_norm", "depth_lora_position", "act_threshold",
                                             "act_mixing", "moe_scope", "shared_expert_hidden", "mla_nope_dim",
                                             "mla_value_dim"};
        for (size_t j = 0; j < sizeof(others) / sizeof(others[0]) && !known; j++) known = strcmp(key, others[j]) == 0;
        if (!known) {
            lr_fail(error, "model config: unknown key %s (a feature of a newer looplm this runtime cannot run)", key);
            goto done;
        }
    }
    for (size_t j = 0; j < n_ints; j++)
        if (!integer(json_get(root, ints[j].name), ints[j].name, ints[j].target, error)) goto done;
    for (size_t j = 0; j < n_bools; j++)
        if (!boolean(json_get(root, bools[j].name), bools[j].name, bools[j].target, error)) goto done;
    const JsonNode *node = json_get(root, "n_kv_heads");
    if (node && node->kind == JSON_NULL) kv_heads_null = 1;
    else if (!integer(node, "n_kv_heads", &config->n_kv_heads, error)) goto done;
    if (kv_heads_null) config->n_kv_heads = config->n_heads;
    const char *floats[] = {"rope_theta", "rope_fraction", "norm_eps"};
    double values[3];
    for (int j = 0; j < 3; j++) {
        node = json_get(root, floats[j]);
        if (!node || node->kind != JSON_NUMBER) { lr_fail(error, "model config: %s must be a number", floats[j]); goto done; }
        values[j] = node->number;
    }
    config->rope_theta = values[0];
    config->rope_fraction = values[1];
    config->norm_eps = (float)values[2];
    int sandwich = 0, noise = 0;
    if (!choose(json_get(root, "attention"), "attention", attention, 3, &config->attention, error)) goto done;
    if (!choose(json_get(root, "injection"), "injection", injections, 6, &config->injection, error)) goto done;
    if (!choose(json_get(root, "ffn"), "ffn", ffns, 3, &config->ffn, error)) goto done;
    if (!choose(json_get(root, "norm"), "norm", norms, 2, &sandwich, error)) goto done;
    if (!choose(json_get(root, "initial_state"), "initial_state", initial, 2, &noise, error)) goto done;
    config->sandwich = sandwich;
    config->noise_initial_state = noise;
    node = json_get(root, "layer_pattern");
    if (!node || node->kind != JSON_STRING || node->length > LR_MAX_PATTERN) {
        lr_fail(error, "model config: layer_pattern must be a string of at most %d letters", LR_MAX_PATTERN);
        goto done;
    }
    for (size_t j = 0; j < node->length; j++)
        if (!strchr("AGR", node->string[j]) || !node->string[j]) {
            lr_fail(error, "model config: layer kind '%c' in layer_pattern is not supported by this runtime",
                    node->string[j]);
            goto done;
        }
    memcpy(config->layer_pattern, node->string, node->length + 1);
    /* Later features, optional in the JSON (files written before them lack the keys: off). */
    node = json_get(root, "ternary");
    if (node) {
        static const char *const scopes[] = {"none", "core", "all"};
        if (!choose(node, "ternary", scopes, 3, &config->ternary, error)) goto done;
    }
    config->streams = 1;
    node = json_get(root, "hyper_connections");
    if (node && !integer(node, "hyper_connections", &config->streams, error)) goto done;
    if (config->streams < 1) config->streams = 1;  /* 0 or 1: off */
    node = json_get(root, "attnres_block_size");
    if (node && !integer(node, "attnres_block_size", &config->attnres_block_size, error)) goto done;
    node = json_get(root, "kv_append_first");
    if (node && !boolean(node, "kv_append_first", &config->kv_append_first, error)) goto done;
    /* The faithful source variants' keys: the runtime runs their defaults only. */
    node = json_get(root, "norm_type");
    if (node && !choose(node, "norm_type", norm_types, 2, &config->layer_norm, error)) goto done;
    node = json_get(root, "embed_norm");
    if (node && !boolean(node, "embed_norm", &config->embed_norm, error)) goto done;
    static const char *const lora_positions[] = {"input", "output"}, *const moe_scopes[] = {"all", "core"};
    node = json_get(root, "depth_lora_position");
    if (node && !choose(node, "depth_lora_position", lora_positions, 2, &config->lora_output, error)) goto done;
    node = json_get(root, "moe_scope");
    if (node && !choose(node, "moe_scope", moe_scopes, 2, &config->moe_core, error)) goto done;
    node = json_get(root, "act_mixing");
    if (node && !boolean(node, "act_mixing", &config->act_mixing, error)) goto done;
    config->act_threshold = 0.99f;
    node = json_get(root, "act_threshold");
    if (node) {
        if (node->kind != JSON_NUMBER || !(node->number > 0 && node->number <= 1)) {
            lr_fail(error, "model config: act_threshold must be a number in (0, 1]");
            goto done;
        }
        config->act_threshold = (float)node->number;
    }
    strcpy(config->default_exit, "static");
    config->min_loop_steps = 1;
    node = json_get(root, "default_exit");
    if (node) {
        if (node->kind != JSON_STRING || node->length > LR_MAX_PATTERN) {
            lr_fail(error, "model config: default_exit must be a short string");
            goto done;
        }
        memcpy(config->default_exit, node->string, node->length + 1);
    }
    if ((json_get(root, "min_loop_steps") &&
         !integer(json_get(root, "min_loop_steps"), "min_loop_steps", &config->min_loop_steps, error)) ||
        (json_get(root, "max_loop_steps") &&
         !integer(json_get(root, "max_loop_steps"), "max_loop_steps", &config->max_loop_steps, error)))
        goto done;
    if (config->streams > 1 && config->act_mixing) {
        lr_fail(error, "model config: ACT mixing (model.act_mixing) over hyper-connection streams"
                       " (model.hyper_connections) is not run by this runtime; decode with looplm generate"
                       " --backend reference");
        goto done;
    }
    /* what ModelConfig checks, and what the runtime's arithmetic relies on */
    const LrConfig *c = config;
    if (!check(c->vocab >= 2 && c->d_model >= 1 && c->n_heads >= 1 && c->d_model % c->n_heads == 0, error,
               "vocab_size >= 2 and n_heads dividing d_model") ||
        !check(c->n_kv_heads >= 1 && c->n_heads % c->n_kv_heads == 0, error, "n_kv_heads must divide n_heads") ||
        !check((c->d_model / c->n_heads) % 2 == 0, error, "d_model / n_heads must be even") ||
        !check(c->ffn_hidden >= 1 && c->prelude >= 0 && c->coda >= 0 && c->core >= 1 && c->loop_steps >= 1 &&
               c->max_seq_len >= 1, error, "layer counts, ffn_hidden, loop_steps and max_seq_len out of range") ||
        !check(c->max_seq_len <= LR_MAX_CONTEXT && c->vocab <= LR_MAX_VOCAB, error,
               "max_seq_len must be at most 2^20 and vocab_size at most 2^24 (ModelConfig's bounds)") ||
        !check(c->rope_theta > 0 && c->rope_fraction > 0 && c->rope_fraction <= 1, error, "rope_theta / rope_fraction") ||
        !check(c->mc_segment_size >= 0 && c->mc_top_k >= 1 && c->loop_mc_top_k >= 1, error, "memory caching sizes") ||
        !check(c->rwkv_slots >= 1 && c->rwkv_decay_rank >= 1, error, "rwkv_slots and rwkv_decay_rank must be >= 1") ||
        !check(c->attention != LR_ATTENTION_MLA || (c->mla_kv_rank >= 1 && c->mla_q_rank >= 0 && c->mla_rope_dim >= 2 &&
               c->mla_rope_dim % 2 == 0), error, "MLA ranks") ||
        !check(c->ffn != LR_FFN_MOE || (c->n_experts >= 1 && c->moe_top_k >= 1 && c->moe_top_k <= c->n_experts &&
               c->n_shared_experts >= 0 && c->expert_hidden >= 1), error, "MoE sizes") ||
        !check(c->depth_lora_rank >= 0, error, "depth_lora_rank must be >= 0") ||
        !check(c->attnres_block_size >= 0, error, "attnres_block_size must be >= 0 (0 = off)") ||
        !check(!(c->streams > 1 && c->attnres_block_size), error,
               "hyper_connections and attnres_block_size both replace the residual sum: choose one") ||
        !check(c->min_loop_steps >= 1 && c->max_loop_steps >= 0 &&
               (!c->max_loop_steps || c->min_loop_steps <= c->max_loop_steps), error,
               "min_loop_steps must be >= 1 and at most max_loop_steps (0 = loop_steps)") ||
        !check(!c->loop_index_embedding || c->d_model >= 16, error, "loop_index_embedding needs d_model >= 16") ||
        !check(!(c->noise_initial_state && c->injection == LR_INJECT_IDENTITY), error,
               "initial_state=noise needs an injection") ||
        !check(!c->act_mixing || (c->exit_gate && !c->step_norm), error, "act_mixing needs exit_gate and no step_norm"))
        goto done;
    config->head_dim = config->d_model / config->n_heads;
    config->rope_dim = config->attention == LR_ATTENTION_MLA
                           ? config->mla_rope_dim
                           : 2 * (int)(config->head_dim * config->rope_fraction / 2);
    if (!check(config->rope_dim >= 2, error, "rope_fraction must rotate at least 2 head dims") ||
        !check((long long)config->max_seq_len * config->rope_dim <= LR_MAX_ROPE_ENTRIES, error,
               "max_seq_len x RoPE dims must be at most 2^28 (ModelConfig's bound: the RoPE tables)"))
        goto done;
    static const char *const widths[] = {"shared_expert_hidden", "mla_nope_dim", "mla_value_dim"};
    int *const width_targets[] = {&config->shared_expert_hidden, &config->mla_nope_dim, &config->mla_value_dim};
    for (int j = 0; j < 3; j++) {  /* absent or null: expert_hidden / head_dim, as ModelConfig fills them */
        *width_targets[j] = j == 0 ? config->expert_hidden : config->head_dim;
        node = json_get(root, widths[j]);
        if (node && node->kind != JSON_NULL && !integer(node, widths[j], width_targets[j], error)) goto done;
        if (*width_targets[j] < 1) { lr_fail(error, "model config: %s must be >= 1", widths[j]); goto done; }
    }
    ok = 1;
done:
    json_free(root);
    return ok;
}
