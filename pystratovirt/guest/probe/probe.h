/* probe.h: owns the probe guest's shared declarations: its version, the fixed addresses it
 * relies on, the boot facts gathered at start, and the interfaces between its C files. */
#ifndef PROBE_H
#define PROBE_H

#define PROBE_VERSION "0.1.0"

/* Where the VMM loads and enters us (layout.VMLINUX_LOAD_ADDR). */
#define PROBE_LOAD_ADDR 0x1000000

/* The AP start-up code is copied here: 0x1000..0x4fff is RAM the VMM leaves alone, and a SIPI
 * vector can only name a page below 1 MiB (vector 0x03 starts the AP at 0x0300:0000). */
#define AP_TRAMPOLINE_ADDR 0x3000
#define AP_TRAMPOLINE_VECTOR (AP_TRAMPOLINE_ADDR >> 12)

/* APIC ids are 8 bits and 0xff is the broadcast id, so at most 255 CPUs. */
#define MAX_CPUS 255
#define MAX_APS (MAX_CPUS - 1)
#define BSP_STACK_SIZE 16384
/* Small AP stacks: an AP only prints one line and parks, and 254 of them must fit in the 1 MiB
 * the image may occupy. */
#define AP_STACK_SIZE 2048

/* Segment selectors of our GDT (the same values as the VMM's boot GDT, plus a 32-bit code
 * segment for the AP trampoline's protected-mode step). */
#define SEL_CODE32 0x08
#define SEL_CODE64 0x10
#define SEL_DATA 0x18

/* Interrupt vectors. 0x00..0x1f are exceptions; device vectors follow. */
#define VEC_TIMER 0x20
#define VEC_SERIAL 0x21
#define VEC_DEVICE_FIRST 0x22 /* free for drivers: see irq_alloc_vector() */
#define VEC_DEVICE_LAST 0x2f
#define VEC_SPURIOUS 0xff

#ifndef __ASSEMBLER__

#include <stdint.h>
#include <stddef.h>

/* -- boot facts (bootinfo.c) ------------------------------------------------------------------ */
#define E820_MAX 128 /* what fits in boot_params.e820_table */
#define E820_RAM 1

struct e820_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
} __attribute__((packed));

struct bootinfo {
	uint64_t boot_params;
	const char *cmdline; /* points into guest memory; "" when there is none */
	uint64_t cmdline_addr;
	unsigned e820_count;
	struct e820_entry e820[E820_MAX];
	uint64_t ram_total;
	unsigned ram_ranges;
	uint64_t initrd_addr;
	uint64_t initrd_size;
};
extern struct bootinfo boot;

struct cmdline_arg {
	const char *key;
	int key_len;
	const char *val; /* NULL when the token had no '=' */
	int val_len;
};

void bootinfo_init(uint64_t boot_params);
void bootinfo_print_cmdline(void);
void bootinfo_print_mem(void);
void bootinfo_print_initrd(void);
/* Iterate over the command line's tokens: returns 0 at the end. *cursor starts at the line. */
int cmdline_next(const char **cursor, struct cmdline_arg *arg);
/* Is `key` on the command line (with or without a value)? Fills *arg when found. */
int cmdline_find(const char *key, struct cmdline_arg *arg);
uint64_t cmdline_uint(const char *key, uint64_t fallback);

/* -- the MP table (mptable.c) ----------------------------------------------------------------- */
enum mp_status { MP_OK, MP_MISSING, MP_BAD };

struct mp_cpu {
	uint8_t apic_id;
	uint8_t flags; /* bit 0 enabled, bit 1 bootstrap processor */
};

struct mpinfo {
	enum mp_status status;
	const char *error; /* why the table is bad */
	uint32_t fps_addr;
	uint32_t table_addr;
	unsigned cpu_count; /* processor entries, enabled or not */
	unsigned cpus_enabled;
	struct mp_cpu cpus[MAX_CPUS];
	uint32_t lapic_addr;
	unsigned ioapic_count;
	uint8_t ioapic_id;
	uint32_t ioapic_addr; /* the first IOAPIC: the only one a micro-VM has */
	int8_t isa_irq_pin[16]; /* IOAPIC pin of each ISA IRQ from the I/O interrupt entries, -1 unknown */
};
extern struct mpinfo mp;

void mp_init(void);
void mp_print(void);
/* The IOAPIC input an ISA IRQ arrives on (identity when the table does not say). */
unsigned mp_isa_irq_pin(unsigned irq);

/* -- interrupts, LAPIC, IOAPIC, delays (irq.c) ------------------------------------------------ */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;
	uint64_t rip, cs, rflags, rsp, ss;
};

typedef void (*irq_handler_fn)(unsigned vector);

void irq_init_bsp(void);
void irq_init_ap(void);
uint32_t lapic_read(unsigned reg);
void lapic_write(unsigned reg, uint32_t value);
unsigned lapic_id(void);
int lapic_send_ipi(unsigned apic_id, uint32_t icr_low);
void ioapic_route(unsigned pin, unsigned vector, unsigned dest_apic_id, int level_triggered);
void ioapic_mask(unsigned pin);
/* Take a free device vector and install `fn` for it; -1 when none is left. */
int irq_alloc_vector(const char *name, irq_handler_fn fn);
void irq_set_handler(unsigned vector, const char *name, irq_handler_fn fn);
void irq_print_counts(void);
/* Start the periodic LAPIC timer that wakes the idle loop (a safety net for lost interrupts). */
void timer_start_idle_tick(void);
/* Busy-wait about `us` microseconds on the LAPIC timer, bounded by the TSC. */
void delay_us(uint64_t us);
/* The same, ending early once done() returns nonzero; returns whether it did. */
int wait_us(uint64_t us, int (*done)(void));
/* TSC ticks per microsecond, measured once against the LAPIC timer (for deadlines). */
uint64_t tsc_per_us(void);
/* A TSC interval in microseconds by the guest's clock: KVM's kvmclock scale when the host
 * offers it (exact), else tsc_per_us(). For measurements the tests compare with the host's. */
uint64_t tsc_to_us(uint64_t delta);

/* -- SMP (smp.c) --------------------------------------------------------------------------- */
extern volatile unsigned cpus_online;
void smp_boot(void);
void smp_print_online(void);
const char *cmd_ipi(int argc, char **argv, const char *args);

/* -- the command console (commands.c) -------------------------------------------------------- */
/* A command handler: returns NULL on success (the console prints "ok") or an error message
 * (printed as "error: <msg>"). `args` is the raw text after the command name. */
typedef const char *(*command_fn)(int argc, char **argv, const char *args);

struct command {
	const char *name;
	const char *usage;
	const char *help;
	command_fn fn;
};

void console_input_init(void);
void command_loop(void) __attribute__((noreturn));

/* -- hvc0: the virtio console as a second command console (virtio_console.c) ----------------- */
/* With console=hvc0 on the command line and a virtio console present, mirror all output to it
 * from now on and take command lines from it. */
void hvc_init(void);
/* A command line the host sent on hvc0, copied into buf (NUL-terminated): its length, -1 when
 * none is complete yet, -2 when one longer than the buffer was dropped. */
int hvc_poll_line(char *buf, unsigned cap);

/* -- start.S ------------------------------------------------------------------------------- */
extern const char ap_trampoline_start[], ap_trampoline_end[];
extern uint32_t ap_tramp_cr3, ap_tramp_efer_lo, ap_tramp_efer_hi;
extern void *const isr_stub_table[32];
extern void *const irq_stub_table[];
void load_probe_gdt(void);
void halt_forever(void) __attribute__((noreturn));

#endif /* __ASSEMBLER__ */
#endif
