/* commands.c: owns the serial command console: reading lines, the command table, and the core
 * commands. The protocol: after "ready", the host sends one command per line (CR or LF ends
 * it; nothing is echoed); the probe prints the command's output lines, then "ok" or
 * "error: <message>".
 *
 * Adding a command (e.g. a virtio-mmio driver): put the driver in its own file, declare its
 * handler (a command_fn, see probe.h) in a header, and add one line to `commands` below.
 * Handlers print with printf() and return NULL for ok or a message (errorf() formats one). */
#include "probe.h"
#include "lib.h"
#include "serial.h"
#include "x86.h"
#include "virtio.h"

#define LINE_MAX 512
#define ARGV_MAX 16
#define IDENTITY_MAPPED (1ull << 32)

static const char *cmd_help(int argc, char **argv, const char *args);
static const char *cmd_version(int argc, char **argv, const char *args);
static const char *cmd_cmdline(int argc, char **argv, const char *args);
static const char *cmd_mem(int argc, char **argv, const char *args);
static const char *cmd_initrd(int argc, char **argv, const char *args);
static const char *cmd_cpus(int argc, char **argv, const char *args);
static const char *cmd_irqs(int argc, char **argv, const char *args);
static const char *cmd_echo(int argc, char **argv, const char *args);
static const char *cmd_ticks(int argc, char **argv, const char *args);
static const char *cmd_peek(int argc, char **argv, const char *args);
static const char *cmd_poke(int argc, char **argv, const char *args);
static const char *cmd_crc32(int argc, char **argv, const char *args);
static const char *cmd_touch(int argc, char **argv, const char *args);
static const char *cmd_in(int argc, char **argv, const char *args);
static const char *cmd_out(int argc, char **argv, const char *args);
static const char *cmd_reboot(int argc, char **argv, const char *args);
static const char *cmd_halt(int argc, char **argv, const char *args);
static const char *cmd_triple(int argc, char **argv, const char *args);

static const struct command commands[] = {
	{"help", "", "list the commands", cmd_help},
	{"version", "", "print the banner line", cmd_version},
	{"cmdline", "", "print the command line and its arguments", cmd_cmdline},
	{"mem", "", "print the RAM total and the e820 map", cmd_mem},
	{"initrd", "", "print where the initrd is", cmd_initrd},
	{"cpus", "", "print the MP table's CPUs and how many are online", cmd_cpus},
	{"ipi", "<apic-id>", "interrupt an application processor and wait for it to answer", cmd_ipi},
	{"irqs", "", "print interrupt counts per vector", cmd_irqs},
	{"echo", "<text>", "print the text", cmd_echo},
	{"ticks", "", "print the TSC (rdtsc)", cmd_ticks},
	{"peek", "<hexaddr> [1|2|4|8]", "read guest physical memory (default 1 byte)", cmd_peek},
	{"poke", "<hexaddr> <hexval> [1|2|4|8]", "write guest physical memory (default 1 byte)", cmd_poke},
	{"crc32", "<hexaddr> <hexlen>", "CRC-32 (zlib's) of guest physical memory", cmd_crc32},
	{"touch", "<hexaddr> <hexlen> [stamp|read]", "rewrite one byte of every 4 KiB page (makes the host back it); stamp: write each page's address into it; read: only read each page (prints the XOR of their first 8 bytes)", cmd_touch},
	{"inb", "<hexport>", "read an I/O port (8 bits)", cmd_in},
	{"inw", "<hexport>", "read an I/O port (16 bits)", cmd_in},
	{"inl", "<hexport>", "read an I/O port (32 bits)", cmd_in},
	{"outb", "<hexport> <hexval>", "write an I/O port (8 bits)", cmd_out},
	{"outw", "<hexport> <hexval>", "write an I/O port (16 bits)", cmd_out},
	{"outl", "<hexport> <hexval>", "write an I/O port (32 bits)", cmd_out},
	{"reboot", "", "print ok, then reset through the i8042 (0xfe to port 0x64)", cmd_reboot},
	{"halt", "", "print ok, then stop this CPU for good (cli; hlt)", cmd_halt},
	{"triple", "", "print ok, then triple-fault (empty IDT, ud2)", cmd_triple},
	/* Driver commands go here. */
	{"virtio", "[init <slot>|reset <slot>]", "list the virtio-mmio slots (status, features, interrupts used=N config=M); re-initialize or reset one", cmd_virtio},
	{"blk", "<n> info|read <sector> <count>|write <sector> <count> <hexbyte|pattern> [force]|flush|discard <sector> <count>|zeroes <sector> <count> [unmap]|wait-config <timeout_ms>", "virtio-blk n (0-based among blk devices); pattern: byte i of sector s = (s*7 + i) & 0xff", cmd_blk},
	{"net", "<n> info|send <dst-mac> <ethertype-hex> <len> <fill-hexbyte>|recv <timeout_ms>|drain", "virtio-net n (0-based among net devices); len is the whole frame without FCS", cmd_net},
	{"balloon", "info|run <timeout_ms>|stats <timeout_ms>", "virtio-balloon: show num_pages/actual; inflate or deflate toward num_pages until the timeout; answer a statistics request", cmd_balloon},
	{"rng", "info|read <bytes>|rate <bytes>", "virtio-rng: read random bytes and report count, crc32, distinct values; or time the read by the guest's clock", cmd_rng},
	{"console", "info|write <text>|read <timeout_ms>|recv <bytes> <timeout_ms>|flood <bytes>", "virtio-console port 0: write a line to the host; read a line or a byte count the host sent; write many bytes", cmd_console},
};

