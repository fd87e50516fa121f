/* Byte-level BPE (see lr_tokenizer.h).
 *
 * Encoding, as Hugging Face tokenizers does it for looplm's files:
 *   1. pre-tokenise with GPT-2's pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      (alternatives tried in order at each position; implemented by hand over code points with
 *      the classes of lr_unicode.h);
 *   2. map each piece's UTF-8 bytes to GPT-2's printable byte characters;
 *   3. BPE: start from one symbol per byte character and repeatedly merge the adjacent pair of
 *      lowest merge rank (the leftmost of equal ranks), as tokenizers' BPE model does. */
#include "lr_tokenizer.h"

#include <stdint.h>

#include "lr_common.h"
#include "lr_json.h"
#include "lr_unicode.h"

typedef struct {
    char *key;
    size_t length;
    int id;
} Entry;

typedef struct {
    uint64_t pair;  /* left id << 32 | right id, 0 = empty (ids are < 2^31, and pair (0, 0) is stored +1) */
    int rank, merged;
} Merge;

struct LrTokenizer {
    int vocab_size, bos, eos, pad;
    char **pieces;          /* id → token string (byte-level characters, UTF-8) */
    size_t *piece_lengths;
    Entry *table;           /* string → id, open addressing */
    size_t table_size;
    Merge *merges;          /* (left, right) → rank and merged id, open addressing */
    size_t merges_size;
    int byte_ids[256];      /* the id of each byte's character */
    int char_to_byte[324];  /* byte-level character code point → byte (−1: none) */
    uint32_t byte_chars[256];
    int add_prefix_space, use_regex, ignore_merges;
};

static uint64_t hash_bytes(const char *text, size_t length) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < length; i++) h = (h ^ (unsigned char)text[i]) * 1099511628211ULL;
    return h;
}

static int lookup(const LrTokenizer *t, const char *text, size_t length) {
    for (size_t i = hash_bytes(text, length) & (t->table_size - 1);; i = (i + 1) & (t->table_size - 1)) {
        const Entry *e = &t->table[i];
        if (!e->key) return -1;
        if (e->length == length && memcmp(e->key, text, length) == 0) return e->id;
    }
}

static void insert(LrTokenizer *t, char *text, size_t length, int id) {
    size_t i = hash_bytes(text, length) & (t->table_size - 1);
    while (t->table[i].key) i = (i + 1) & (t->table_size - 1);
    t->table[i] = (Entry){text, length, id};
}

static uint64_t pair_key(int left, int right) { return ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1; }

static const Merge *find_merge(const LrTokenizer *t, int left, int right) {
    const uint64_t key = pair_key(left, right);
    for (size_t i = (key * 0x9E3779B97F4A7C15ULL) >> 20 & (t->merges_size - 1);; i = (i + 1) & (t->merges_size - 1)) {
        if (!t->merges[i].pair) return NULL;
        if (t->merges[i].pair == key) return &t->merges[i];
    }
}

static size_t power_of_two_above(size_t n) {
    size_t size = 16;
    while (size < 2 * n) size *= 2;
    return size;
}

/* GPT-2's byte → printable character table: printable Latin-1 bytes map to themselves, the other
 * bytes to 256, 257, … in byte order. */
static void byte_table(LrTokenizer *t) {
    int next = 256;
    for (int i = 0; i < 324; i++) t->char_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        t->byte_chars[b] = printable ? (uint32_t)b : (uint32_t)next++;
        t->char_to_byte[t->byte_chars[b]] = b;
    }
}

static size_t put_utf8(char *out, uint32_t c) {
    if (c < 0x80) { out[0] = (char)c; return 1; }
    if (c < 0x800) { out[0] = (char)(0xC0 | (c >> 6)); out[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12)); out[1] = (char)(0x80 | ((c >> 6) & 0x3F)); out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18)); out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F)); out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* The code point at text[*at] (advancing *at); invalid UTF-8 reads as U+FFFD, one byte at a time. */
