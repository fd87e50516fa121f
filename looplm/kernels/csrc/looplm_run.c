/* looplm-run: generate text from a looplm GGUF file without Python.
 *
 *   make -C looplm/kernels/csrc && looplm/kernels/csrc/looplm-run model.gguf --prompt "Hello"
 *
 * It does what `looplm generate` does for one prompt: bos + the prompt's tokens, a prefill at full
 * depth, then one token at a time with the chosen exit policy (fixed steps, Q-exit, --min-steps,
 * steps beyond the trained T) and KV layout, greedy or sampled, streaming the text.  Every user
 * mistake is one line `looplm-run: error: …` and exit status 2.  docs/C_RUNTIME.md has the
 * details (the debug dump's format included). */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <time.h>

#include "lr_common.h"
#include "lr_gguf.h"
#include "lr_tokenizer.h"
#include "runtime.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_STEPS_FACTOR 4  /* at most 4 x the trained T, as looplm.exit_policy.MAX_STEPS_FACTOR */
/* At most this many cache slots (prelude + steps x (core + coda)): the state's set-up takes time quadratic in
 * them, and loop memory caching reads every earlier step's state (a file's loop_steps is bound by no tensor). */
#define MAX_SLOTS 4096
#define DUMP_MAGIC "LPLMLGT1"  /* the debug dump: magic, u32 vocab, then (i32 position, i32 step, f32[vocab])… */

static const char USAGE[] =
    "usage: looplm-run MODEL.gguf [options]\n"
    "Generate text from a looplm GGUF file (looplm export gguf) without Python.\n\n"
    "  -p, --prompt TEXT       prompt text, encoded with the file's tokenizer (bos first)\n"
    "      --prompt-ids IDS    comma-separated token ids instead of text (used as given)\n"
    "  -n, --max-new-tokens N  tokens to generate (default 128)\n"
    "      --steps N           loop steps per token (default: the trained T; may exceed it)\n"
    "  -q, --q Q               Q-exit: stop at the first step whose exit CDF reaches Q\n"
    "                          (neither given: the policy the file records, fixed T steps unless set)\n"
    "      --min-steps N       no early exit before step N (default 1, or the file's)\n"
    "      --layout L          KV layout: last_exited (default), full, last, first, avg, modulo,\n"
    "                          append_first (the fixed layout, and default, of a kv_append_first model)\n"
    "      --modulo-slots K    groups of the modulo layout (default 2)\n"
    "      --temperature T     0 = greedy (default)\n"
    "      --top-k K           sample among the K most likely tokens (0 = all)\n"
    "      --top-p P           nucleus sampling mass (default 1)\n"
    "      --seed S            sampling seed (default: the clock)\n"
    "      --show-steps        print the loop steps each token used (stderr)\n"
    "      --print-ids         print the generated token ids instead of text\n"
    "      --dump-logits FILE  write every position's per-step logits (binary, for tests)\n"
    "  -t, --threads N         threads (default: chosen from the model's size)\n"
    "      --tokenize          print the prompt's token ids (bos first) and exit\n"
    "      --info              describe the model and this build, then exit\n"
    "  -h, --help              this help\n";

typedef struct {
    const char *model, *prompt, *prompt_ids, *dump, *layout;
    long max_new, steps, min_steps, modulo_slots, top_k, threads;
    int min_steps_given;
    double q, temperature, top_p;
    unsigned long long seed;
    int seeded, show_steps, print_ids, info, tokenize;
} Options;

/* One line `looplm-run: error: …` and exit status 2; control characters a file's names or values may
 * carry are shown as '?', so the message stays one line. */
static void die(const char *format, ...) {
    char message[2 * LR_ERROR_BYTES];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(message, sizeof(message), format, arguments);
    va_end(arguments);
    for (char *c = message; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7F) *c = '?';
    fprintf(stderr, "looplm-run: error: %s\n", message);
    exit(2);
}

static long parse_long(const char *option, const char *text) {
    char *end;
    long value = strtol(text, &end, 10);
    if (!*text || *end) die("%s takes an integer, got '%s'", option, text);
    return value;
}

static double parse_double(const char *option, const char *text) {
    char *end;
    double value = strtod(text, &end);
    if (!*text || *end || value != value) die("%s takes a number, got '%s'", option, text);
    return value;
}

