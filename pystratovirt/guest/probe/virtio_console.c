/* virtio_console.c: owns the probe's virtio-console driver for port 0 (virtio 1.x §5.3, without
 * VIRTIO_CONSOLE_F_MULTIPORT: receiveq 0, transmitq 1) and the `console` command: writing a line
 * or a flood of bytes to the host, reading a line or a byte count from it.
 *
 * Receiving, with back-pressure of our own: CON_RXBUFS buffers of CON_RXBUF bytes are posted
 * when the driver starts. What the device fills is copied into `pending` (what the host sent and
 * no command has consumed yet) and the buffer is posted again only while `pending` has room for
 * everything that could arrive; otherwise it stays with us until a command consumes input. So a
 * host that sends more than we read is held back by the device (it stops reading its chardev)
 * and nothing is lost.
 *
 * Sending is synchronous: one chain per write of at most CON_TXBUF bytes, waited for.
 *
 * hvc0: with console=hvc0 on the command line (as Kata's debug mode and hydropper boot their
 * guests), port 0 is also a command console, the way Linux's hvc0 carries a shell: every line
 * the probe prints from then on goes out on it too (one chain per line, from a buffer of its
 * own), and the command loop runs the lines the host sends (commands.c polls hvc_poll_line).
 * The `console` command still reads and writes the same port. */
#include "probe.h"
#include "lib.h"
#include "x86.h"
#include "virtio.h"

#define CONSOLE_F_SIZE 0
#define CONSOLE_F_MULTIPORT 1
#define CONSOLE_F_EMERG_WRITE 2

#define CON_RXQ 0
#define CON_TXQ 1
#define CON_RXBUFS 4
#define CON_RXBUF 256
#define CON_TXBUF 4096
#define PENDING_CAP 4096
#define CON_TIMEOUT_US 10000000ull
#define CON_MAX_FLOOD (64u << 20)
#define LINE_MAX_SHOWN 400

static uint8_t rx_bufs[CON_RXBUFS][CON_RXBUF] __attribute__((aligned(64)));
static uint8_t tx_buf[CON_TXBUF] __attribute__((aligned(64)));
static uint8_t pending[PENDING_CAP];
static unsigned pending_len;
static int held[CON_RXBUFS]; /* taken back from the device and not posted again yet */
static uint64_t rx_total, tx_total;

static const char *console_feature_name(unsigned bit)
{
	switch (bit) {
	case CONSOLE_F_SIZE: return "SIZE";
	case CONSOLE_F_MULTIPORT: return "MULTIPORT";
	case CONSOLE_F_EMERG_WRITE: return "EMERG_WRITE";
	default: return 0;
	}
}

static unsigned posted(void)
{
	unsigned n = 0;
	for (unsigned i = 0; i < CON_RXBUFS; i++)
		n += !held[i];
	return n;
}

/* Post buffer i again if `pending` can take its contents on top of everything posted. */
static void repost(struct virtio_dev *d)
{
	int kicked = 0;
	for (unsigned i = 0; i < CON_RXBUFS; i++) {
		if (!held[i] || pending_len + (posted() + 1) * CON_RXBUF > PENDING_CAP)
			continue;
		struct virtq_buf b = {(uint64_t)rx_bufs[i], CON_RXBUF, 1};
		if (virtq_add(&d->vq[CON_RXQ], &b, 1, (void *)(uint64_t)(i + 1)) < 0)
			break;
		held[i] = 0;
		kicked = 1;
	}
	if (kicked)
		virtq_kick(d, &d->vq[CON_RXQ]);
}

/* Move what the device filled into `pending`. */
static void collect(struct virtio_dev *d)
{
	uint32_t len;
	void *cookie;
	while (virtq_get(&d->vq[CON_RXQ], &len, &cookie) >= 0) {
		unsigned i = (unsigned)(uint64_t)cookie - 1;
		if (i >= CON_RXBUFS)
			continue;
		if (len > CON_RXBUF)
			len = CON_RXBUF; /* a device bug; the buffer holds no more */
		memcpy(pending + pending_len, rx_bufs[i], len);
		pending_len += len;
		rx_total += len;
		held[i] = 1;
	}
	repost(d);
}

/* Bytes up to and including the first newline in `pending`, 0 when there is none. */
static unsigned line_len(void)
{
	for (unsigned i = 0; i < pending_len; i++)
		if (pending[i] == '\n')
			return i + 1;
	return 0;
}