static uint32_t next_code(const char *text, size_t length, size_t *at) {
    const unsigned char *s = (const unsigned char *)text + *at;
    size_t left = length - *at;
    uint32_t c = s[0];
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 1) { *at += 1; return c; }
    if (n == 0 || (size_t)n > left) { *at += 1; return 0xFFFD; }
    c &= 0x3F >> (n - 1);
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) { *at += 1; return 0xFFFD; }
        c = c << 6 | (s[i] & 0x3F);
    }
    static const uint32_t smallest[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < smallest[n] || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000)) { *at += 1; return 0xFFFD; }
    *at += (size_t)n;
    return c;
}

static int in_ranges(const uint32_t (*ranges)[2], size_t count, uint32_t c) {
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < ranges[mid][0]) hi = mid;
        else if (c > ranges[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define COUNT(table) (sizeof(table) / sizeof(table[0]))
static int is_letter(uint32_t c) { return in_ranges(LR_LETTERS, COUNT(LR_LETTERS), c); }
static int is_number(uint32_t c) { return in_ranges(LR_NUMBERS, COUNT(LR_NUMBERS), c); }
static int is_space(uint32_t c) { return in_ranges(LR_SPACES, COUNT(LR_SPACES), c); }
static int is_other(uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

/* The length (in code points) of the pattern's match at code point i of `codes` [n] (never 0). */
static size_t match_piece(const uint32_t *codes, size_t n, size_t i) {
    const uint32_t c = codes[i];
    if (c == '\'' && i + 1 < n) {  /* 's 't 're 've 'm 'll 'd */
        uint32_t a = codes[i + 1], b = i + 2 < n ? codes[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    int (*classes[3])(uint32_t) = {is_letter, is_number, is_other};
    for (int k = 0; k < 3; k++) {  /*  ?\p{L}+ |  ?\p{N}+ |  ?[^\s\p{L}\p{N}]+ */
        size_t j = i + (c == ' ' && i + 1 < n && classes[k](codes[i + 1]));
        if (!classes[k](codes[j])) continue;
        while (j < n && classes[k](codes[j])) j++;
        return j - i;
    }
    size_t end = i;  /* \s+(?!\S) | \s+ */
    while (end < n && is_space(codes[end])) end++;
    if (end < n && end - i >= 2) return end - 1 - i;  /* leave the last space to the next piece */
    return end - i;
}

/* BPE of one piece given as symbol ids [count] (in place); returns the new count. */
static size_t merge_symbols(const LrTokenizer *t, int *symbols, size_t count) {
    while (count > 1) {
        int best_rank = -1, best_merged = 0;
        size_t best_at = 0;
        for (size_t i = 0; i + 1 < count; i++) {
            const Merge *m = find_merge(t, symbols[i], symbols[i + 1]);
            if (m && (best_rank < 0 || m->rank < best_rank)) { best_rank = m->rank; best_merged = m->merged; best_at = i; }
        }
        if (best_rank < 0) break;
        symbols[best_at] = best_merged;
        memmove(symbols + best_at + 1, symbols + best_at + 2, (count - best_at - 2) * sizeof(int));
        count--;
    }
    return count;
}

/* Append the tokens of text bytes [begin, end) (one pre-tokenised piece) to *ids. */
static int encode_piece(const LrTokenizer *t, const char *text, size_t begin, size_t end, int **ids, int *count,
                        int *capacity, char *error) {
    size_t n = end - begin;
    if ((size_t)*count + n > (size_t)*capacity) {
        int wanted = *capacity ? *capacity : 64;
        while ((size_t)wanted < (size_t)*count + n) wanted *= 2;
        int *grown = realloc(*ids, (size_t)wanted * sizeof(int));
        if (!grown) return lr_fail(error, "out of memory encoding text");
        *ids = grown;
        *capacity = wanted;
    }
    int *symbols = *ids + *count;
    if (t->ignore_merges) {  /* a whole piece in the vocabulary is one token */
        char *chars = malloc(4 * n + 1);
        size_t at = 0;
        if (!chars) return lr_fail(error, "out of memory encoding text");
        for (size_t i = begin; i < end; i++) at += put_utf8(chars + at, t->byte_chars[(unsigned char)text[i]]);
        int id = lookup(t, chars, at);
        free(chars);
        if (id >= 0) { symbols[0] = id; *count += 1; return 1; }
    }
    for (size_t i = 0; i < n; i++) symbols[i] = t->byte_ids[(unsigned char)text[begin + i]];
    *count += (int)merge_symbols(t, symbols, n);
    return 1;
}

int lr_tokenizer_encode(const LrTokenizer *t, const char *text, size_t length, int **ids, char *error) {
    /* UTF-8 with invalid bytes replaced, and the code points for the pattern */
    size_t capacity_bytes = 3 * length + 2, at = 0, n = 0, bytes = 0;
    char *clean = malloc(capacity_bytes);
    uint32_t *codes = malloc((length + 2) * sizeof(uint32_t));
    size_t *offsets = malloc((length + 3) * sizeof(size_t));
    int count = 0, capacity = 0, ok = 1;
    *ids = NULL;
    if (!clean || !codes || !offsets) { ok = lr_fail(error, "out of memory encoding text"); goto done; }
    if (t->add_prefix_space && length && text[0] != ' ') { codes[n] = ' '; offsets[n++] = bytes; clean[bytes++] = ' '; }
    while (at < length) {
        uint32_t c = next_code(text, length, &at);
        codes[n] = c;
        offsets[n++] = bytes;
        bytes += put_utf8(clean + bytes, c);
    }
    offsets[n] = bytes;
    if (!t->use_regex) {
        ok = encode_piece(t, clean, 0, bytes, ids, &count, &capacity, error);
        goto done;
    }
    for (size_t i = 0; i < n && ok;) {
        size_t m = match_piece(codes, n, i);
        ok = encode_piece(t, clean, offsets[i], offsets[i + m], ids, &count, &capacity, error);
        i += m;
    }
done:
    free(clean);
    free(codes);
    free(offsets);
    if (!ok) { free(*ids); *ids = NULL; return -1; }
    return count;
}

size_t lr_tokenizer_decode(const LrTokenizer *t, int id, char *out, size_t capacity) {
    if (id < 0 || id >= t->vocab_size || id == t->bos || id == t->eos || id == t->pad || !t->pieces[id]) return 0;
    const char *piece = t->pieces[id];
    const size_t length = t->piece_lengths[id];
    size_t at = 0, n = 0;
    int all_bytes = 1;
    while (at < length) {  /* every character a byte character: the bytes; otherwise the text itself */
        uint32_t c = next_code(piece, length, &at);
        if (c >= 324 || t->char_to_byte[c] < 0) { all_bytes = 0; break; }
    }
    if (!all_bytes) {
        n = length < capacity ? length : capacity;
        memcpy(out, piece, n);
        return length;
    }
    at = 0;
    while (at < length) {
        uint32_t c = next_code(piece, length, &at);
        if (n < capacity) out[n] = (char)t->char_to_byte[c];
        n++;
    }
    return n;
}

int lr_tokenizer_vocab_size(const LrTokenizer *t) { return t->vocab_size; }
int lr_tokenizer_bos(const LrTokenizer *t) { return t->bos; }
int lr_tokenizer_eos(const LrTokenizer *t) { return t->eos; }

void lr_tokenizer_free(LrTokenizer *t) {
    if (!t) return;
    for (int i = 0; t->pieces && i < t->vocab_size; i++) free(t->pieces[i]);
    free(t->pieces);
    free(t->piece_lengths);
    free(t->table);
    free(t->merges);
    free(t);
}

static const char *type_of(const JsonNode *node) {
    const JsonNode *type = json_get(node, "type");
    return type && type->kind == JSON_STRING ? type->string : "";
}

static int truthy(const JsonNode *node, const char *key) {
    const JsonNode *value = json_get(node, key);
    return value && value->kind == JSON_BOOL && value->number;
}

static int unset(const JsonNode *node, const char *key) {
    const JsonNode *value = json_get(node, key);
    return !value || value->kind == JSON_NULL || (value->kind == JSON_STRING && value->length == 0) ||
           (value->kind == JSON_BOOL && !value->number);
}

/* What this reader implements; anything else is refused by name. */
static int supported(const JsonNode *root, char *error) {
    const JsonNode *model = json_get(root, "model"), *pre = json_get(root, "pre_tokenizer");
    const JsonNode *normalizer = json_get(root, "normalizer"), *decoder = json_get(root, "decoder");
    if (!model || strcmp(type_of(model), "BPE") != 0)
        return lr_fail(error, "tokenizer model %s is not supported (byte-level BPE only)", model ? type_of(model) : "(none)");
    if (normalizer && normalizer->kind != JSON_NULL)
        return lr_fail(error, "tokenizer normalizer %s is not supported", type_of(normalizer));
    if (!pre || strcmp(type_of(pre), "ByteLevel") != 0)
        return lr_fail(error, "tokenizer pre_tokenizer %s is not supported (ByteLevel only)", pre ? type_of(pre) : "(none)");
    if (decoder && decoder->kind != JSON_NULL && strcmp(type_of(decoder), "ByteLevel") != 0)
        return lr_fail(error, "tokenizer decoder %s is not supported (ByteLevel only)", type_of(decoder));
    static const char *const unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                                              "dropout"};
    for (int i = 0; i < 4; i++)
        if (!unset(model, unsupported[i])) return lr_fail(error, "tokenizer BPE option %s is not supported", unsupported[i]);
    const JsonNode *added = json_get(root, "added_tokens");
    for (size_t i = 0; added && added->kind == JSON_ARRAY && i < added->length; i++)
        if (!truthy(&added->items[i], "special"))
            return lr_fail(error, "tokenizer added token that is not special is not supported");
    return 1;
}

/* A merge's two halves: "A B" (older files) or ["A", "B"]. */
static int merge_halves(const JsonNode *merge, const char **left, size_t *left_length, const char **right,
                        size_t *right_length) {
    if (merge->kind == JSON_ARRAY && merge->length == 2 && merge->items[0].kind == JSON_STRING &&
        merge->items[1].kind == JSON_STRING) {
        *left = merge->items[0].string; *left_length = merge->items[0].length;
        *right = merge->items[1].string; *right_length = merge->items[1].length;
        return 1;
    }
    if (merge->kind != JSON_STRING) return 0;
    const char *space = memchr(merge->string, ' ', merge->length);
    if (!space) return 0;
    *left = merge->string; *left_length = (size_t)(space - merge->string);
    *right = space + 1; *right_length = merge->length - *left_length - 1;
    return 1;
}

/* Set `node`'s id (a vocab value or an added token's "id") into *id; 0 when malformed. */
static int entry_id(const JsonNode *node, int *id) {
    if (!node || node->kind != JSON_NUMBER || node->number < 0 || node->number > 1e7 || node->number != (int)node->number)
        return 0;
    *id = (int)node->number;
    return 1;
}

static int add_piece(LrTokenizer *t, int id, const char *text, size_t length, int index_it, char *error) {
    if (t->pieces[id]) return 1;  /* a special token also in the vocab: one piece */
    t->pieces[id] = lr_strndup(text, length);
    t->piece_lengths[id] = length;
    if (!t->pieces[id]) return lr_fail(error, "out of memory reading the tokenizer");
    if (index_it) insert(t, t->pieces[id], length, id);
    return 1;
}

static int read_merges(LrTokenizer *t, const JsonNode *merges, char *error) {
    const size_t count = merges && merges->kind == JSON_ARRAY ? merges->length : 0;
    t->merges_size = power_of_two_above(count);
    t->merges = lr_calloc(t->merges_size, sizeof(Merge), error);
    if (!t->merges) return 0;
    for (size_t rank = 0; rank < count; rank++) {
        const char *left, *right;
        size_t left_length, right_length;
        if (!merge_halves(&merges->items[rank], &left, &left_length, &right, &right_length))
            return lr_fail(error, "tokenizer merge %zu is malformed", rank);
        char *joined = malloc(left_length + right_length + 1);
        if (!joined) return lr_fail(error, "out of memory reading the tokenizer");
        memcpy(joined, left, left_length);
        memcpy(joined + left_length, right, right_length);
        int a = lookup(t, left, left_length), b = lookup(t, right, right_length);
        int merged = lookup(t, joined, left_length + right_length);
        free(joined);
        if (a < 0 || b < 0 || merged < 0)
            return lr_fail(error, "tokenizer merge %zu names a token that is not in the vocabulary", rank);
        const uint64_t key = pair_key(a, b);
        size_t i = (key * 0x9E3779B97F4A7C15ULL) >> 20 & (t->merges_size - 1);
        while (t->merges[i].pair && t->merges[i].pair != key) i = (i + 1) & (t->merges_size - 1);
        t->merges[i] = (Merge){key, (int)rank, merged};  /* a repeated pair keeps its last rank, as tokenizers */
    }
    return 1;
}

LrTokenizer *lr_tokenizer_new(const char *json, size_t length, int bos, int eos, int pad, char *error) {
    JsonNode *root = json_parse(json, length, error);
    LrTokenizer *t = NULL;
    if (!root) return NULL;
    if (!supported(root, error)) goto fail;
    const JsonNode *model = json_get(root, "model"), *vocab = json_get(model, "vocab");
    const JsonNode *added = json_get(root, "added_tokens"), *pre = json_get(root, "pre_tokenizer");
    if (!vocab || vocab->kind != JSON_OBJECT) { lr_fail(error, "tokenizer has no BPE vocab"); goto fail; }
    const size_t added_count = added && added->kind == JSON_ARRAY ? added->length : 0;
    t = lr_calloc(1, sizeof(LrTokenizer), error);
    if (!t) goto fail;
    t->bos = bos, t->eos = eos, t->pad = pad;
    t->add_prefix_space = truthy(pre, "add_prefix_space");
    t->use_regex = !json_get(pre, "use_regex") || truthy(pre, "use_regex");
    t->ignore_merges = truthy(model, "ignore_merges");
    int largest = -1, id = 0;
    for (size_t i = 0; i < vocab->length + added_count; i++) {
        const JsonNode *node = i < vocab->length ? &vocab->items[i] : json_get(&added->items[i - vocab->length], "id");
        if (!entry_id(node, &id)) { lr_fail(error, "tokenizer vocabulary entry %zu is malformed", i); goto fail; }
        largest = id > largest ? id : largest;
    }
    t->vocab_size = largest + 1;
    t->pieces = lr_calloc((size_t)t->vocab_size, sizeof(char *), error);
    t->piece_lengths = lr_calloc((size_t)t->vocab_size, sizeof(size_t), error);
    t->table_size = power_of_two_above(vocab->length + added_count);
    t->table = lr_calloc(t->table_size, sizeof(Entry), error);
    if (!t->pieces || !t->piece_lengths || !t->table) goto fail;
    for (size_t i = 0; i < vocab->length; i++) {
        entry_id(&vocab->items[i], &id);
        if (!add_piece(t, id, vocab->keys[i], strlen(vocab->keys[i]), 1, error)) goto fail;
    }
    for (size_t i = 0; i < added_count; i++) {
        const JsonNode *content = json_get(&added->items[i], "content");
        entry_id(json_get(&added->items[i], "id"), &id);
        if (!content || content->kind != JSON_STRING) { lr_fail(error, "tokenizer added token %zu is malformed", i); goto fail; }
        if (!add_piece(t, id, content->string, content->length, 0, error)) goto fail;
    }
    byte_table(t);
    for (int b = 0; b < 256; b++) {
        char text[4];
        t->byte_ids[b] = lookup(t, text, put_utf8(text, t->byte_chars[b]));
        if (t->byte_ids[b] < 0) { lr_fail(error, "tokenizer vocabulary lacks the character of byte 0x%02X", b); goto fail; }
    }
    if (!read_merges(t, json_get(model, "merges"), error)) goto fail;
    json_free(root);
    return t;
fail:
    json_free(root);
    lr_tokenizer_free(t);
    return NULL;
}