static void parse_arguments(int argc, char **argv, Options *o) {
    *o = (Options){.max_new = 128, .steps = -1, .min_steps = 1, .modulo_slots = 2, .q = -1.0, .top_p = 1.0, .layout = NULL};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(USAGE, stdout); exit(0); }
        if (!strcmp(a, "--show-steps")) { o->show_steps = 1; continue; }
        if (!strcmp(a, "--print-ids")) { o->print_ids = 1; continue; }
        if (!strcmp(a, "--info")) { o->info = 1; continue; }
        if (!strcmp(a, "--tokenize")) { o->tokenize = 1; continue; }
        if (a[0] != '-' || !a[1]) {
            if (o->model) die("unexpected argument '%s' (one model file; options start with -)", a);
            o->model = a;
            continue;
        }
        if (i + 1 >= argc) die("option %s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--prompt-ids")) o->prompt_ids = v;
        else if (!strcmp(a, "-n") || !strcmp(a, "--max-new-tokens")) o->max_new = parse_long(a, v);
        else if (!strcmp(a, "--steps")) o->steps = parse_long(a, v);
        else if (!strcmp(a, "-q") || !strcmp(a, "--q")) o->q = parse_double(a, v);
        else if (!strcmp(a, "--min-steps")) o->min_steps = parse_long(a, v), o->min_steps_given = 1;
        else if (!strcmp(a, "--layout")) o->layout = v;
        else if (!strcmp(a, "--modulo-slots")) o->modulo_slots = parse_long(a, v);
        else if (!strcmp(a, "--temperature")) o->temperature = parse_double(a, v);
        else if (!strcmp(a, "--top-k")) o->top_k = parse_long(a, v);
        else if (!strcmp(a, "--top-p")) o->top_p = parse_double(a, v);
        else if (!strcmp(a, "--seed")) { o->seed = (unsigned long long)parse_long(a, v); o->seeded = 1; }
        else if (!strcmp(a, "--dump-logits")) o->dump = v;
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o->threads = parse_long(a, v);
        else die("unknown option %s (see --help)", a);
    }
    if (!o->model) die("give a model file: looplm-run MODEL.gguf --prompt TEXT (see --help)");
    if (o->q != -1.0 && (o->q < 0 || o->q > 1)) die("q must be in [0, 1], got %g", o->q);
    if (o->steps != -1 && o->steps < 1) die("steps must be >= 1, got %ld", o->steps);
    if (o->min_steps < 1) die("min_steps must be >= 1, got %ld", o->min_steps);
    if (o->max_new < 0) die("max_new_tokens must be >= 0, got %ld", o->max_new);
    if (o->temperature < 0) die("temperature must be >= 0, got %g", o->temperature);
    if (o->top_k < 0) die("top_k must be >= 0, got %ld", o->top_k);
    if (!(o->top_p > 0 && o->top_p <= 1)) die("top_p must be in (0, 1], got %g", o->top_p);
    if (o->modulo_slots < 1) die("the modulo layout needs --modulo-slots >= 1, got %ld", o->modulo_slots);
    if (o->threads < 0) die("threads must be >= 0, got %ld", o->threads);
    if (!o->info && !!o->prompt == !!o->prompt_ids) die("give --prompt TEXT or --prompt-ids IDS (one of them)");
}

static int layout_of(const char *name) {
    static const char *const names[] = {"last_exited", "full", "last", "first", "avg", "modulo", "append_first"};
    for (int i = 0; i < 7; i++)
        if (!strcmp(name, names[i])) return i;
    die("the KV layout must be one of last_exited, full, last, first, avg, modulo, append_first, got '%s'", name);
    return 0;
}

/* ---- sampling (looplm.generate.sample_next's rules; the random numbers are this program's) ---- */
static uint64_t random_state;

