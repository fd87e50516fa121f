/* JSON reader (see lr_json.h): recursive descent over the text, depth-limited so a hostile file
 * cannot exhaust the stack. */
#include "lr_json.h"

#include <math.h>
#include <stdint.h>

#include "lr_common.h"

#define MAX_DEPTH 64

typedef struct {
    const char *text;
    size_t length, at;
    char *error;
} Parser;

static int fail_at(Parser *p, const char *expected) {
    return lr_fail(p->error, "invalid JSON at byte %zu of %zu: expected %s", p->at, p->length, expected);
}

static void skip_space(Parser *p) {
    while (p->at < p->length) {
        char c = p->text[p->at];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->at++;
    }
}

static int literal(Parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->length - p->at < n || memcmp(p->text + p->at, word, n) != 0) return 0;
    p->at += n;
    return 1;
}

/* Append code point `c` to `out` as UTF-8; returns the bytes written. */
static size_t put_utf8(char *out, uint32_t c) {
    if (c < 0x80) { out[0] = (char)c; return 1; }
    if (c < 0x800) { out[0] = (char)(0xC0 | (c >> 6)); out[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12)); out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18)); out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F)); out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

static int hex4(Parser *p, uint32_t *value) {
    if (p->length - p->at < 4) return 0;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->text[p->at + i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    p->at += 4;
    *value = v;
    return 1;
}

/* A string after its opening quote.  The decoded text is never longer than the escaped text. */
static int parse_string(Parser *p, char **result, size_t *result_length) {
    size_t begin = p->at, end = begin;
    while (end < p->length && p->text[end] != '"') end += p->text[end] == '\\' ? 2 : 1;
    if (end >= p->length) return fail_at(p, "a closing quote");
    char *out = malloc(end - begin + 1);
    if (!out) return lr_fail(p->error, "out of memory reading JSON");
    size_t n = 0;
    while (p->at < end) {
        char c = p->text[p->at++];
        if ((unsigned char)c < 0x20) { free(out); return fail_at(p, "no control character in a string"); }
        if (c != '\\') { out[n++] = c; continue; }
        char e = p->text[p->at++];
        switch (e) {
            case '"': out[n++] = '"'; break;
            case '\\': out[n++] = '\\'; break;
            case '/': out[n++] = '/'; break;
            case 'b': out[n++] = '\b'; break;
            case 'f': out[n++] = '\f'; break;
            case 'n': out[n++] = '\n'; break;
            case 'r': out[n++] = '\r'; break;
            case 't': out[n++] = '\t'; break;
            case 'u': {
                uint32_t c1, c2;
                if (!hex4(p, &c1)) { free(out); return fail_at(p, "four hex digits after \\u"); }
                if (c1 >= 0xD800 && c1 < 0xDC00 && p->at + 1 < end && p->text[p->at] == '\\' &&
                    p->text[p->at + 1] == 'u') {
                    size_t mark = p->at;
                    p->at += 2;
                    if (hex4(p, &c2) && c2 >= 0xDC00 && c2 < 0xE000) c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
                    else p->at = mark;
                }
                if (c1 >= 0xD800 && c1 < 0xE000) c1 = 0xFFFD;  /* a lone surrogate has no UTF-8 form */
                n += put_utf8(out + n, c1);
                break;
            }
            default: free(out); return fail_at(p, "a valid escape");
        }
    }
    p->at = end + 1;
    out[n] = 0;
    *result = out;
    *result_length = n;
    return 1;
}

static int parse_value(Parser *p, JsonNode *node, int depth);

static int grow(JsonNode *node, size_t *capacity, int object, char *error) {
    if (node->length < *capacity) return 1;
    size_t wanted = *capacity ? 2 * *capacity : 8;
    JsonNode *items = realloc(node->items, wanted * sizeof(JsonNode));
    if (!items) return lr_fail(error, "out of memory reading JSON");
    node->items = items;
    if (object) {
        char **keys = realloc(node->keys, wanted * sizeof(char *));
        if (!keys) return lr_fail(error, "out of memory reading JSON");
        node->keys = keys;
    }
    *capacity = wanted;
    return 1;
}

static int parse_container(Parser *p, JsonNode *node, int object, int depth) {
    size_t capacity = 0;
    char close = object ? '}' : ']';
    node->kind = object ? JSON_OBJECT : JSON_ARRAY;
    skip_space(p);
    if (p->at < p->length && p->text[p->at] == close) { p->at++; return 1; }
    for (;;) {
        if (!grow(node, &capacity, object, p->error)) return 0;
        size_t index = node->length;
        memset(&node->items[index], 0, sizeof(JsonNode));
        if (object) {
            size_t key_length;
            skip_space(p);
            if (p->at >= p->length || p->text[p->at] != '"') return fail_at(p, "a quoted key");
            p->at++;
            if (!parse_string(p, &node->keys[index], &key_length)) return 0;
            node->length++;
            skip_space(p);
            if (p->at >= p->length || p->text[p->at] != ':') return fail_at(p, "':'");
            p->at++;
        } else {
            node->length++;
        }
        if (!parse_value(p, &node->items[index], depth + 1)) return 0;
        skip_space(p);
        if (p->at < p->length && p->text[p->at] == ',') { p->at++; continue; }
        if (p->at < p->length && p->text[p->at] == close) { p->at++; return 1; }
        return fail_at(p, object ? "',' or '}'" : "',' or ']'");
    }
}

static int parse_value(Parser *p, JsonNode *node, int depth) {
    if (depth > MAX_DEPTH) return fail_at(p, "less nesting");
    skip_space(p);
    if (p->at >= p->length) return fail_at(p, "a value");
    char c = p->text[p->at];
    if (c == '{' || c == '[') { p->at++; return parse_container(p, node, c == '{', depth); }
    if (c == '"') { p->at++; node->kind = JSON_STRING; return parse_string(p, &node->string, &node->length); }
    if (literal(p, "true")) { node->kind = JSON_BOOL; node->number = 1; return 1; }
    if (literal(p, "false")) { node->kind = JSON_BOOL; node->number = 0; return 1; }
    if (literal(p, "null")) { node->kind = JSON_NULL; return 1; }
    if (literal(p, "NaN")) { node->kind = JSON_NUMBER; node->number = NAN; return 1; }       /* Python's json */
    if (literal(p, "Infinity")) { node->kind = JSON_NUMBER; node->number = INFINITY; return 1; }
    if (literal(p, "-Infinity")) { node->kind = JSON_NUMBER; node->number = -INFINITY; return 1; }
    size_t begin = p->at;
    while (p->at < p->length && strchr("+-0123456789.eE", p->text[p->at])) p->at++;
    if (p->at == begin || p->at - begin > 64) return fail_at(p, "a value");
    char number[65];
    memcpy(number, p->text + begin, p->at - begin);
    number[p->at - begin] = 0;
    char *end;
    node->kind = JSON_NUMBER;
    node->number = strtod(number, &end);
    if (*end) { p->at = begin; return fail_at(p, "a number"); }
    return 1;
}

JsonNode *json_parse(const char *text, size_t length, char *error) {
    Parser p = {text, length, 0, error};
    JsonNode *root = lr_calloc(1, sizeof(JsonNode), error);
    if (!root) return NULL;
    if (!parse_value(&p, root, 0)) { json_free(root); return NULL; }
    skip_space(&p);
    if (p.at != length) { fail_at(&p, "the end of the text"); json_free(root); return NULL; }
    return root;
}

static void free_contents(JsonNode *node) {
    free(node->string);
    for (size_t i = 0; i < node->length && (node->kind == JSON_ARRAY || node->kind == JSON_OBJECT); i++) {
        if (node->items) free_contents(&node->items[i]);
        if (node->keys) free(node->keys[i]);
    }
    free(node->items);
    free(node->keys);
}

void json_free(JsonNode *node) {
    if (!node) return;
    free_contents(node);
    free(node);
}

const JsonNode *json_get(const JsonNode *node, const char *key) {
    if (!node || node->kind != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < node->length; i++)
        if (strcmp(node->keys[i], key) == 0) return &node->items[i];
    return NULL;
}