static void consume(unsigned n)
{
	memmove(pending, pending + n, pending_len - n);
	pending_len -= n;
}

static const char *console_setup(struct virtio_dev *d)
{
	const char *err = virtq_setup(d, CON_RXQ);
	return err ? err : virtq_setup(d, CON_TXQ);
}

static void console_started(struct virtio_dev *d)
{
	pending_len = 0;
	for (unsigned i = 0; i < CON_RXBUFS; i++)
		held[i] = 1;
	repost(d);
}

/* -- hvc0 ------------------------------------------------------------------------------------ */
static struct virtio_dev *hvc_dev;
static char hvc_out[CON_TXBUF] __attribute__((aligned(64)));
static unsigned hvc_out_len;
static int hvc_busy; /* sending: what printf says meanwhile is not mirrored (no recursion) */

static void hvc_flush(void)
{
	if (!hvc_out_len || hvc_busy)
		return;
	hvc_busy = 1;
	if (!virtio_check(hvc_dev)) {
		struct virtq_buf b = {(uint64_t)hvc_out, hvc_out_len, 0};
		uint32_t used = 0;
		/* Nobody to tell if this fails: the serial console has the same line. */
		if (!virtq_run(hvc_dev, &hvc_dev->vq[CON_TXQ], &b, 1, CON_TIMEOUT_US, &used))
			tx_total += hvc_out_len;
	}
	hvc_out_len = 0;
	hvc_busy = 0;
}

static void hvc_putc(char c)
{
	if (hvc_busy)
		return;
	hvc_out[hvc_out_len++] = c;
	if (c == '\n' || hvc_out_len == sizeof(hvc_out))
		hvc_flush();
}

static int wants_hvc0(void)
{
	const char *cur = boot.cmdline;
	struct cmdline_arg a;
	while (cmdline_next(&cur, &a))
		if (a.key_len == 7 && !memcmp(a.key, "console", 7) && a.val && a.val_len == 4 &&
		    !memcmp(a.val, "hvc0", 4))
			return 1;
	return 0;
}

void hvc_init(void)
{
	const char *err = 0;
	if (!wants_hvc0())
		return;
	struct virtio_dev *d = virtio_find(VIRTIO_ID_CONSOLE, 0, &err);
	if (!d || virtio_check(d)) {
		printf("console: console=hvc0 given, but there is no working virtio console\n");
		return;
	}
	hvc_dev = d;
	console_mirror = hvc_putc;
	printf("console: hvc0 carries the command console too\n");
}

int hvc_poll_line(char *buf, unsigned cap)
{
	if (!hvc_dev || virtio_check(hvc_dev))
		return -1;
	collect(hvc_dev);
	unsigned n = line_len();
	if (!n) {
		if (pending_len + CON_RXBUF > PENDING_CAP) {
			/* No newline in all that: drop it, or no buffer would ever be posted again. */
			consume(pending_len);
			repost(hvc_dev);
			return -2;
		}
		return -1;
	}
	unsigned k = 0;
	for (unsigned i = 0; i < n && k + 1 < cap; i++) {
		char c = (char)pending[i];
		if (c == '\t')
			c = ' ';
		if (c >= 0x20 && c < 0x7f)
			buf[k++] = c;
	}
	buf[k] = '\0';
	int too_long = n - 1 >= cap;
	consume(n);
	repost(hvc_dev);
	return too_long ? -2 : (int)k;
}

const struct virtio_driver virtio_console_driver = {
	.device_id = VIRTIO_ID_CONSOLE,
	.name = "console",
	.features = 0, /* port 0 only: neither MULTIPORT nor SIZE nor EMERG_WRITE */
	.setup = console_setup,
	.started = console_started,
};

static const char *send(struct virtio_dev *d, const uint8_t *data, uint32_t len)
{
	if (data != tx_buf)
		memcpy(tx_buf, data, len);
	struct virtq_buf b = {(uint64_t)tx_buf, len, 0};
	uint32_t used = 0;
	const char *err = virtq_run(d, &d->vq[CON_TXQ], &b, 1, CON_TIMEOUT_US, &used);
	if (!err)
		tx_total += len;
	return err;
}

static struct virtio_dev *wait_dev;

static int rx_arrived(void) { return virtq_has_used(&wait_dev->vq[CON_RXQ]); }

/* Wait until `pending` holds at least `want` bytes (or a newline, with want 0), or the time is
 * up. Returns whether the condition was met. */
