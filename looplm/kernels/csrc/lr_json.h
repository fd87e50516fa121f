/* A small JSON reader for the runtime: the model config (looplm.config) and tokenizer.json.
 *
 * The whole text is parsed into a tree of nodes; strings are decoded to UTF-8 (\uXXXX escapes,
 * surrogate pairs included), numbers to double.  Objects keep their keys in file order.  Errors
 * are one line (position and what was expected) and never abort the process. */
#ifndef LOOPLM_LR_JSON_H
#define LOOPLM_LR_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonKind;

typedef struct JsonNode {
    JsonKind kind;
    double number;          /* JSON_NUMBER; JSON_BOOL: 0 or 1 */
    char *string;           /* JSON_STRING: UTF-8, zero-terminated (may hold NUL bytes: see length) */
    size_t length;          /* JSON_STRING: bytes; JSON_ARRAY / JSON_OBJECT: items */
    char **keys;            /* JSON_OBJECT: the item keys, zero-terminated */
    struct JsonNode *items; /* JSON_ARRAY / JSON_OBJECT: the values */
} JsonNode;

/* Parse `length` bytes of `text`; NULL on error with the reason in `error` (LR_ERROR_BYTES). */
JsonNode *json_parse(const char *text, size_t length, char *error);
void json_free(JsonNode *node);
/* The value under `key` of an object, or NULL (also when `node` is not an object). */
const JsonNode *json_get(const JsonNode *node, const char *key);

#endif