#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

static int use_irq;

/* -- helpers for handlers ---------------------------------------------------------------- */

static const char *usage_error(const char *name)
{
	for (unsigned i = 0; i < NCOMMANDS; i++)
		if (!strcmp(commands[i].name, name))
			return errorf("usage: %s %s", name, commands[i].usage);
	return "usage";
}

static int parse_width(int argc, char **argv, int index, unsigned *width)
{
	uint64_t w = 1;
	if (argc > index && parse_dec(argv[index], &w))
		return -1;
	if (w != 1 && w != 2 && w != 4 && w != 8)
		return -1;
	*width = (unsigned)w;
	return 0;
}

static unsigned width_of(const char *name)
{
	char c = name[strlen(name) - 1];
	return c == 'b' ? 1 : c == 'w' ? 2 : 4;
}

/* -- the core commands ------------------------------------------------------------------- */

static const char *cmd_help(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	for (unsigned i = 0; i < NCOMMANDS; i++) {
		const struct command *c = &commands[i];
		printf("%s%s%s - %s\n", c->name, c->usage[0] ? " " : "", c->usage, c->help);
	}
	return 0;
}

static const char *cmd_version(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	printf("pystratovirt probe guest %s\n", PROBE_VERSION);
	return 0;
}

static const char *cmd_cmdline(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	bootinfo_print_cmdline();
	return 0;
}

static const char *cmd_mem(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	bootinfo_print_mem();
	return 0;
}

static const char *cmd_initrd(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	bootinfo_print_initrd();
	return 0;
}

static const char *cmd_cpus(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	mp_print();
	smp_print_online();
	return 0;
}

static const char *cmd_irqs(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	irq_print_counts();
	return 0;
}

static const char *cmd_echo(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv;
	printf("%s\n", args);
	return 0;
}

static const char *cmd_ticks(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	printf("ticks: %lu\n", rdtsc());
	return 0;
}

static const char *cmd_peek(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t addr, v = 0;
	unsigned w;
	if (argc < 2 || argc > 3 || parse_hex(argv[1], &addr) || parse_width(argc, argv, 2, &w))
		return usage_error(argv[0]);
	if (addr >= IDENTITY_MAPPED || addr + w > IDENTITY_MAPPED)
		return errorf("address 0x%lx is not mapped (only the first 4 GiB are)", addr);
	switch (w) {
	case 1: v = mmio_read8(addr); break;
	case 2: v = mmio_read16(addr); break;
	case 4: v = mmio_read32(addr); break;
	default: v = mmio_read64(addr); break;
	}
	printf("value: 0x%0*lx\n", (int)(2 * w), v);
	return 0;
}