static double uniform(void) {  /* splitmix64 → [0, 1) */
    uint64_t z = (random_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}

static int by_logit_descending(const void *a, const void *b) {
    float x = ((const float *)a)[0], y = ((const float *)b)[0];
    return x < y ? 1 : x > y ? -1 : 0;
}

static int sample(float *logits, int vocab, const Options *o, float *pairs) {
    const int best = lr_argmax(logits, vocab);
    for (int i = 0; i < (o->temperature == 0 ? 1 : vocab); i++)  /* NaN reaches every logit: greedy checks one */
        if (!isfinite(logits[o->temperature == 0 ? best : i]))
            die("the model's next-token scores are not finite (NaN or inf): it has overflowed; use fewer --steps"
                " (closer to the trained loop steps) or check the file's weights");
    if (o->temperature == 0) return best;
    for (int i = 0; i < vocab; i++) {
        pairs[2 * i] = (float)(logits[i] / o->temperature);
        memcpy(&pairs[2 * i + 1], &i, sizeof(int));
    }
    qsort(pairs, (size_t)vocab, 2 * sizeof(float), by_logit_descending);
    int kept = o->top_k && o->top_k < vocab ? (int)o->top_k : vocab;
    while (kept < vocab && pairs[2 * kept] == pairs[2 * (kept - 1)]) kept++;  /* ties with the k-th stay */
    double total = 0, top = pairs[0];
    for (int i = 0; i < kept; i++) total += exp(pairs[2 * i] - top);
    if (o->top_p < 1.0) {  /* drop a token once the probability mass before it reaches top_p */
        double before = 0;
        for (int i = 0; i < kept; i++) {
            if (before >= o->top_p) { kept = i; break; }
            before += exp(pairs[2 * i] - top) / total;
        }
        total = 0;
        for (int i = 0; i < kept; i++) total += exp(pairs[2 * i] - top);
    }
    double target = uniform() * total, running = 0;
    int chosen = 0;
    for (int i = 0; i < kept; i++) {
        running += exp(pairs[2 * i] - top);
        chosen = i;
        if (running > target) break;
    }
    int id;
    memcpy(&id, &pairs[2 * chosen + 1], sizeof(int));
    return id;
}

/* ---- the debug dump ---------------------------------------------------------------------- */
static void dump_step(void *context, int pos, int step, const float *logits, int vocab) {
    FILE *file = context;
    int32_t header[2] = {pos, step};
    if (fwrite(header, sizeof(header), 1, file) != 1 || fwrite(logits, sizeof(float), (size_t)vocab, file) != (size_t)vocab)
        die("cannot write the logits dump");
}

static double now(void) {
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Threads that pay off: one per MiB of a core layer's weights (a small model's products end before
 * a second thread would wake). */
static int default_threads(const LrConfig *c) {
    long layer_bytes = 4L * c->d_model * (4L * c->n_heads * c->head_dim + 3L * c->ffn_hidden);
    int threads = (int)(layer_bytes >> 20);
#ifdef _OPENMP
    if (threads > omp_get_max_threads()) threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    return threads < 1 ? 1 : threads;
}

static int *prompt_tokens(const Options *o, const LrTokenizer *tokenizer, int vocab, int *count) {
    char error[LR_ERROR_BYTES];
    int *ids = NULL;
    if (o->prompt_ids) {
        size_t n = 1;
        for (const char *p = o->prompt_ids; *p; p++) n += *p == ',';
        ids = malloc(n * sizeof(int));
        if (!ids) die("out of memory");
        *count = 0;
        for (const char *p = o->prompt_ids; *p;) {
            char *end;
            long id = strtol(p, &end, 10);
            if (end == p || (*end && *end != ',')) die("--prompt-ids takes comma-separated integers, got '%s'", o->prompt_ids);
            if (id < 0 || id >= vocab) die("prompt token id %ld is outside the vocabulary of %d", id, vocab);
            ids[(*count)++] = (int)id;
            p = *end ? end + 1 : end;
        }
        return ids;
    }
    if (!tokenizer) die("the model file has no tokenizer: give the prompt as --prompt-ids");
    int *text_ids = NULL;
    int n = lr_tokenizer_encode(tokenizer, o->prompt, strlen(o->prompt), &text_ids, error);
    if (n < 0) die("%s", error);
    ids = malloc(((size_t)n + 1) * sizeof(int));
    if (!ids) die("out of memory");
    ids[0] = lr_tokenizer_bos(tokenizer);
    memcpy(ids + 1, text_ids, (size_t)n * sizeof(int));
    free(text_ids);
    *count = n + 1;
    for (int i = 0; i < *count; i++)  /* a tokenizer larger than the model's vocabulary */
        if (ids[i] < 0 || ids[i] >= vocab)
            die("the prompt's token %d is outside the model's vocabulary of %d (tokenizer and model disagree)", ids[i],
                vocab);
    return ids;
}

static LrTokenizer *file_tokenizer(const Gguf *file) {
    char error[LR_ERROR_BYTES];
    size_t length;
    const char *json = gguf_string(file, "tokenizer.huggingface.json", &length);
    if (!json) return NULL;
    int64_t bos = -1, eos = -1, pad = -1;
    gguf_integer(file, "tokenizer.ggml.bos_token_id", &bos);
    gguf_integer(file, "tokenizer.ggml.eos_token_id", &eos);
    gguf_integer(file, "tokenizer.ggml.padding_token_id", &pad);
    LrTokenizer *tokenizer = lr_tokenizer_new(json, length, (int)bos, (int)eos, (int)pad, error);
    if (!tokenizer) die("%s", error);
    return tokenizer;
}

static void describe(const LrModel *model, const LrTokenizer *tokenizer, int threads) {
    const LrConfig *c = &model->config;
    static const char *const attention[] = {"mha", "gated", "mla"}, *const ffn[] = {"dense", "moe", "channelmix"};
    static const char *const injection[] = {"identity", "additive", "lti", "diagonal", "concat", "lti_residual"};
    printf("model: d_model %d, %d heads (%d kv), vocab %d, context %d\n", c->d_model, c->n_heads, c->n_kv_heads, c->vocab,
           c->max_seq_len);
    printf("loop: prelude %d, core %d x T %d, coda %d; layer pattern %s; attention %s; ffn %s; injection %s%s\n",
           c->prelude, c->core, c->loop_steps, c->coda, c->layer_pattern[0] ? c->layer_pattern : "A",
           attention[c->attention], ffn[c->ffn], injection[c->injection], c->exit_gate ? "; exit gate" : "");
    printf("tokenizer: %s\n", tokenizer ? "byte-level BPE" : "none (use --prompt-ids)");
    printf("build: simd %s, threads %d\n", lr_simd(), threads);
}

int main(int argc, char **argv) {
    Options o;
    char error[LR_ERROR_BYTES];
    parse_arguments(argc, argv, &o);
    Gguf *file = gguf_open(o.model, error);
    if (!file) die("%s", error);
    LrModel *model = lr_model_from_gguf(file, error);
    if (!model) die("%s", error);
    const LrConfig *c = &model->config;
    LrTokenizer *tokenizer = file_tokenizer(file);
    const int threads = o.threads ? (int)o.threads : default_threads(c);
    if (o.info) { describe(model, tokenizer, threads); return 0; }
    if (o.steps < 1 && o.q < 0) {  /* no policy named: the one the file records (fixed T steps unless set) */
        const char *spec = c->default_exit;
        if (!strncmp(spec, "q:", 2)) o.q = parse_double("the file's exit policy", spec + 2);
        else if (strcmp(spec, "static"))
            die("the file records the exit policy %s, which looplm-run does not run: name one with --steps N or"
                " --q Q", spec);
        if (c->max_loop_steps) o.steps = c->max_loop_steps;
        if (!o.min_steps_given) o.min_steps = c->min_loop_steps;
    }
    if (o.min_steps_given && o.min_steps > 1 && o.q < 0)
        die("--min-steps applies to Q-exit, and this run exits at a fixed depth: drop it or add --q Q");
    if (o.q >= 0 && !c->exit_gate) die("Q-exit needs a model with an exit gate: use fixed steps");
    const int max_steps = o.steps > 0 ? (int)o.steps : c->loop_steps;
    if (max_steps > (long)MAX_STEPS_FACTOR * c->loop_steps)
        die("steps must be at most %d (%d x the trained %d), got %d", MAX_STEPS_FACTOR * c->loop_steps,
            MAX_STEPS_FACTOR, c->loop_steps, max_steps);
    if (o.min_steps > max_steps) die("min_steps (%ld) must not exceed steps (%d)", o.min_steps, max_steps);
    const long slots = c->prelude + (long)max_steps * (c->core + c->coda);
    if (slots > MAX_SLOTS)
        die("%d steps of %d looped layers need %ld cache slots, more than this program keeps (%d): use fewer --steps",
            max_steps, c->core + c->coda, slots, MAX_SLOTS);
    /* the default layout follows the file: a kv_append_first model keeps step 1's K/V only */
    if (!o.layout) o.layout = c->kv_append_first ? "append_first" : "last_exited";
    const int layout = layout_of(o.layout);
    if (c->kv_append_first && layout != LR_APPEND_FIRST)
        die("this model attends to its first loop step's K/V (model.kv_append_first): its KV layout is append_first,"
            " not %s", o.layout);
    int count;
    int *prompt = prompt_tokens(&o, tokenizer, c->vocab, &count);
    if (o.tokenize) {
        for (int i = 0; i < count; i++) printf(i ? " %d" : "%d", prompt[i]);
        putchar('\n');
        return 0;
    }
    if (count == 0) die("the prompt is empty: give at least one token");
    if (count > c->max_seq_len)
        die("the prompt has %d tokens, longer than the context of %d: shorten it", count, c->max_seq_len);
    const long budget = o.max_new < c->max_seq_len - count ? o.max_new : c->max_seq_len - count;
    LrState *state = lr_state_new(model, count + (int)budget > 0 ? count + (int)budget : 1, max_steps, layout,
                                  (int)o.modulo_slots, 1, error);
    if (!state) die("%s", error);
    state->threads = threads;
    FILE *dump = NULL;
    if (o.dump) {
        dump = fopen(o.dump, "wb");
        if (!dump) die("cannot write the logits dump %s", o.dump);
        uint32_t vocab = (uint32_t)c->vocab;
        fwrite(DUMP_MAGIC, 8, 1, dump);
        fwrite(&vocab, sizeof(vocab), 1, dump);
    }
    random_state = o.seeded ? o.seed : (uint64_t)time(NULL);
    const LrExit exit_rule = {max_steps, (int)o.min_steps, o.q >= 0 ? o.q : 2.0, dump ? dump_step : NULL, dump};
    float *logits = malloc((size_t)c->vocab * sizeof(float)), *pairs = malloc(2 * (size_t)c->vocab * sizeof(float));
    int *steps_used = malloc(((size_t)budget + 1) * sizeof(int));
    size_t piece_capacity = 4096;
    char *piece = malloc(piece_capacity);
    if (!logits || !pairs || !steps_used || !piece) die("out of memory");
    const int eos = tokenizer ? lr_tokenizer_eos(tokenizer) : -1;
    double started = now();
    int best, steps = lr_prefill(state, prompt, count, 0, &exit_rule, logits, &best);
    if (steps < 0) die("out of memory for the prompt's per-step K/V (layout %s)", o.layout);
    double prefilled = now();
    long generated = 0;
    const char *stop = "length";
    if (budget < o.max_new) stop = "context";
    for (long index = 0; index < budget; index++) {
        int token = sample(logits, c->vocab, &o, pairs);
        if (token == eos) { stop = "stop_token"; break; }
        steps_used[generated++] = steps;
        if (o.print_ids) printf(generated > 1 ? " %d" : "%d", token);
        else if (tokenizer) {
            size_t bytes = lr_tokenizer_decode(tokenizer, token, piece, piece_capacity);
            if (bytes > piece_capacity) {  /* a longer token (the file's vocabulary): room for it, then again */
                free(piece);
                piece_capacity = bytes;
                piece = malloc(piece_capacity);
                if (!piece) die("out of memory");
                bytes = lr_tokenizer_decode(tokenizer, token, piece, piece_capacity);
            }
            fwrite(piece, 1, bytes, stdout);
        }
        fflush(stdout);
        if (index + 1 < budget) steps = lr_token(state, token, count + (int)index, &exit_rule, logits, &best);
    }
    double finished = now();
    putchar('\n');
    if (o.show_steps) {
        double total = 0;
        fputs("steps per token: [", stderr);
        for (long i = 0; i < generated; i++) {
            fprintf(stderr, i ? ", %d" : "%d", steps_used[i]);
            total += steps_used[i];
        }
        fprintf(stderr, "]  (mean %.2f; stop: %s)\n", generated ? total / generated : 0.0, stop);
    }
    double decode = finished - prefilled;
    fprintf(stderr, "looplm-run: %ld tokens in %.3f s (%.1f tokens/s); prompt of %d tokens in %.3f s; %d threads, %s\n",
            generated, decode, generated > 1 && decode > 0 ? (generated - 1) / decode : 0.0, count, prefilled - started,
            threads, lr_simd());
    if (dump && fclose(dump) != 0) die("cannot write the logits dump %s", o.dump);
    free(logits); free(pairs); free(steps_used); free(piece); free(prompt);
    lr_state_free(state);
    lr_tokenizer_free(tokenizer);
    lr_model_free(model);
    gguf_close(file);
    return 0;
}
