/* bootinfo.c: owns reading Linux's struct boot_params (the zero page the VMM hands over in
 * RSI): the command line and its key=value tokens, the e820 map, the initrd. */
#include "probe.h"
#include "lib.h"

/* Offsets into struct boot_params (Documentation/arch/x86/zero-page.rst, boot.rst). */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0

#define ZERO_PAGE_ADDR 0x7000
#define CMDLINE_MAX 0xffff           /* layout.CMDLINE_MAX */
#define IDENTITY_MAPPED (1ull << 32) /* the VMM's page tables cover the first 4 GiB */

struct bootinfo boot;

static uint32_t bp32(unsigned off) { return *(volatile uint32_t *)(boot.boot_params + off); }
static uint8_t bp8(unsigned off) { return *(volatile uint8_t *)(boot.boot_params + off); }

void bootinfo_init(uint64_t boot_params)
{
	/* Only a pointer we can dereference is used; the boot protocol puts it at 0x7000. */
	if (!boot_params || boot_params + 4096 > IDENTITY_MAPPED) {
		printf("warning: boot_params pointer 0x%lx unusable, trying 0x%x\n", boot_params,
		       ZERO_PAGE_ADDR);
		boot_params = ZERO_PAGE_ADDR;
	}
	boot.boot_params = boot_params;

	uint64_t cl = bp32(BP_CMD_LINE_PTR) | ((uint64_t)bp32(BP_EXT_CMD_LINE_PTR) << 32);
	boot.cmdline_addr = cl;
	boot.cmdline = "";
	if (cl && cl + CMDLINE_MAX < IDENTITY_MAPPED) {
		const char *s = (const char *)cl;
		/* An unterminated line would run on into whatever follows; refuse it. */
		if (strnlen(s, CMDLINE_MAX + 1) <= CMDLINE_MAX)
			boot.cmdline = s;
	}

	unsigned n = bp8(BP_E820_ENTRIES);
	if (n > E820_MAX)
		n = E820_MAX;
	memcpy(boot.e820, (const void *)(boot_params + BP_E820_TABLE), n * sizeof(struct e820_entry));
	boot.e820_count = n;
	for (unsigned i = 0; i < n; i++) {
		if (boot.e820[i].type == E820_RAM) {
			boot.ram_total += boot.e820[i].size;
			boot.ram_ranges++;
		}
	}

	boot.initrd_addr = bp32(BP_RAMDISK_IMAGE) | ((uint64_t)bp32(BP_EXT_RAMDISK_IMAGE) << 32);
	boot.initrd_size = bp32(BP_RAMDISK_SIZE) | ((uint64_t)bp32(BP_EXT_RAMDISK_SIZE) << 32);
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Tokens split at white space outside double quotes, like the kernel's next_arg(); a token
 * splits at its first '=' and a value wrapped in quotes loses them. */
int cmdline_next(const char **cursor, struct cmdline_arg *arg)
{
	const char *p = *cursor;
	while (is_space(*p))
		p++;
	if (!*p) {
		*cursor = p;
		return 0;
	}
	const char *start = p, *eq = 0;
	int quoted = 0;
	for (; *p && (quoted || !is_space(*p)); p++) {
		if (*p == '"')
			quoted = !quoted;
		else if (*p == '=' && !eq && !quoted)
			eq = p;
	}
	*cursor = p;
	arg->key = start;
	if (!eq) {
		arg->key_len = (int)(p - start);
		arg->val = 0;
		arg->val_len = 0;
		return 1;
	}
	arg->key_len = (int)(eq - start);
	arg->val = eq + 1;
	arg->val_len = (int)(p - eq - 1);
	if (arg->val_len >= 2 && arg->val[0] == '"' && arg->val[arg->val_len - 1] == '"') {
		arg->val++;
		arg->val_len -= 2;
	}
	return 1;
}

int cmdline_find(const char *key, struct cmdline_arg *arg)
{
	const char *cur = boot.cmdline;
	struct cmdline_arg a;
	size_t klen = strlen(key);
	int found = 0;
	/* The last occurrence wins, as with kernel parameters. */
	while (cmdline_next(&cur, &a)) {
		if ((size_t)a.key_len == klen && !memcmp(a.key, key, klen)) {
			if (arg)
				*arg = a;
			found = 1;
		}
	}
	return found;
}

uint64_t cmdline_uint(const char *key, uint64_t fallback)
{
	struct cmdline_arg a;
	char num[24];
	uint64_t v;
	if (!cmdline_find(key, &a) || !a.val || a.val_len <= 0 || a.val_len >= (int)sizeof(num))
		return fallback;
	memcpy(num, a.val, (size_t)a.val_len);
	num[a.val_len] = '\0';
	if (parse_dec(num, &v) && parse_hex(num, &v))
		return fallback;
	return v;
}

void bootinfo_print_cmdline(void)
{
	const char *cur = boot.cmdline;
	struct cmdline_arg a;
	printf("cmdline: %s\n", boot.cmdline);
	while (cmdline_next(&cur, &a)) {
		if (a.val)
			printf("arg %.*s=%.*s\n", a.key_len, a.key, a.val_len, a.val);
		else
			printf("arg %.*s\n", a.key_len, a.key);
	}
}

void bootinfo_print_mem(void)
{
	printf("mem: %lu bytes in %u e820 RAM ranges\n", boot.ram_total, boot.ram_ranges);
	for (unsigned i = 0; i < boot.e820_count; i++)
		printf("e820: addr=0x%lx size=0x%lx type=%u\n", boot.e820[i].addr, boot.e820[i].size,
		       boot.e820[i].type);
}

void bootinfo_print_initrd(void)
{
	if (boot.initrd_size)
		printf("initrd: addr=0x%lx size=%lu\n", boot.initrd_addr, boot.initrd_size);
	else
		printf("initrd: none\n");
}
