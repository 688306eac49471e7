/* lib.c: owns the probe's freestanding C library: the mem and str functions gcc may also call
 * on its own, number parsing, a small printf, CRC-32. */
#include "lib.h"
#include "serial.h"

/* The string instructions run as one instruction each under the ring-0 emulator, where a C
 * loop would cost several per byte. */
void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] - y[i];
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;
	while (n < max && s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (unsigned char)*a - (unsigned char)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int parse_hex(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	int digits = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2;
	for (; *s; s++, digits++) {
		int d = hex_digit(*s);
		if (d < 0 || digits == 16)
			return -1;
		v = (v << 4) | (unsigned)d;
	}
	if (!digits)
		return -1;
	*out = v;
	return 0;
}

int parse_dec(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (UINT64_MAX - 9) / 10)
			return -1;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return 0;
}

/* -- formatting ------------------------------------------------------------------------------ */

/* Where formatted characters go: a bounded buffer or the serial port. */
struct out {
	char *buf; /* NULL: the console */
	size_t pos, cap;
};

void (*console_mirror)(char c);

static void put(struct out *o, char c)
{
	if (!o->buf) {
		serial_putc(c);
		if (console_mirror)
			console_mirror(c);
	} else if (o->pos + 1 < o->cap)
		o->buf[o->pos] = c;
	o->pos++;
}

static void pad(struct out *o, char c, int n)
{
	while (n-- > 0)
		put(o, c);
}

static void put_num(struct out *o, uint64_t v, unsigned base, int neg, int width, int zero,
		    int left, int upper)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0;
	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	int len = n + neg;
	if (!left && !zero)
		pad(o, ' ', width - len);
	if (neg)
		put(o, '-');
	if (!left && zero)
		pad(o, '0', width - len);
	while (n)
		put(o, tmp[--n]);
	if (left)
		pad(o, ' ', width - len);
}

static void vformat(struct out *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(o, *fmt);
			continue;
		}
		fmt++;
		int left = 0, zero = 0, width = 0, prec = -1, wide = 0;
		for (;; fmt++) {
			if (*fmt == '-')
				left = 1;
			else if (*fmt == '0')
				zero = 1;
			else
				break;
		}
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}
		if (*fmt == '.') {
			fmt++;
			prec = 0;
			if (*fmt == '*') {
				prec = va_arg(ap, int);
				fmt++;
			} else {
				while (*fmt >= '0' && *fmt <= '9')
					prec = prec * 10 + (*fmt++ - '0');
			}
		}
		while (*fmt == 'l' || *fmt == 'z') {
			wide = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = wide ? va_arg(ap, int64_t) : va_arg(ap, int);
			put_num(o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, zero, left, 0);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			uint64_t v = wide ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			put_num(o, v, *fmt == 'u' ? 10 : 16, 0, width, zero, left, *fmt == 'X');
			break;
		}
		case 'p':
			put(o, '0');
			put(o, 'x');
			put_num(o, (uintptr_t)va_arg(ap, void *), 16, 0, 0, 0, 0, 0);
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int len = (int)(prec >= 0 ? strnlen(s, (size_t)prec) : strlen(s));
			if (!left)
				pad(o, ' ', width - len);
			for (int i = 0; i < len; i++)
				put(o, s[i]);
			if (left)
				pad(o, ' ', width - len);
			break;
		}
		case 'c':
			put(o, (char)va_arg(ap, int));
			break;
		case '\0':
			return;
		default:
			put(o, '%');
			put(o, *fmt);
			break;
		}
	}
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	static char dummy;
	struct out o = {size ? buf : &dummy, 0, size};
	vformat(&o, fmt, ap);
	if (size)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return (int)o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

void printf_locked(const char *fmt, ...)
{
	struct out o = {0, 0, 0};
	va_list ap;
	va_start(ap, fmt);
	vformat(&o, fmt, ap);
	va_end(ap);
}

void printf(const char *fmt, ...)
{
	struct out o = {0, 0, 0};
	va_list ap;
	va_start(ap, fmt);
	console_lock();
	vformat(&o, fmt, ap);
	console_unlock();
	va_end(ap);
}

const char *errorf(const char *fmt, ...)
{
	static char msg[160];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return msg;
}

/* -- CRC-32 (IEEE 802.3, reflected; what Python's zlib.crc32 computes) ------------------------- */

static uint32_t crc_table[256];
static int crc_table_ready;

uint32_t crc32(uint32_t crc, const void *data, size_t len)
{
	const unsigned char *p = data;
	if (!crc_table_ready) {
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++)
				c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
			crc_table[i] = c;
		}
		crc_table_ready = 1;
	}
	crc = ~crc;
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}