static const char *cmd_poke(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t addr, v;
	unsigned w;
	if (argc < 3 || argc > 4 || parse_hex(argv[1], &addr) || parse_hex(argv[2], &v) ||
	    parse_width(argc, argv, 3, &w))
		return usage_error(argv[0]);
	if (addr >= IDENTITY_MAPPED || addr + w > IDENTITY_MAPPED)
		return errorf("address 0x%lx is not mapped (only the first 4 GiB are)", addr);
	if (w < 8 && v >> (8 * w))
		return errorf("value 0x%lx is wider than %u bits", v, 8 * w);
	switch (w) {
	case 1: mmio_write8(addr, (uint8_t)v); break;
	case 2: mmio_write16(addr, (uint16_t)v); break;
	case 4: mmio_write32(addr, (uint32_t)v); break;
	default: mmio_write64(addr, v); break;
	}
	return 0;
}

/* `<cmd> <addr> <len>` (hex) naming a range inside the identity map: NULL, or the error. */
static const char *parse_range(int argc, char **argv, uint64_t *addr, uint64_t *len)
{
	if (argc != 3 || parse_hex(argv[1], addr) || parse_hex(argv[2], len))
		return usage_error(argv[0]);
	if (*addr >= IDENTITY_MAPPED || *len > IDENTITY_MAPPED - *addr)
		return errorf("range 0x%lx+0x%lx is not mapped (only the first 4 GiB are)", *addr, *len);
	return 0;
}

static const char *cmd_crc32(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t addr, len;
	const char *err = parse_range(argc, argv, &addr, &len);
	if (err)
		return err;
	printf("crc32: 0x%08x\n", crc32(0, (const void *)addr, len));
	return 0;
}

/* Visits every 4 KiB page of a range once, so the host has to back it:
 *  - by default it rewrites the first byte of each page with its own value (the data stays as
 *    it was, but each page gets host memory of its own: what a balloon test measures);
 *  - "stamp" writes each page's own address into its first 8 bytes (the page now holds data);
 *  - "read" only reads the first 8 bytes of each page and prints their XOR (the host maps the
 *    page without copying it: what a snapshot's clones share). */
static const char *cmd_touch(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t addr, len;
	int mode = 0; /* 0 rewrite, 1 stamp, 2 read */
	if (argc == 4) {
		if (!strcmp(argv[3], "stamp"))
			mode = 1;
		else if (!strcmp(argv[3], "read"))
			mode = 2;
		else
			return usage_error(argv[0]);
		argc = 3;
	}
	const char *err = parse_range(argc, argv, &addr, &len);
	if (err)
		return err;
	uint64_t pages = 0, sum = 0;
	for (uint64_t a = addr & ~0xfffUL; a < addr + len; a += 0x1000, pages++) {
		if (mode == 1) {
			*(volatile uint64_t *)a = a;
		} else if (mode == 2) {
			sum ^= *(volatile uint64_t *)a;
		} else {
			volatile uint8_t *p = (volatile uint8_t *)a;
			*p = *p;
		}
	}
	if (mode == 2)
		printf("touched: %lu pages xor=0x%lx\n", pages, sum);
	else
		printf("touched: %lu pages\n", pages);
	return 0;
}

static const char *cmd_in(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t port;
	if (argc != 2 || parse_hex(argv[1], &port) || port > 0xffff)
		return usage_error(argv[0]);
	unsigned w = width_of(argv[0]);
	uint32_t v = w == 1 ? inb((uint16_t)port) : w == 2 ? inw((uint16_t)port) : inl((uint16_t)port);
	printf("value: 0x%0*x\n", (int)(2 * w), v);
	return 0;
}

static const char *cmd_out(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t port, v;
	if (argc != 3 || parse_hex(argv[1], &port) || port > 0xffff || parse_hex(argv[2], &v))
		return usage_error(argv[0]);
	unsigned w = width_of(argv[0]);
	if (v >> (8 * w))
		return errorf("value 0x%lx is wider than %u bits", v, 8 * w);
	if (w == 1)
		outb((uint16_t)port, (uint8_t)v);
	else if (w == 2)
		outw((uint16_t)port, (uint16_t)v);
	else
		outl((uint16_t)port, (uint32_t)v);
	return 0;
}

