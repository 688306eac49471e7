/* lib.h: owns the probe's freestanding C library: memory and string helpers, number parsing,
 * a small printf, CRC-32. */
#ifndef LIB_H
#define LIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* Hex with an optional 0x prefix; decimal. 0 on success, -1 if `s` is not a whole number. */
int parse_hex(const char *s, uint64_t *out);
int parse_dec(const char *s, uint64_t *out);

/* Supports %d %i %u %x %X %p %s %c %%, flags '-' '0', a width, ".N"/".*" precision for
 * strings, and the l/ll/z length modifiers (all 64-bit). */
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
/* To the serial console; one call's output is never interleaved with another CPU's. */
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same, for a caller that already holds the console lock. */
void printf_locked(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* When set, every character printf sends to the serial console goes here as well (hvc0: the
 * virtio console carrying the command console too; see virtio_console.c). */
extern void (*console_mirror)(char c);
/* Format an error message into a static buffer, for command handlers to return. */
const char *errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

uint32_t crc32(uint32_t crc, const void *data, size_t len);

#endif
