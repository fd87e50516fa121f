/* GGUF files as `looplm export gguf` writes them (GGUF versions 2 and 3, little-endian): the
 * metadata, the tensor table, and a model built from them.  Every read is bounds-checked against
 * the file's size: a truncated or malformed file is a one-line error, never a crash. */
#ifndef LOOPLM_LR_GGUF_H
#define LOOPLM_LR_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "runtime.h"

/* ggml tensor types this reader knows; the rest are refused by name.  I8 and TQ2_0 hold the ternary
 * weights of `looplm export gguf --dtype ternary` (looplm.checkpoint.gguf): looplm's 2-bit layout as
 * I8 [N, ceil(K/4)], or TQ2_0 blocks (64 bytes of 2-bit codes + a float16 scale per 256 weights). */
enum { GGUF_F32 = 0, GGUF_F16 = 1, GGUF_Q8_0 = 8, GGUF_I8 = 24, GGUF_BF16 = 30, GGUF_TQ2_0 = 35 };
#define GGUF_TQ2_0_ROW 256
#define GGUF_TQ2_0_BYTES 66

typedef struct {
    const char *key;
    size_t key_length;
    uint32_t type;          /* GGUF value type (8 = string, 9 = array, …) */
    const uint8_t *value;   /* the value's bytes in the file (for a string: its u64 length first) */
} GgufValue;

typedef struct {
    char name[128];
    uint32_t type;
    int ndim;
    int64_t shape[4];       /* torch's order (GGUF stores the fastest dimension first) */
    int64_t elements;
    uint64_t offset;        /* into the data section */
    const uint8_t *data;
    size_t bytes;
} GgufTensor;

typedef struct {
    uint8_t *buffer;        /* the whole file */
    size_t size;
    uint32_t version;
    GgufValue *values;
    size_t value_count;
    GgufTensor *tensors;
    size_t tensor_count;
} Gguf;

Gguf *gguf_open(const char *path, char *error);
void gguf_close(Gguf *file);
/* A string value (not zero-terminated: *length bytes), or NULL when absent or not a string. */
const char *gguf_string(const Gguf *file, const char *key, size_t *length);
/* An integer or bool value into *value; 0 when absent or not an integer. */
int gguf_integer(const Gguf *file, const char *key, int64_t *value);
/* The looplm model of a GGUF file: architecture and format checked, the config read, every tensor
 * bound (f16 and bf16 widened to float32, Q8_0 split into int8 values and float32 scales, packed
 * ternary weights — those `looplm.ternary.weights` lists — bound as codes with their
 * `<name>.ternary_scale`, TQ2_0 repacked to looplm's 2-bit layout). */
LrModel *lr_model_from_gguf(const Gguf *file, char *error);

#endif