/* reboot, halt and triple answer "ok" before acting: afterwards nobody is left to answer. */
static const char *cmd_reboot(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	printf("ok\n");
	outb(0x64, 0xfe);
	delay_us(1000000);
	return "reset did not happen";
}

static const char *cmd_halt(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	printf("ok\n");
	halt_forever();
}

static const char *cmd_triple(int argc, char **argv, const char *args)
{
	(void)argc, (void)argv, (void)args;
	static const struct desc_ptr empty = {0, 0};
	printf("ok\n");
	cli();
	/* With a zero-limit IDT, #UD cannot be delivered (#GP), nor can that (#DF), nor that:
	 * the CPU shuts down, which KVM reports as KVM_EXIT_SHUTDOWN. */
	lidt(&empty);
	__asm__ volatile("ud2");
	halt_forever();
}

/* -- the console loop -------------------------------------------------------------------- */

void console_input_init(void)
{
	if (cmdline_find("noirq", 0)) {
		printf("console: polling\n");
		return;
	}
	/* IRQ 4 edge-triggered to this CPU: the loop drains the UART before every hlt, so the
	 * line is low then and the next byte makes a fresh edge. The periodic LAPIC timer is
	 * the safety net should the UART interrupt never come. */
	unsigned pin = mp_isa_irq_pin(COM1_IRQ);
	ioapic_route(pin, VEC_SERIAL, lapic_id(), 0);
	serial_enable_rx_irq();
	timer_start_idle_tick();
	use_irq = 1;
	printf("console: irq (ioapic pin %u vector 0x%x)\n", pin, VEC_SERIAL);
}

/* Wait for the UART to have something; returns with interrupts off. */
static void wait_for_input(void)
{
	if (!use_irq) {
		cpu_relax();
		return;
	}
	cli();
	if (!serial_rx_ready())
		sti_hlt();
	cli();
}

static char line[LINE_MAX];

/* One line without its terminator; -1 when it was longer than LINE_MAX - 1 (and dropped). */
static int read_line(void)
{
	unsigned n = 0;
	int overflow = 0;
	for (;;) {
		int c = serial_getc();
		if (c < 0) {
			/* A whole line from hvc0, unless one is half typed on the UART. */
			if (!n && !overflow) {
				int k = hvc_poll_line(line, LINE_MAX);
				if (k > 0 || k == -2)
					return k > 0 ? k : -1;
			}
			wait_for_input();
			continue;
		}
		if (c == '\r' || c == '\n') {
			if (overflow)
				return -1;
			if (!n)
				continue; /* blank lines, and the LF of a CR LF */
			line[n] = '\0';
			return (int)n;
		}
		if (c == 0x08 || c == 0x7f) {
			if (n)
				n--;
			continue;
		}
		if (c == '\t')
			c = ' ';
		if (c < 0x20)
			continue;
		if (n < LINE_MAX - 1)
			line[n++] = (char)c;
		else
			overflow = 1;
	}
}

static void run_line(void)
{
	static char buf[LINE_MAX];
	char *argv[ARGV_MAX];
	int argc = 0;

	memcpy(buf, line, sizeof(buf));
	for (char *p = buf; *p && argc < ARGV_MAX;) {
		while (*p == ' ')
			*p++ = '\0';
		if (!*p)
			break;
		argv[argc++] = p;
		while (*p && *p != ' ')
			p++;
	}
	if (!argc)
		return;

	/* The raw text after the name, for commands like echo that want it verbatim. */
	const char *args = line;
	while (*args == ' ')
		args++;
	while (*args && *args != ' ')
		args++;
	while (*args == ' ')
		args++;

	for (unsigned i = 0; i < NCOMMANDS; i++) {
		if (!strcmp(commands[i].name, argv[0])) {
			const char *err = commands[i].fn(argc, argv, args);
			if (err)
				printf("error: %s\n", err);
			else
				printf("ok\n");
			return;
		}
	}
	printf("error: unknown command %s\n", argv[0]);
}

void command_loop(void)
{
	for (;;) {
		if (read_line() < 0)
			printf("error: line too long\n");
		else
			run_line();
	}
}
