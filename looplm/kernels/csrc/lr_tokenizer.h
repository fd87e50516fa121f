/* Byte-level BPE from a Hugging Face tokenizer.json (what looplm trains and stores in its GGUF
 * files as `tokenizer.huggingface.json`): GPT-2 pre-tokenisation, merges by rank, byte-level
 * decoding.  looplm's byte tokenizer is the case with no merges.  Features a tokenizer.json may
 * have and this reader does not implement (normalizers, other pre-tokenizers or models, non-special
 * added tokens, byte fallback, subword prefixes) are refused by name when it is read. */
#ifndef LOOPLM_LR_TOKENIZER_H
#define LOOPLM_LR_TOKENIZER_H

#include <stddef.h>

typedef struct LrTokenizer LrTokenizer;

/* From tokenizer.json text; bos/eos/pad are the special ids (GGUF's tokenizer.ggml.*_token_id). */
LrTokenizer *lr_tokenizer_new(const char *json, size_t length, int bos, int eos, int pad, char *error);
void lr_tokenizer_free(LrTokenizer *tokenizer);
/* Token ids of `length` bytes of UTF-8 text (invalid bytes read as U+FFFD; special tokens spelled
 * in the text are ordinary text), appended to *ids (grown with realloc); returns the count or -1. */
int lr_tokenizer_encode(const LrTokenizer *tokenizer, const char *text, size_t length, int **ids, char *error);
/* The bytes token `id` decodes to (pad, bos, eos and ids outside the vocabulary: none); returns
 * their count, writing at most `capacity` into `out`. */
size_t lr_tokenizer_decode(const LrTokenizer *tokenizer, int id, char *out, size_t capacity);
int lr_tokenizer_vocab_size(const LrTokenizer *tokenizer);
int lr_tokenizer_bos(const LrTokenizer *tokenizer);
int lr_tokenizer_eos(const LrTokenizer *tokenizer);

#endif
