/* irq.c: owns the probe's interrupt plumbing: the IDT, the exception report, the local APIC
 * (IPIs, the timer used for delays and the idle tick), the IOAPIC routes, and the counters the
 * "irqs" command prints. */
#include "probe.h"
#include "lib.h"
#include "serial.h"
#include "x86.h"

/* Local APIC registers (offsets from its base). */
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0

#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define ICR_PENDING (1u << 12)

#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10

/* KVM's in-kernel LAPIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1) unless the VMM changes
 * it; this guest only ever runs on KVM, so no calibration. */
#define LAPIC_TIMER_HZ 1000000000ull
#define IDLE_TICK_MS 20

struct idt_gate {
	uint16_t offset_lo;
	uint16_t selector;
	uint8_t ist;
	uint8_t type; /* 0x8e: present, DPL 0, 64-bit interrupt gate */
	uint16_t offset_mid;
	uint32_t offset_hi;
	uint32_t reserved;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static uint64_t lapic_base;
static uint64_t irq_counts[256];
static irq_handler_fn irq_handlers[256];
static const char *irq_names[256];
static unsigned next_device_vector = VEC_DEVICE_FIRST;
static int idle_tick_on;

extern void spurious_stub(void);

static void set_gate(unsigned vector, void *handler)
{
	uint64_t a = (uint64_t)handler;
	idt[vector].offset_lo = (uint16_t)a;
	idt[vector].selector = SEL_CODE64;
	idt[vector].ist = 0;
	idt[vector].type = 0x8e;
	idt[vector].offset_mid = (uint16_t)(a >> 16);
	idt[vector].offset_hi = (uint32_t)(a >> 32);
}

static void load_idt(void)
{
	struct desc_ptr p = {sizeof(idt) - 1, (uint64_t)idt};
	lidt(&p);
}

uint32_t lapic_read(unsigned reg) { return mmio_read32(lapic_base + reg); }
void lapic_write(unsigned reg, uint32_t value) { mmio_write32(lapic_base + reg, value); }
unsigned lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

static void eoi(void) { lapic_write(LAPIC_EOI, 0); }

static void timer_tick(unsigned vector) { (void)vector; }
static void serial_irq(unsigned vector) { (void)vector; } /* the console loop drains the UART */

void irq_set_handler(unsigned vector, const char *name, irq_handler_fn fn)
{
	irq_names[vector] = name;
	irq_handlers[vector] = fn;
}

int irq_alloc_vector(const char *name, irq_handler_fn fn)
{
	if (next_device_vector > VEC_DEVICE_LAST)
		return -1;
	unsigned v = next_device_vector++;
	irq_set_handler(v, name, fn);
	return (int)v;
}

void irq_init_bsp(void)
{
	for (unsigned v = 0; v < 32; v++)
		set_gate(v, isr_stub_table[v]);
	for (unsigned v = VEC_TIMER; v <= VEC_DEVICE_LAST; v++)
		set_gate(v, irq_stub_table[v - VEC_TIMER]);
	set_gate(VEC_SPURIOUS, spurious_stub);
	load_idt();
	irq_set_handler(VEC_TIMER, "timer", timer_tick);
	irq_set_handler(VEC_SERIAL, "serial", serial_irq);

	/* Mask both 8259s (OCW1) so nothing arrives through them as ExtINT; the IOAPIC carries
	 * all device interrupts. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	/* The APIC base from its MSR, which is what the hardware decodes (the MP table's copy is
	 * informational). */
	lapic_base = rdmsr(MSR_APIC_BASE) & 0xffffff000ull;
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS); /* software-enable the APIC */
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
}

void irq_init_ap(void)
{
	load_idt();
	/* Software-enable this CPU's APIC so fixed IPIs reach it; its LVT entries stay masked. */
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
}

/* Called from the stubs in start.S with interrupts off. */
void irq_dispatch(unsigned vector)
{
	vector &= 0xff;
	irq_counts[vector]++;
	if (irq_handlers[vector])
		irq_handlers[vector](vector);
	eoi();
}

void irq_print_counts(void)
{
	for (unsigned v = VEC_TIMER; v < 256; v++)
		if (irq_names[v] || irq_counts[v])
			printf("irq: vector=0x%x name=%s count=%lu\n", v, irq_names[v] ? irq_names[v] : "?",
			       irq_counts[v]);
}

int lapic_send_ipi(unsigned apic_id, uint32_t icr_low)
{
	lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
	lapic_write(LAPIC_ICR_LOW, icr_low);
	for (int i = 0; i < 100000; i++) {
		if (!(lapic_read(LAPIC_ICR_LOW) & ICR_PENDING))
			return 0;
		cpu_relax();
	}
	return -1;
}

static uint32_t ioapic_read(unsigned reg)
{
	mmio_write32(mp.ioapic_addr + IOAPIC_REGSEL, reg);
	return mmio_read32(mp.ioapic_addr + IOAPIC_WIN);
}

static void ioapic_write(unsigned reg, uint32_t value)
{
	mmio_write32(mp.ioapic_addr + IOAPIC_REGSEL, reg);
	mmio_write32(mp.ioapic_addr + IOAPIC_WIN, value);
}

void ioapic_route(unsigned pin, unsigned vector, unsigned dest_apic_id, int level_triggered)
{
	/* Fixed delivery, physical destination, active high. The high half goes first so the
	 * entry is complete when the low write unmasks it. */
	ioapic_write(0x11 + 2 * pin, dest_apic_id << 24);
	ioapic_write(0x10 + 2 * pin, vector | (level_triggered ? 1u << 15 : 0));
}

