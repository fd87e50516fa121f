/* What every runtime source shares: one-line error messages and checked allocation.
 *
 * Every function that can fail on user input takes `char *error` (LR_ERROR_BYTES long), writes
 * one line into it and returns 0 / NULL; nothing in the runtime prints or exits on its own. */
#ifndef LOOPLM_LR_COMMON_H
#define LOOPLM_LR_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LR_ERROR_BYTES 512

/* Write a formatted one-line message into `error` (when not NULL); returns 0 for `return lr_fail(...)`. */
static inline int lr_fail(char *error, const char *format, ...) {
    if (error) {
        va_list arguments;
        va_start(arguments, format);
        vsnprintf(error, LR_ERROR_BYTES, format, arguments);
        va_end(arguments);
    }
    return 0;
}

/* Zeroed memory for `count` items of `size` bytes, or NULL (with a message) when it cannot be had. */
static inline void *lr_calloc(size_t count, size_t size, char *error) {
    void *memory = count && size ? calloc(count, size) : calloc(1, 1);
    if (!memory) lr_fail(error, "out of memory (%zu x %zu bytes)", count, size);
    return memory;
}

/* A zero-terminated copy of `length` bytes of `text`. */
static inline char *lr_strndup(const char *text, size_t length) {
    char *copy = malloc(length + 1);
    if (copy) {
        memcpy(copy, text, length);
        copy[length] = 0;
    }
    return copy;
}

#endif