static int wait_input(struct virtio_dev *d, unsigned want, uint64_t timeout_us)
{
	uint64_t end = rdtsc() + timeout_us * tsc_per_us();
	wait_dev = d;
	for (;;) {
		collect(d);
		if (want ? pending_len >= want : line_len() != 0)
			return 1;
		uint64_t now = rdtsc();
		if (now >= end)
			return 0;
		uint64_t left = (end - now) / tsc_per_us();
		sti();
		wait_us(left < 10000 ? left : 10000, rx_arrived);
		cli();
	}
}

static void print_text(const char *label, const uint8_t *p, unsigned n)
{
	char shown[LINE_MAX_SHOWN + 1];
	unsigned k = 0;
	for (unsigned i = 0; i < n && k < LINE_MAX_SHOWN; i++)
		shown[k++] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '.';
	shown[k] = 0;
	printf("console: %s %u bytes: %s\n", label, n, shown);
}

#define CONSOLE_USAGE "usage: console info|write <text>|read <timeout_ms>|recv <bytes> <timeout_ms>|flood <bytes>"

const char *cmd_console(int argc, char **argv, const char *args)
{
	if (argc < 2)
		return CONSOLE_USAGE;
	const char *err = 0;
	struct virtio_dev *d = virtio_find_running(VIRTIO_ID_CONSOLE, 0, &err);
	if (!d)
		return err;
	if (!strcmp(argv[1], "info") && argc == 2) {
		collect(d);
		printf("console: queues rx=%u tx=%u posted=%u pending=%u received=%lu sent=%lu\n",
		       d->vq[CON_RXQ].size, d->vq[CON_TXQ].size, posted(), pending_len, rx_total, tx_total);
		virtio_print_features("features", d->driver_features, console_feature_name);
		virtio_print_features("offered", d->device_features, console_feature_name);
		return 0;
	}
	if (!strcmp(argv[1], "write") && argc >= 3) {
		/* Everything after the word "write" as typed, plus a newline. */
		const char *text = args;
		while (*text == ' ')
			text++;
		text += 5;
		while (*text == ' ')
			text++;
		unsigned n = (unsigned)strnlen(text, CON_TXBUF - 1);
		memcpy(tx_buf, text, n);
		tx_buf[n++] = '\n';
		err = send(d, tx_buf, n);
		if (!err)
			printf("console: wrote %u bytes\n", n);
		return err;
	}
	uint64_t a, b = 0;
	if (argc < 3 || virtio_parse_num(argv[2], &a) || (argc == 4 && virtio_parse_num(argv[3], &b)) || argc > 4)
		return CONSOLE_USAGE;
	if (!strcmp(argv[1], "read") && argc == 3 && a <= 600000) {
		int line = wait_input(d, 0, a * 1000);
		unsigned n = line ? line_len() : pending_len;
		unsigned shown = line ? n - 1 : n;
		if (shown && pending[shown - 1] == '\r')
			shown--;
		print_text(line ? "line" : "partial", pending, shown);
		consume(n);
		repost(d);
		return 0;
	}
	if (!strcmp(argv[1], "recv") && argc == 4 && a && b <= 600000) {
		uint64_t got = 0, end = rdtsc() + b * 1000 * tsc_per_us();
		uint32_t crc = 0;
		while (got < a) {
			uint64_t now = rdtsc();
			if (!pending_len && (now >= end || !wait_input(d, 1, (end - now) / tsc_per_us())))
				break;
			unsigned n = pending_len < a - got ? pending_len : (unsigned)(a - got);
			crc = crc32(crc, pending, n);
			consume(n);
			repost(d);
			got += n;
		}
		printf("console: recv bytes=%lu crc32=0x%08x\n", got, crc);
		return 0;
	}
	if (!strcmp(argv[1], "flood") && argc == 3 && a && a <= CON_MAX_FLOOD) {
		/* Filled once: every byte the emulated guest touches costs time. */
		for (uint32_t i = 0; i < CON_TXBUF; i++)
			tx_buf[i] = (uint8_t)('a' + i % 26);
		uint64_t t0 = rdtsc(), sent = 0, chains = 0;
		while (sent < a) {
			uint32_t n = a - sent < CON_TXBUF ? (uint32_t)(a - sent) : CON_TXBUF;
			err = send(d, tx_buf, n);
			if (err)
				return err;
			sent += n;
			chains++;
		}
		printf("console: flood bytes=%lu chains=%lu us=%lu\n", sent, chains,
		       tsc_to_us(rdtsc() - t0));
		return 0;
	}
	return CONSOLE_USAGE;
}