void ioapic_mask(unsigned pin)
{
	ioapic_write(0x10 + 2 * pin, ioapic_read(0x10 + 2 * pin) | LVT_MASKED);
}

void timer_start_idle_tick(void)
{
	lapic_write(LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
	lapic_write(LAPIC_TIMER_INIT, (uint32_t)(LAPIC_TIMER_HZ / 16 * IDLE_TICK_MS / 1000));
	idle_tick_on = 1;
}

int wait_us(uint64_t us, int (*done)(void))
{
	/* One-shot, masked, divide by 1: the current-count register reaches 0 after the chunk.
	 * The TSC bounds the wait in case the timer never runs: 5000 TSC ticks per microsecond
	 * is at least the wanted time for any TSC up to 5 GHz. */
	int finished = 0;
	while (us && !finished) {
		uint64_t chunk = us > 4000000 ? 4000000 : us; /* the count register is 32 bits */
		us -= chunk;
		lapic_write(LAPIC_TIMER_DIV, 0xb);
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_TIMER);
		lapic_write(LAPIC_TIMER_INIT, (uint32_t)(chunk * (LAPIC_TIMER_HZ / 1000000)));
		uint64_t start = rdtsc(), limit = chunk * 5000;
		for (;;) {
			if (done && done()) {
				finished = 1;
				break;
			}
			if (!lapic_read(LAPIC_TIMER_CUR) || rdtsc() - start >= limit)
				break;
			cpu_relax();
		}
	}
	/* The wait borrowed the timer: give the idle loop its tick back. */
	if (idle_tick_on)
		timer_start_idle_tick();
	return finished;
}

void delay_us(uint64_t us)
{
	wait_us(us, 0);
}

/* kvmclock (KVM's paravirtual clock, what Linux guests use): KVM publishes the exact TSC to
 * nanoseconds scale in this structure once MSR_KVM_SYSTEM_TIME_NEW names it. */
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01
#define KVM_CPUID_SIGNATURE 0x40000000
#define KVM_CPUID_FEATURES 0x40000001
#define KVM_FEATURE_CLOCKSOURCE2 3

struct pvclock_time_info {
	volatile uint32_t version;
	uint32_t pad0;
	volatile uint64_t tsc_timestamp;
	volatile uint64_t system_time;
	volatile uint32_t tsc_to_system_mul;
	volatile int8_t tsc_shift;
	volatile uint8_t flags;
	uint8_t pad[2];
} __attribute__((packed));

static struct pvclock_time_info pvclock __attribute__((aligned(64)));
static int pvclock_state; /* 0 unknown, 1 on, -1 not offered */

static int pvclock_on(void)
{
	if (!pvclock_state) {
		uint32_t a, b, c, d;
		cpuid(KVM_CPUID_SIGNATURE, &a, &b, &c, &d);
		int kvm = b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d; /* "KVMKVMKVM\0\0\0" */
		pvclock_state = -1;
		if (kvm && a >= KVM_CPUID_FEATURES) {
			cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
			if (a & (1u << KVM_FEATURE_CLOCKSOURCE2)) {
				wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (uint64_t)&pvclock | 1);
				pvclock_state = 1;
			}
		}
	}
	return pvclock_state > 0 && pvclock.tsc_to_system_mul;
}

uint64_t tsc_to_us(uint64_t delta)
{
	if (pvclock_on()) {
		uint32_t v, mul;
		int8_t shift;
		do {
			v = pvclock.version;
			__asm__ volatile("" : : : "memory");
			mul = pvclock.tsc_to_system_mul;
			shift = pvclock.tsc_shift;
			__asm__ volatile("" : : : "memory");
		} while ((v & 1) || v != pvclock.version);
		uint64_t d = shift >= 0 ? delta << shift : delta >> -shift;
		return (uint64_t)(((unsigned __int128)d * mul) >> 32) / 1000;
	}
	return delta / tsc_per_us();
}

uint64_t tsc_per_us(void)
{
	/* A delay can only come out too long (an exit or a host that runs another thread for a
	 * while in the middle of it), never too short: the least of a few is the best estimate. */
	static uint64_t rate;
	if (!rate) {
		uint64_t best = ~0ull;
		for (int i = 0; i < 5; i++) {
			uint64_t t0 = rdtsc();
			delay_us(10000);
			uint64_t dt = rdtsc() - t0;
			if (dt < best)
				best = dt;
		}
		rate = best / 10000;
		if (!rate)
			rate = 1;
	}
	return rate;
}

static const char *const exception_names[32] = {
	"#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
	"#BR bound range", "#UD invalid opcode", "#NM device not available", "#DF double fault",
	"coprocessor segment overrun", "#TS invalid TSS", "#NP segment not present",
	"#SS stack fault", "#GP general protection", "#PF page fault", "reserved",
	"#MF x87 error", "#AC alignment check", "#MC machine check", "#XM SIMD error",
	"#VE virtualization", "#CP control protection",
};

/* Called from start.S for vectors 0..31. There is no recovery: report, then park this CPU. */
void exception_handler(struct trap_frame *f)
{
	unsigned v = (unsigned)f->vector & 31;
	int locked = console_trylock();
	printf_locked("exception %u (%s) err=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx rsp=0x%lx "
		      "cr2=0x%lx apic=%u\n",
		      v, exception_names[v] ? exception_names[v] : "reserved", f->error, f->rip, f->cs,
		      f->rflags, f->rsp, read_cr2(), lapic_base ? lapic_id() : 0);
	if (locked)
		console_unlock();
	halt_forever();
}
