/* GGUF reader (see lr_gguf.h).  Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata
 * count; metadata (string key, u32 type, value); tensor infos (string name, u32 dims, u64 sizes
 * fastest first, u32 type, u64 offset into the data section); the data section starts at the next
 * multiple of `general.alignment` (default 32). */
#include "lr_gguf.h"

#include "lr_common.h"

#define LOOPLM_FORMAT_VERSION 1  /* looplm.checkpoint.gguf.FORMAT_VERSION this reader knows */

typedef struct {
    const uint8_t *base;
    size_t size, at;
    char *error;
    int failed;
} Cursor;

static int truncated(Cursor *c) {
    if (!c->failed) lr_fail(c->error, "the GGUF file is truncated or malformed (a read past byte %zu of %zu)", c->at, c->size);
    c->failed = 1;
    return 0;
}

static int take(Cursor *c, size_t n, const uint8_t **out) {
    if (c->failed || n > c->size - c->at) return truncated(c);
    *out = c->base + c->at;
    c->at += n;
    return 1;
}

static uint64_t read_u64(Cursor *c) {
    const uint8_t *p;
    uint64_t v = 0;
    if (!take(c, 8, &p)) return 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint32_t read_u32(Cursor *c) {
    const uint8_t *p;
    if (!take(c, 4, &p)) return 0;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const char *read_string(Cursor *c, size_t *length) {
    const uint8_t *p;
    uint64_t n = read_u64(c);
    if (c->failed || n > c->size || !take(c, (size_t)n, &p)) { truncated(c); return NULL; }
    *length = (size_t)n;
    return (const char *)p;
}

static size_t scalar_size(uint32_t type) {
    static const size_t sizes[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type < 13 ? sizes[type] : 0;
}

/* Skip one value of `type` (arrays and strings walked, nested arrays included). */
static int skip_value(Cursor *c, uint32_t type, int depth) {
    const uint8_t *p;
    size_t length;
    if (type == 8) return read_string(c, &length) != NULL;
    if (type == 9) {
        uint32_t element = read_u32(c);
        uint64_t count = read_u64(c);
        if (c->failed || depth > 4) return truncated(c);
        if (element != 8 && element != 9) {
            size_t size = scalar_size(element);
            if (!size || count > c->size / size) return truncated(c);
            return take(c, (size_t)count * size, &p);
        }
        for (uint64_t i = 0; i < count; i++)
            if (!skip_value(c, element, depth + 1)) return 0;
        return 1;
    }
    size_t size = scalar_size(type);
    if (!size) return lr_fail(c->error, "the GGUF file has a metadata value of unknown type %u", type);
    return take(c, size, &p);
}

static const GgufValue *find(const Gguf *file, const char *key) {
    size_t n = strlen(key);
    for (size_t i = 0; i < file->value_count; i++)
        if (file->values[i].key_length == n && memcmp(file->values[i].key, key, n) == 0) return &file->values[i];
    return NULL;
}

const char *gguf_string(const Gguf *file, const char *key, size_t *length) {
    const GgufValue *v = find(file, key);
    if (!v || v->type != 8) return NULL;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | v->value[i];
    *length = (size_t)n;
    return (const char *)v->value + 8;
}

int gguf_integer(const Gguf *file, const char *key, int64_t *value) {
    const GgufValue *v = find(file, key);
    if (!v || v->type == 6 || v->type == 12 || v->type >= 13 || v->type == 8 || v->type == 9) return 0;
    const size_t size = scalar_size(v->type);
    uint64_t raw = 0;
    for (int i = (int)size - 1; i >= 0; i--) raw = raw << 8 | v->value[i];
    const int is_signed = v->type == 1 || v->type == 3 || v->type == 5 || v->type == 11;
    if (is_signed && size < 8 && (raw >> (8 * size - 1)) & 1) raw |= ~0ULL << (8 * size);  /* sign-extend */
    *value = (int64_t)raw;
    return 1;
}

static int tensor_bytes(GgufTensor *t, char *error) {
    switch (t->type) {
        case GGUF_F32: t->bytes = (size_t)t->elements * 4; return 1;
        case GGUF_F16: case GGUF_BF16: t->bytes = (size_t)t->elements * 2; return 1;
        case GGUF_Q8_0:
            if (t->shape[t->ndim - 1] % 32) return lr_fail(error, "tensor %s: Q8_0 rows must be a multiple of 32", t->name);
            t->bytes = (size_t)t->elements / 32 * 34;
            return 1;
        case GGUF_I8: t->bytes = (size_t)t->elements; return 1;
        case GGUF_TQ2_0:
            if (t->shape[t->ndim - 1] % GGUF_TQ2_0_ROW)
                return lr_fail(error, "tensor %s: TQ2_0 rows must be a multiple of %d", t->name, GGUF_TQ2_0_ROW);
            t->bytes = (size_t)t->elements / GGUF_TQ2_0_ROW * GGUF_TQ2_0_BYTES;
            return 1;
    }
    return lr_fail(error, "tensor %s has ggml type %u, which this runtime cannot read (f32, f16, bf16, q8_0, and"
                          " ternary weights as tq2_0 or looplm's 2-bit i8)", t->name, t->type);
}

static int parse(Gguf *file, char *error) {
    Cursor c = {file->buffer, file->size, 0, error, 0};
    const uint8_t *magic;
    if (file->size < 24 || !take(&c, 4, &magic) || memcmp(magic, "GGUF", 4) != 0)
        return lr_fail(error, "not a GGUF file (no GGUF magic at its start)");
    file->version = read_u32(&c);
    if (file->version < 2 || file->version > 3)
        return lr_fail(error, "GGUF version %u is not supported (2 and 3 are)", file->version);
    uint64_t tensors = read_u64(&c), values = read_u64(&c);
    if (tensors > file->size / 24 || values > file->size / 12) return truncated(&c);
    file->values = lr_calloc((size_t)values, sizeof(GgufValue), error);
    file->tensors = lr_calloc((size_t)tensors, sizeof(GgufTensor), error);
    if (!file->values || !file->tensors) return 0;
    for (uint64_t i = 0; i < values; i++) {
        GgufValue *v = &file->values[file->value_count++];
        v->key = read_string(&c, &v->key_length);
        v->type = read_u32(&c);
        v->value = c.base + c.at;
        if (c.failed || !skip_value(&c, v->type, 0)) return 0;
    }
    for (uint64_t i = 0; i < tensors; i++) {
        GgufTensor *t = &file->tensors[file->tensor_count++];
        size_t length;
        const char *name = read_string(&c, &length);
        if (!name) return 0;
        if (length >= sizeof(t->name)) return lr_fail(error, "a GGUF tensor name is %zu bytes long", length);
        memcpy(t->name, name, length);
        uint32_t dims = read_u32(&c);
        if (c.failed || dims < 1 || dims > 4) return c.failed ? 0 : lr_fail(error, "tensor %s has %u dimensions", t->name, dims);
        t->ndim = (int)dims;
        t->elements = 1;
        for (uint32_t d = 0; d < dims; d++) {
            uint64_t size = read_u64(&c);
            if (c.failed || size == 0 || size > (1ULL << 40) / (uint64_t)t->elements)  /* 2^40 elements at most */
                return c.failed ? 0 : lr_fail(error, "tensor %s has a malformed shape", t->name);
            t->shape[dims - 1 - d] = (int64_t)size;  /* ggml order → torch order */
            t->elements *= (int64_t)size;
        }
        t->type = read_u32(&c);
        t->offset = read_u64(&c);
        if (c.failed) return 0;
    }
    int64_t alignment = 32;
    if (gguf_integer(file, "general.alignment", &alignment) && (alignment < 4 || alignment % 4 || alignment > 1 << 16))
        return lr_fail(error, "the GGUF file's general.alignment %lld is malformed", (long long)alignment);
    size_t data = (c.at + (size_t)alignment - 1) / (size_t)alignment * (size_t)alignment;
    for (size_t i = 0; i < file->tensor_count; i++) {
        GgufTensor *t = &file->tensors[i];
        if (!tensor_bytes(t, error)) return 0;
        if (t->offset % (uint64_t)alignment)  /* float32 data is read in place: it must lie aligned */
            return lr_fail(error, "tensor %s lies at offset %llu, not a multiple of the file's alignment %lld", t->name,
                           (unsigned long long)t->offset, (long long)alignment);
        if (data > file->size || t->offset > file->size - data || t->bytes > file->size - data - t->offset)
            return lr_fail(error, "the GGUF file is truncated: tensor %s lies past its end (%zu bytes)", t->name,
                           file->size);
        t->data = file->buffer + data + t->offset;
    }
    return 1;
}

Gguf *gguf_open(const char *path, char *error) {
    FILE *handle = fopen(path, "rb");
    if (!handle) { lr_fail(error, "cannot open %s: no such file or not readable", path); return NULL; }
    Gguf *file = lr_calloc(1, sizeof(Gguf), error);
    long size = -1;
    if (file && fseek(handle, 0, SEEK_END) == 0) size = ftell(handle);
    if (!file || size < 0 || fseek(handle, 0, SEEK_SET) != 0) {
        if (file) lr_fail(error, "cannot read %s", path);
        fclose(handle);
        free(file);
        return NULL;
    }
    file->size = (size_t)size;
    /* 64-byte aligned (the data section is aligned within the file): float32 weights are read in
     * place, and vector loads that straddle cache lines cost a quarter more at batch 1 */
    file->buffer = aligned_alloc(64, (file->size + 64) / 64 * 64);
    if (!file->buffer || fread(file->buffer, 1, file->size, handle) != file->size) {
        lr_fail(error, file->buffer ? "cannot read %s" : "out of memory reading %s", path);
        fclose(handle);
        gguf_close(file);
        return NULL;
    }
    fclose(handle);
    if (!parse(file, error)) { gguf_close(file); return NULL; }
    return file;
}

void gguf_close(Gguf *file) {
    if (!file) return;
    free(file->buffer);
    free(file->values);
    free(file->tensors);
    free(file);
}

/* IEEE half → float, exactly (subnormals, infinities and NaN included). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) bits = sign | 0x7F800000u | mantissa << 13;
    else if (exponent) bits = sign | (exponent + 112) << 23 | mantissa << 13;
    else if (!mantissa) bits = sign;
    else {  /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
        bits = sign | exponent << 23 | (mantissa & 0x3FF) << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float bfloat_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static int ends_with(const char *text, const char *suffix) {
    size_t n = strlen(text), m = strlen(suffix);
    return n >= m && strcmp(text + n - m, suffix) == 0;
}

static const GgufTensor *find_tensor(const Gguf *file, const char *name) {
    for (size_t i = 0; i < file->tensor_count; i++)
        if (strcmp(file->tensors[i].name, name) == 0) return &file->tensors[i];
    return NULL;
}

/* Element `index` of an integer array value (its elements' type any integer), or -1. */
static int64_t array_integer(const Gguf *file, const GgufValue *v, size_t index) {
    Cursor c = {file->buffer, file->size, (size_t)(v->value - file->buffer), NULL, 0};
    uint32_t element = read_u32(&c);
    uint64_t count = read_u64(&c);
    const size_t size = scalar_size(element);
    const uint8_t *p;
    if (c.failed || element == 6 || element == 12 || element >= 13 || !size || index >= count) return -1;
    c.at += index * size;
    if (!take(&c, size, &p)) return -1;
    uint64_t raw = 0;
    for (int i = (int)size - 1; i >= 0; i--) raw = raw << 8 | p[i];
    return (int64_t)raw;
}

/* The row length K `looplm.ternary.row_lengths` gives the packed ternary tensor `name` (listed in
 * `looplm.ternary.weights`, in the same order); 0 when it is not listed, -1 when malformed. */
static int64_t ternary_row_length(const Gguf *file, const char *name) {
    const GgufValue *names = find(file, "looplm.ternary.weights"), *rows = find(file, "looplm.ternary.row_lengths");
    if (!names || !rows || names->type != 9 || rows->type != 9) return 0;
    Cursor c = {file->buffer, file->size, (size_t)(names->value - file->buffer), NULL, 0};
    uint32_t element = read_u32(&c);
    uint64_t count = read_u64(&c);
    if (c.failed || element != 8) return -1;
    for (uint64_t i = 0; i < count; i++) {
        size_t length;
        const char *listed = read_string(&c, &length);
        if (!listed) return -1;
        if (length == strlen(name) && memcmp(listed, name, length) == 0) return array_integer(file, rows, (size_t)i);
    }
    return 0;
}

/* A packed ternary weight (I8 in looplm's 2-bit layout, or TQ2_0 repacked to it) bound with its
 * `<name>.ternary_scale`. */
static int bind_ternary(LrModel *model, const Gguf *file, const GgufTensor *t, char *error) {
    const int64_t K = ternary_row_length(file, t->name);
    if (K <= 0 || K > (int64_t)1 << 40)  /* no row is longer (parse) */
        return lr_fail(error, "tensor %s is stored as %s but looplm.ternary.weights does not list it with its row length",
                       t->name, t->type == GGUF_I8 ? "i8" : "tq2_0");
    char scale_name[160];
    const size_t stem = strlen(t->name) - (ends_with(t->name, "weight") ? strlen("weight") : 0);
    snprintf(scale_name, sizeof scale_name, "%.*sternary_scale", (int)stem, t->name);
    const GgufTensor *scale = find_tensor(file, scale_name);
    if (!scale || scale->type != GGUF_F32 || scale->elements != 1)
        return lr_fail(error, "tensor %s lacks its float32 scale %s: the file is incomplete", t->name, scale_name);
    const int64_t rows = t->shape[0], width = (K + 3) / 4, shape[2] = {rows, K};
    if (t->ndim != 2 || (t->type == GGUF_I8 ? t->shape[1] != width : t->shape[1] != K))
        return lr_fail(error, "tensor %s: its stored shape does not hold %lld codes per row", t->name, (long long)K);
    const uint8_t *packed = t->data;
    if (t->type == GGUF_TQ2_0) {  /* block b, byte g·32 + m, field l holds weight 128·g + 32·l + m */
        uint8_t *codes = calloc((size_t)(rows * width), 1);
        if (!lr_model_own(model, codes, error)) return 0;
        const int64_t blocks = K / GGUF_TQ2_0_ROW;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *block = t->data + (size_t)(r * blocks + b) * GGUF_TQ2_0_BYTES;
                for (int e = 0; e < GGUF_TQ2_0_ROW; e++) {
                    const int field = block[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32)) & 3;
                    const int64_t i = b * GGUF_TQ2_0_ROW + e;
                    codes[r * width + i / 4] |= (uint8_t)(field << (2 * (i % 4)));
                }
            }
        packed = codes;
    }
    return lr_model_bind(model, t->name, LR_BIND_TERNARY, packed, (const float *)scale->data, 2, shape, error);
}

/* Bind one tensor of the file, converting what the runtime does not read in place. */
static int bind_tensor(LrModel *model, const Gguf *file, const GgufTensor *t, char *error) {
    const size_t n = (size_t)t->elements;
    if (ends_with(t->name, ".ternary_scale")) return 1;  /* read with its weight */
    if (t->type == GGUF_I8 || t->type == GGUF_TQ2_0) return bind_ternary(model, file, t, error);
    if (t->type == GGUF_F32)
        return lr_model_bind(model, t->name, LR_BIND_F32, t->data, NULL, t->ndim, t->shape, error);
    if (t->type == GGUF_F16 || t->type == GGUF_BF16) {
        float *wide = malloc(n * sizeof(float));
        if (!lr_model_own(model, wide, error)) return 0;
        for (size_t i = 0; i < n; i++) {
            uint16_t raw = read_u16(t->data + 2 * i);
            wide[i] = t->type == GGUF_F16 ? half_to_float(raw) : bfloat_to_float(raw);
        }
        return lr_model_bind(model, t->name, LR_BIND_F32, wide, NULL, t->ndim, t->shape, error);
    }
    /* Q8_0: blocks of (f16 scale, 32 int8) → int8 values [N, K] and float32 scales [N, K/32] */
    if (t->ndim != 2) return lr_fail(error, "tensor %s: Q8_0 is read for matrices only", t->name);
    const size_t blocks = n / 32;
    int8_t *values = malloc(n);
    float *scales = malloc(blocks * sizeof(float));
    if (!lr_model_own(model, values, error)) { free(scales); return 0; }
    if (!lr_model_own(model, scales, error)) return 0;
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *block = t->data + b * 34;
        scales[b] = half_to_float(read_u16(block));
        memcpy(values + b * 32, block + 2, 32);
    }
    return lr_model_bind(model, t->name, LR_BIND_Q8_0, values, scales, t->ndim, t->shape, error);
}

