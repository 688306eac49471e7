/* mptable.c: owns finding, checksumming and parsing the Intel MultiProcessor Specification 1.4
 * table (floating pointer "_MP_" and configuration table "PCMP") the VMM puts in the EBDA. */
#include "probe.h"
#include "lib.h"
#include "x86.h"

#define MP_FPS_SIG 0x5f504d5f   /* "_MP_" */
#define MP_TABLE_SIG 0x504d4350 /* "PCMP" */
#define MP_HEADER_LEN 44

#define MP_ENTRY_PROCESSOR 0
#define MP_ENTRY_BUS 1
#define MP_ENTRY_IOAPIC 2
#define MP_ENTRY_IOINT 3
#define MP_ENTRY_LOCALINT 4

#define DEFAULT_LAPIC 0xfee00000u
#define DEFAULT_IOAPIC 0xfec00000u

struct mpinfo mp;

static uint8_t sum8(const uint8_t *p, unsigned len)
{
	uint8_t s = 0;
	while (len--)
		s += *p++;
	return s;
}

/* A floating pointer is 16-byte aligned; the spec's search areas, in its order. */
static uint32_t find_fps(uint32_t start, uint32_t len)
{
	for (uint32_t a = start; a + 16 <= start + len; a += 16) {
		const uint8_t *p = phys(a);
		if (*(const uint32_t *)p == MP_FPS_SIG && p[8] == 1 && !sum8(p, 16))
			return a;
	}
	return 0;
}

static int fail(enum mp_status status, const char *why)
{
	mp.status = status;
	mp.error = why;
	mp.cpu_count = 0;
	mp.cpus_enabled = 0;
	return 0;
}

static int parse(void)
{
	mp.lapic_addr = DEFAULT_LAPIC;
	mp.ioapic_addr = DEFAULT_IOAPIC;
	for (int i = 0; i < 16; i++)
		mp.isa_irq_pin[i] = -1;

	/* The EBDA (its segment is in the BIOS data area at 0x40e when a BIOS set it up; the
	 * VMM puts the table at 0x9fc00 without one), then the BIOS ROM. */
	uint32_t ebda = (uint32_t)(*(volatile uint16_t *)phys(0x40e)) << 4;
	uint32_t fps = 0;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fps = find_fps(ebda, 1024);
	if (!fps)
		fps = find_fps(0x9fc00, 1024);
	if (!fps)
		fps = find_fps(0xf0000, 0x10000);
	if (!fps)
		return fail(MP_MISSING, "no floating pointer");
	mp.fps_addr = fps;

	const uint8_t *f = phys(fps);
	if (f[11])
		return fail(MP_BAD, "default configurations are not supported");
	uint32_t table = *(const uint32_t *)(f + 4);
	if (!table || table >= 0x100000)
		return fail(MP_BAD, "configuration table pointer out of range");
	mp.table_addr = table;

	const uint8_t *t = phys(table);
	uint16_t len = *(const uint16_t *)(t + 4);
	if (*(const uint32_t *)t != MP_TABLE_SIG)
		return fail(MP_BAD, "no PCMP signature");
	if (len < MP_HEADER_LEN || table + len > 0x100000)
		return fail(MP_BAD, "bad table length");
	if (sum8(t, len))
		return fail(MP_BAD, "checksum");
	mp.lapic_addr = *(const uint32_t *)(t + 36);

	unsigned entries = *(const uint16_t *)(t + 34);
	unsigned off = MP_HEADER_LEN;
	int have_ioapic = 0;
	for (unsigned i = 0; i < entries; i++) {
		if (off >= len)
			return fail(MP_BAD, "entries overrun the table");
		const uint8_t *e = t + off;
		unsigned size = e[0] == MP_ENTRY_PROCESSOR ? 20 : 8;
		if (e[0] > MP_ENTRY_LOCALINT)
			return fail(MP_BAD, "unknown entry type");
		if (off + size > len)
			return fail(MP_BAD, "entries overrun the table");
		switch (e[0]) {
		case MP_ENTRY_PROCESSOR:
			if (mp.cpu_count < MAX_CPUS) {
				mp.cpus[mp.cpu_count].apic_id = e[1];
				mp.cpus[mp.cpu_count].flags = e[3];
				mp.cpu_count++;
				if (e[3] & 1)
					mp.cpus_enabled++;
			}
			break;
		case MP_ENTRY_IOAPIC:
			mp.ioapic_count++;
			if (!have_ioapic && (e[3] & 1)) {
				have_ioapic = 1;
				mp.ioapic_id = e[1];
				mp.ioapic_addr = *(const uint32_t *)(e + 4);
			}
			break;
		case MP_ENTRY_IOINT:
			/* e[4] source bus, e[5] bus IRQ, e[6] IOAPIC id, e[7] pin. The micro-VM's
			 * only bus is ISA, so every source IRQ below 16 is an ISA IRQ. */
			if (e[1] == 0 && e[5] < 16 && e[7] < 24)
				mp.isa_irq_pin[e[5]] = (int8_t)e[7];
			break;
		default:
			break;
		}
		off += size;
	}
	if (!mp.cpu_count)
		return fail(MP_BAD, "no processor entries");
	mp.status = MP_OK;
	return 1;
}

void mp_init(void)
{
	parse();
}

unsigned mp_isa_irq_pin(unsigned irq)
{
	if (irq < 16 && mp.isa_irq_pin[irq] >= 0)
		return (unsigned)mp.isa_irq_pin[irq];
	return irq;
}

void mp_print(void)
{
	if (mp.status == MP_MISSING) {
		printf("cpus: 1 (MP table missing: %s)\n", mp.error);
		return;
	}
	if (mp.status == MP_BAD) {
		printf("cpus: 1 (MP table bad: %s)\n", mp.error);
		return;
	}
	if (mp.cpus_enabled == mp.cpu_count)
		printf("cpus: %u in MP table\n", mp.cpus_enabled);
	else
		printf("cpus: %u in MP table (%u disabled)\n", mp.cpus_enabled,
		       mp.cpu_count - mp.cpus_enabled);
	printf("mp: fps=0x%x table=0x%x lapic=0x%x\n", mp.fps_addr, mp.table_addr, mp.lapic_addr);
	for (unsigned i = 0; i < mp.cpu_count; i++)
		printf("mp cpu: apic=%u enabled=%u bsp=%u\n", mp.cpus[i].apic_id, mp.cpus[i].flags & 1,
		       (mp.cpus[i].flags >> 1) & 1);
	if (mp.ioapic_count)
		printf("mp ioapic: id=%u addr=0x%x\n", mp.ioapic_id, mp.ioapic_addr);
}
