/* smp.c: owns starting the application processors the MP table lists: copying the real-mode
 * trampoline to low memory, the INIT-SIPI-SIPI sequence, the bounded wait, and the APs' C entry
 * point; and the "ipi" command, which shows an AP is alive (it answers an IPI from its idle
 * loop), e.g. after the VM was restored from a snapshot. */
#include "probe.h"
#include "lib.h"
#include "serial.h"
#include "x86.h"

#define ICR_INIT 0x4500    /* delivery mode INIT, level assert */
#define ICR_STARTUP 0x4600 /* delivery mode start-up; the low byte is the vector */
#define ICR_FIXED_ASSERT 0x4000 /* delivery mode fixed, level assert; the low byte is the vector */
#define DEFAULT_TIMEOUT_MS 1000
#define PING_TIMEOUT_US 1000000

volatile unsigned cpus_online = 1; /* the BSP */
static volatile uint8_t ap_started[256];
static unsigned cpus_expected = 1;
static const char *short_reason;
/* Set under the console lock when the BSP stops waiting: an AP that arrives after that stays
 * quiet, so its line cannot land in the middle of command output. It still counts. */
static volatile int smp_closed;
/* IPIs each AP has taken (by APIC id), and the vector they arrive on. */
static volatile uint64_t ap_pings[256];
static int ping_vector = -1;
static unsigned ping_target;
static uint64_t ping_before;

static void ping_handler(unsigned vector)
{
	(void)vector;
	__atomic_fetch_add(&ap_pings[lapic_id() & 0xff], 1, __ATOMIC_RELEASE);
}

static int pinged(void)
{
	return __atomic_load_n(&ap_pings[ping_target], __ATOMIC_ACQUIRE) != ping_before;
}

const char *cmd_ipi(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t id;
	if (argc != 2 || parse_dec(argv[1], &id) || id > 255)
		return errorf("usage: ipi <apic-id>");
	if (!ap_started[id] || id == lapic_id())
		return errorf("cpu %lu is not an online application processor", id);
	if (ping_vector < 0)
		return "no interrupt vector left for IPIs";
	ping_target = (unsigned)id;
	ping_before = ap_pings[id];
	if (lapic_send_ipi((unsigned)id, ICR_FIXED_ASSERT | (unsigned)ping_vector))
		return errorf("the IPI to cpu %lu was not delivered", id);
	if (!wait_us(PING_TIMEOUT_US, pinged))
		return errorf("cpu %lu did not take the IPI within a second", id);
	printf("cpu %lu: ipis=%lu\n", id, ap_pings[id]);
	return 0;
}

/* Entered from ap_entry64 in start.S on the AP's own stack; ends in an idle loop that takes
 * interrupts (the "ipi" command's). */
void ap_main(unsigned slot)
{
	(void)slot;
	irq_init_ap();
	unsigned id = lapic_id();
	ap_started[id & 0xff] = 1;
	console_lock();
	if (!smp_closed)
		printf_locked("cpu %u online\n", id);
	/* Counted after the line is out, so "cpus online" always follows every "cpu N online". */
	__atomic_fetch_add(&cpus_online, 1, __ATOMIC_RELEASE);
	console_unlock();
	for (;;)
		__asm__ volatile("sti; hlt; cli" : : : "memory");
}

static int all_online(void)
{
	return cpus_online >= cpus_expected;
}

static void tramp_patch(const void *sym, uint32_t value)
{
	uint64_t off = (uint64_t)((const char *)sym - ap_trampoline_start);
	*(volatile uint32_t *)(uint64_t)(AP_TRAMPOLINE_ADDR + off) = value;
}

static void close_and_report(void)
{
	console_lock();
	smp_closed = 1;
	console_unlock();
	smp_print_online();
}

void smp_print_online(void)
{
	unsigned n = cpus_online;
	if (n >= cpus_expected)
		printf("cpus online: %u\n", n);
	else
		printf("cpus online: %u of %u (%s)\n", n, cpus_expected, short_reason);
}

void smp_boot(void)
{
	unsigned self = lapic_id();
	unsigned aps = 0;
	if (mp.status == MP_OK)
		for (unsigned i = 0; i < mp.cpu_count; i++)
			if ((mp.cpus[i].flags & 1) && mp.cpus[i].apic_id != self)
				aps++;
	if (aps > MAX_APS)
		aps = MAX_APS;
	cpus_expected = 1 + aps;
	if (!aps) {
		close_and_report();
		return;
	}
	if (cmdline_find("nosmp", 0)) {
		short_reason = "nosmp";
		close_and_report();
		return;
	}
	short_reason = "AP start timed out";
	ping_vector = irq_alloc_vector("ipi", ping_handler);

	/* The trampoline enters long mode on the BSP's page tables (the VMM's identity map) and
	 * with the BSP's EFER, minus LMA, which the AP's CPU sets itself. */
	memcpy((void *)(uint64_t)AP_TRAMPOLINE_ADDR, ap_trampoline_start,
	       (size_t)(ap_trampoline_end - ap_trampoline_start));
	uint64_t efer = rdmsr(MSR_EFER) & ~(uint64_t)EFER_LMA;
	tramp_patch(&ap_tramp_cr3, (uint32_t)read_cr3());
	tramp_patch(&ap_tramp_efer_lo, (uint32_t)efer);
	tramp_patch(&ap_tramp_efer_hi, (uint32_t)(efer >> 32));

	/* INIT every AP, wait the 10 ms the MP spec asks for, then up to two start-up IPIs, 200 us
	 * apart; the second only to APs that have not shown up (KVM ignores a SIPI to a running
	 * CPU anyway). */
	unsigned sent = 0;
	for (unsigned i = 0; i < mp.cpu_count && sent < aps; i++) {
		if (!(mp.cpus[i].flags & 1) || mp.cpus[i].apic_id == self)
			continue;
		if (lapic_send_ipi(mp.cpus[i].apic_id, ICR_INIT))
			printf("warning: INIT IPI to apic %u not delivered\n", mp.cpus[i].apic_id);
		sent++;
	}
	delay_us(10000);
	for (int round = 0; round < 2; round++) {
		sent = 0;
		for (unsigned i = 0; i < mp.cpu_count && sent < aps; i++) {
			uint8_t id = mp.cpus[i].apic_id;
			if (!(mp.cpus[i].flags & 1) || id == self)
				continue;
			sent++;
			if (!ap_started[id])
				lapic_send_ipi(id, ICR_STARTUP | AP_TRAMPOLINE_VECTOR);
		}
		delay_us(200);
	}

	uint64_t timeout_ms = cmdline_uint("smp_timeout_ms", DEFAULT_TIMEOUT_MS);
	wait_us(timeout_ms * 1000, all_online);
	close_and_report();
}