LrModel *lr_model_from_gguf(const Gguf *file, char *error) {
    size_t length;
    const char *architecture = gguf_string(file, "general.architecture", &length);
    if (!architecture) { lr_fail(error, "the GGUF file has no general.architecture"); return NULL; }
    if (length != 6 || memcmp(architecture, "looplm", 6) != 0) {
        lr_fail(error, "the GGUF file holds a '%.*s' model, not a looplm one (unknown architecture)", (int)(length > 64 ? 64 : length),
                architecture);
        return NULL;
    }
    int64_t version = 0;
    if (!gguf_integer(file, "looplm.format_version", &version)) {
        lr_fail(error, "the GGUF file has no looplm.format_version: not written by looplm");
        return NULL;
    }
    if (version > LOOPLM_FORMAT_VERSION) {
        lr_fail(error, "the file uses looplm GGUF format %lld; this runtime reads up to %d", (long long)version,
                LOOPLM_FORMAT_VERSION);
        return NULL;
    }
    const char *config = gguf_string(file, "looplm.config", &length);
    if (!config) { lr_fail(error, "the GGUF file has no looplm.config"); return NULL; }
    LrConfig layers;  /* every layer has tensors of its own (two norms at least): none are allocated for more */
    if (!lr_config_parse(config, length, &layers, error)) return NULL;
    const uint64_t layer_count = (uint64_t)layers.prelude + (uint64_t)layers.core + (uint64_t)layers.coda;
    if (2 * layer_count > file->tensor_count) {
        lr_fail(error, "the config's %llu layers need at least %llu tensors; the file has %zu",
                (unsigned long long)layer_count, 2 * (unsigned long long)layer_count, file->tensor_count);
        return NULL;
    }
    LrModel *model = lr_model_new(config, length, error);
    if (!model) return NULL;
    for (size_t i = 0; i < file->tensor_count; i++)
        if (!bind_tensor(model, file, &file->tensors[i], error)) { lr_model_free(model); return NULL; }
    if (!lr_model_finish(model, error)) { lr_model_free(model); return NULL; }
    return model;
}
