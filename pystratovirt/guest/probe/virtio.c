/* virtio.c: owns the probe's common virtio-mmio layer (virtio 1.x §4.2, §3.1, §2.7): finding the
 * slots on the command line (Linux's virtio_mmio.device=<size>@<base>:<irq>), probing them,
 * the initialization sequence and feature negotiation, split virtqueues in a static ring area,
 * generation-consistent config reads, the per-device interrupt counters, and the `virtio`
 * command.
 *
 * Everything runs on the BSP from the command loop, one request at a time: no locking. Waits
 * poll the used ring (memory, no exits) with interrupts enabled, so the interrupt handler counts
 * what the device signals meanwhile; the counters are for the tests, the polling is what makes
 * progress. */
#include "probe.h"
#include "lib.h"
#include "x86.h"
#include "virtio.h"

#define IOAPIC_PINS 24
#define IDENTITY_MAPPED (1ull << 32)
#define RESET_POLLS 1000
#define CFG_RETRIES 100
#define SETTLE_US 2000

/* Slot problems the listing prints with the value read. */
static const char PROBLEM_MAGIC[] = "bad magic";
static const char PROBLEM_VERSION[] = "bad version";

/* The rings: one 1 KiB slot per queue, from a page-aligned area of .bss (so below 4 GiB and
 * inside the probe's own image). With VIRTQ_SIZE 16 a slot holds the descriptor table (256 B,
 * 16-aligned) at 0, the driver area (38 B, 2-aligned) at 256 and the device area (134 B,
 * 4-aligned) at 512. 16 queues cover 6 blk + 2 net + a balloon + an rng + a console. */
#define RING_SLOT 1024
#define RING_SLOTS 24
#define RING_AVAIL_OFF 256
#define RING_USED_OFF 512
_Static_assert(sizeof(struct virtq_desc) * VIRTQ_SIZE <= RING_AVAIL_OFF, "descriptor table");
_Static_assert(RING_AVAIL_OFF + sizeof(struct virtq_avail) <= RING_USED_OFF, "driver area");
_Static_assert(RING_USED_OFF + sizeof(struct virtq_used) <= RING_SLOT, "device area");

static uint8_t ring_area[RING_SLOTS * RING_SLOT] __attribute__((aligned(4096)));
static unsigned ring_slots_used;

struct virtio_dev virtio_devs[VIRTIO_MAX_DEVICES];
unsigned virtio_count;

static const struct virtio_driver *const drivers[] = {
	&virtio_blk_driver,
	&virtio_net_driver,
	&virtio_balloon_driver,
	&virtio_rng_driver,
	&virtio_console_driver,
};

/* The handler's names for the irqs command, one per distinct irq line. */
static char vector_names[VIRTIO_MAX_DEVICES][12];

/* A full barrier: a locked read-modify-write of the stack orders the avail index store before
 * the used-flags load (x86 may otherwise let the load pass the store); mfence is avoided
 * because the ring-0 emulator is not known to have it. */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc"); }
/* On x86 stores are not reordered with stores nor loads with loads: the compiler is all that
 * needs holding back. */
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

/* -- registers ----------------------------------------------------------------------------- */

uint32_t virtio_read(struct virtio_dev *d, unsigned reg) { return mmio_read32(d->base + reg); }
void virtio_write(struct virtio_dev *d, unsigned reg, uint32_t v) { mmio_write32(d->base + reg, v); }
uint8_t virtio_status(struct virtio_dev *d) { return (uint8_t)virtio_read(d, VIRTIO_MMIO_STATUS); }

int virtio_has(const struct virtio_dev *d, unsigned bit) { return (d->driver_features >> bit) & 1; }

uint32_t virtio_generation(struct virtio_dev *d)
{
	return virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
}

/* Each read repeats until ConfigGeneration is the same before and after it (§4.2.2.2): a
 * 64-bit field read as two halves is then one value, never half old, half new.
 *
 * cfg_read: a field of `width` bytes (1, 2 or 4), read with an access of that width. */
static uint32_t cfg_read(struct virtio_dev *d, unsigned off, unsigned width)
{
	uint64_t addr = d->base + VIRTIO_MMIO_CONFIG + off;
	uint32_t v = 0;
	for (int i = 0; i < CFG_RETRIES; i++) {
		uint32_t g = virtio_generation(d);
		v = width == 1 ? mmio_read8(addr) : width == 2 ? mmio_read16(addr) : mmio_read32(addr);
		if (virtio_generation(d) == g)
			break;
	}
	return v;
}

uint8_t virtio_cfg8(struct virtio_dev *d, unsigned off) { return (uint8_t)cfg_read(d, off, 1); }
uint16_t virtio_cfg16(struct virtio_dev *d, unsigned off) { return (uint16_t)cfg_read(d, off, 2); }
uint32_t virtio_cfg32(struct virtio_dev *d, unsigned off) { return cfg_read(d, off, 4); }

uint64_t virtio_cfg64(struct virtio_dev *d, unsigned off)
{
	uint64_t v = 0;
	for (int i = 0; i < CFG_RETRIES; i++) {
		uint32_t g = virtio_generation(d);
		uint64_t lo = mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off);
		uint64_t hi = mmio_read32(d->base + VIRTIO_MMIO_CONFIG + off + 4);
		v = lo | hi << 32;
		if (virtio_generation(d) == g)
			break;
	}
	return v;
}

void virtio_cfg_bytes(struct virtio_dev *d, unsigned off, uint8_t *out, unsigned len)
{
	for (int i = 0; i < CFG_RETRIES; i++) {
		uint32_t g = virtio_generation(d);
		for (unsigned k = 0; k < len; k++)
			out[k] = mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off + k);
		if (virtio_generation(d) == g)
			break;
	}
}

void virtio_cfg_write32(struct virtio_dev *d, unsigned off, uint32_t v)
{
	mmio_write32(d->base + VIRTIO_MMIO_CONFIG + off, v);
}

/* -- interrupts ---------------------------------------------------------------------------- */

/* Reading InterruptStatus and writing the same bits to InterruptACK lets the device drop its
 * line, so its next event makes a fresh edge on our edge-triggered IOAPIC input. */
static void virtio_take_isr(struct virtio_dev *d)
{
	uint32_t isr = virtio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr)
		virtio_write(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	if (isr & VIRTIO_INT_USED)
		d->irq_used++;
	if (isr & VIRTIO_INT_CONFIG)
		d->irq_config++;
	if (!(isr & (VIRTIO_INT_USED | VIRTIO_INT_CONFIG)))
		d->irq_none++;
}

/* Devices sharing an irq line share the vector: each is asked. */
static void virtio_irq(unsigned vector)
{
	for (unsigned i = 0; i < virtio_count; i++) {
		struct virtio_dev *d = &virtio_devs[i];
		if (d->vector == (int)vector && !d->problem)
			virtio_take_isr(d);
	}
}

static void virtio_route_irq(struct virtio_dev *d)
{
	d->vector = -1;
	d->pin = d->irq < 16 ? mp_isa_irq_pin(d->irq) : d->irq;
	if (d->pin >= IOAPIC_PINS)
		return;
	for (unsigned i = 0; i < virtio_count; i++) {
		struct virtio_dev *o = &virtio_devs[i];
		if (o != d && o->vector >= 0 && o->pin == d->pin) {
			d->vector = o->vector;
			return;
		}
	}
	char *name = vector_names[d->slot];
	snprintf(name, sizeof(vector_names[0]), "virtio%u", d->irq);
	int v = irq_alloc_vector(name, virtio_irq);
	if (v < 0)
		return; /* out of vectors: this device is polled only */
	d->vector = v;
	/* Edge-triggered, active high: the ISA convention the MP table states for these lines. */
	ioapic_route(d->pin, (unsigned)v, lapic_id(), 0);
}

/* Let interrupts that are already pending in. A request the VMM completed within its notify
 * exit raised its line while we had interrupts off; this way its handler runs, and the counters
 * move, before the command reports rather than at the next idle hlt. A bare "sti; nop; cli" is
 * not enough where KVM emulates guest ring 0 (no interrupt-window exit there): a LAPIC read is
 * an exit to the kernel, and the pending interrupt is injected on the way back in. */
static void virtio_irq_window(void)
{
	sti();
	(void)lapic_read(0x20); /* the APIC id register: harmless to read */
	cli();
}

static struct virtio_dev *settle_dev;
static uint64_t settle_count;

static int settled(void) { return settle_dev->irq_used != settle_count; }

/* After a request completed: make sure its interrupt has been taken (and counted) before the
 * command reports, so N requests in a row show as N used interrupts. A device still showing
 * the used bit in InterruptStatus has an interrupt on its way: wait for it, briefly. */
static void virtio_settle_irq(struct virtio_dev *d)
{
	if (d->vector < 0)
		return;
	virtio_irq_window();
	if (!(virtio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_INT_USED))
		return;
	settle_dev = d;
	settle_count = d->irq_used;
	sti();
	wait_us(SETTLE_US, settled);
	cli();
}

void virtio_config_seen(struct virtio_dev *d)
{
	d->config_seen = d->irq_config;
	d->generation_seen = virtio_generation(d);
}

static struct virtio_dev *cfg_wait_dev;

static int cfg_changed(void) { return cfg_wait_dev->irq_config != cfg_wait_dev->config_seen; }

int virtio_wait_config(struct virtio_dev *d, uint64_t timeout_us)
{
	/* The counter is memory and checked continuously; the generation is a register (an exit
	 * to the VMM) and looked at every 10 ms, as is InterruptStatus of a polled device. */
	cfg_wait_dev = d;
	for (;;) {
		if (d->vector < 0)
			virtio_take_isr(d);
		if (cfg_changed() || virtio_generation(d) != d->generation_seen)
			return 1;
		if (!timeout_us)
			return 0;
		uint64_t chunk = timeout_us < 10000 ? timeout_us : 10000;
		timeout_us -= chunk;
		sti();
		wait_us(chunk, cfg_changed);
		cli();
	}
}

/* -- virtqueues ---------------------------------------------------------------------------- */

const char *virtq_setup(struct virtio_dev *d, unsigned index)
{
	if (index >= VIRTIO_MAX_QUEUES)
		return errorf("queue %u: the probe handles %u queues per device", index, VIRTIO_MAX_QUEUES);
	struct virtq *q = &d->vq[index];
	virtio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read(d, VIRTIO_MMIO_QUEUE_READY))
		return errorf("queue %u is ready before setup", index);
	uint32_t max = virtio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (!max)
		return errorf("queue %u is not available (QueueNumMax 0)", index);
	unsigned size = VIRTQ_SIZE;
	while (size > max)
		size >>= 1; /* split queue sizes are powers of 2 */

	/* The ring slot stays with the queue across re-initializations. */
	if (q->mem_slot < 0) {
		if (ring_slots_used >= RING_SLOTS)
			return "out of ring memory";
		q->mem_slot = (int)ring_slots_used++;
	}
	uint8_t *mem = ring_area + (unsigned)q->mem_slot * RING_SLOT;
	memset(mem, 0, RING_SLOT);
	q->index = index;
	q->desc = (volatile struct virtq_desc *)mem;
	q->avail = (volatile struct virtq_avail *)(mem + RING_AVAIL_OFF);
	q->used = (volatile struct virtq_used *)(mem + RING_USED_OFF);
	for (unsigned i = 0; i < size; i++) {
		q->desc[i].next = (uint16_t)(i + 1);
		q->cookie[i] = 0;
	}
	q->free_head = 0;
	q->num_free = (uint16_t)size;
	q->avail_idx = 0;
	q->last_used = 0;

	uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)q->avail, used = (uint64_t)q->used;
	virtio_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	q->size = size;
	if (index >= d->nvq)
		d->nvq = index + 1;
	return 0;
}

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n, void *cookie)
{
	if (!q->size || !n || n > q->num_free)
		return -1;
	/* A chain reuses the free list's links: each descriptor's next already names the
	 * following free one, so only the flags need setting. */
	uint16_t head = q->free_head, i = head;
	for (unsigned k = 0; k < n; k++) {
		volatile struct virtq_desc *dsc = &q->desc[i];
		dsc->addr = bufs[k].addr;
		dsc->len = bufs[k].len;
		dsc->flags = (uint16_t)((bufs[k].device_writes ? VIRTQ_DESC_F_WRITE : 0) |
					(k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		i = dsc->next;
	}
	q->free_head = i;
	q->num_free = (uint16_t)(q->num_free - n);
	q->cookie[head] = cookie;
	q->avail->ring[q->avail_idx % q->size] = head;
	barrier(); /* the ring entry (and descriptors) before the index that publishes them */
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
	return head;
}

void virtq_kick(struct virtio_dev *d, struct virtq *q)
{
	mb(); /* the device must see the new index if it reads flags after we do */
	if (!(q->used->flags & VIRTQ_USED_F_NO_NOTIFY))
		virtio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_has_used(struct virtq *q)
{
	return q->size && q->used->idx != q->last_used;
}

int virtq_get(struct virtq *q, uint32_t *len, void **cookie)
{
	if (!virtq_has_used(q))
		return -1;
	barrier(); /* the index before the entry it covers */
	volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
	uint32_t id = e->id, l = e->len;
	q->last_used++;
	if (id >= q->size)
		return -1; /* a device bug: nothing of ours to take back */
	/* Return the chain to the free list. */
	uint16_t last = (uint16_t)id;
	unsigned n = 1;
	while ((q->desc[last].flags & VIRTQ_DESC_F_NEXT) && n < q->size) {
		last = q->desc[last].next;
		n++;
	}
	q->desc[last].next = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n);
	if (len)
		*len = l;
	if (cookie)
		*cookie = q->cookie[id];
	q->cookie[id] = 0;
	return (int)id;
}

static struct virtq *waiting_q;

static int waiting_q_used(void) { return virtq_has_used(waiting_q); }

int virtq_wait(struct virtq *q, uint64_t timeout_us)
{
	if (virtq_has_used(q))
		return 1;
	waiting_q = q;
	sti();
	int done = wait_us(timeout_us, waiting_q_used);
	cli();
	return done || virtq_has_used(q);
}

const char *virtq_run(struct virtio_dev *d, struct virtq *q, const struct virtq_buf *bufs,
		      unsigned n, uint64_t timeout_us, uint32_t *used_len)
{
	int head = virtq_add(q, bufs, n, 0);
	if (head < 0)
		return "queue full (an earlier request never completed)";
	virtq_kick(d, q);
	for (;;) {
		if (!virtq_wait(q, timeout_us)) {
			const char *err = virtio_check(d);
			return err ? err : "timeout waiting for the device";
		}
		uint32_t len;
		int got = virtq_get(q, &len, 0);
		if (got == head) {
			if (used_len)
				*used_len = len;
			virtio_settle_irq(d);
			return 0;
		}
		/* A chain of an earlier request that timed out: taken back, keep waiting. */
	}
}

/* -- devices ------------------------------------------------------------------------------- */

static const char *device_name(uint32_t id)
{
	switch (id) {
	case 0: return "none";
	case 1: return "net";
	case 2: return "blk";
	case 3: return "console";
	case 4: return "rng";
	case 5: return "balloon";
	case 8: return "scsi";
	case 9: return "9p";
	case 16: return "gpu";
	case 18: return "input";
	case 19: return "vsock";
	case 26: return "fs";
	default: return "unknown";
	}
}

const char *virtio_check(struct virtio_dev *d)
{
	uint8_t s = virtio_status(d);
	if (s & VIRTIO_STATUS_NEEDS_RESET)
		return errorf("device needs reset (status 0x%02x)", s);
	if (!(s & VIRTIO_STATUS_DRIVER_OK) || (s & VIRTIO_STATUS_FAILED))
		return errorf("device not running (status 0x%02x)", s);
	return 0;
}

struct virtio_dev *virtio_find(uint32_t device_id, unsigned n, const char **err)
{
	/* Every slot that shows this device id counts, usable or not, so "blk 2" stays the third
	 * block slot even when an earlier one failed. */
	unsigned k = 0;
	for (unsigned i = 0; i < virtio_count; i++) {
		struct virtio_dev *d = &virtio_devs[i];
		if (d->device_id != device_id)
			continue;
		if (k++ != n)
			continue;
		if (!d->started) {
			const char *why = d->problem == PROBLEM_VERSION ? "bad version"
					  : d->problem ? d->problem
					  : d->failure ? d->failure : "no driver";
			*err = errorf("%s %u (virtio %u) is not running: %s", device_name(device_id), n,
				      d->slot, why);
			return 0;
		}
		return d;
	}
	*err = errorf("no %s %u", device_name(device_id), n);
	return 0;
}

struct virtio_dev *virtio_find_running(uint32_t device_id, unsigned n, const char **err)
{
	struct virtio_dev *d = virtio_find(device_id, n, err);
	if (d && (*err = virtio_check(d)) != 0)
		return 0;
	return d;
}

/* The initialization sequence of §3.1.1. Returns NULL or why it failed (FAILED is then set). */
static const char *virtio_start(struct virtio_dev *d)
{
	const struct virtio_driver *drv = d->driver;
	d->started = 0;
	d->failure = 0;
	d->nvq = 0;
	for (unsigned i = 0; i < VIRTIO_MAX_QUEUES; i++)
		d->vq[i].size = 0;

	/* Reset, and wait for it to finish: the status reads 0 once it has. */
	virtio_write(d, VIRTIO_MMIO_STATUS, 0);
	int polls = 0;
	while (virtio_status(d) && ++polls < RESET_POLLS)
		cpu_relax();
	if (polls >= RESET_POLLS)
		return d->failure = "reset did not complete";
	uint32_t status = VIRTIO_STATUS_ACKNOWLEDGE;
	virtio_write(d, VIRTIO_MMIO_STATUS, status);
	status |= VIRTIO_STATUS_DRIVER;
	virtio_write(d, VIRTIO_MMIO_STATUS, status);

	virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t lo = virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	uint64_t hi = virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->device_features = lo | hi << 32;
	d->driver_features = 0;
	const char *err = 0;
	if (!(d->device_features & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		err = "the device does not offer VIRTIO_F_VERSION_1";
		goto fail;
	}
	d->driver_features = d->device_features & (drv->features | VIRTIO_BIT(VIRTIO_F_VERSION_1));
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->driver_features);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->driver_features >> 32));
	status |= VIRTIO_STATUS_FEATURES_OK;
	virtio_write(d, VIRTIO_MMIO_STATUS, status);
	if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		err = "the device did not accept FEATURES_OK";
		goto fail;
	}
	err = drv->setup(d);
	if (err)
		goto fail;
	virtio_config_seen(d);
	status |= VIRTIO_STATUS_DRIVER_OK;
	virtio_write(d, VIRTIO_MMIO_STATUS, status);
	d->started = 1;
	if (drv->started)
		drv->started(d);
	return 0;

fail:
	virtio_write(d, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_FAILED);
	/* setup() messages come from errorf's one buffer: keep a copy of the last. */
	static char failures[VIRTIO_MAX_DEVICES][80];
	snprintf(failures[d->slot], sizeof(failures[0]), "%s", err);
	return d->failure = failures[d->slot];
}

static void virtio_print_slot(struct virtio_dev *d, int verbose)
{
	printf("virtio: %u base=0x%lx irq=%u id=%u (%s)", d->slot, d->base, d->irq, d->device_id,
	       device_name(d->device_id));
	if (d->problem) {
		if (d->problem == PROBLEM_MAGIC)
			printf(" bad magic 0x%08x\n", d->magic);
		else if (d->problem == PROBLEM_VERSION)
			printf(" bad version %u%s\n", d->version, d->version == 1 ? " (legacy)" : "");
		else
			printf(" %s\n", d->problem);
		return;
	}
	if (verbose && d->device_id) {
		printf(" status=0x%02x features=0x%lx vector=", virtio_status(d), d->driver_features);
		if (d->vector >= 0)
			printf("0x%x", d->vector);
		else
			printf("none");
		printf(" used=%lu config=%lu", d->irq_used, d->irq_config);
	}
	if (!d->device_id)
		printf("\n");
	else if (!d->driver)
		printf(" no driver\n");
	else if (d->failure)
		printf(" failed: %s\n", d->failure);
	else
		printf("\n");
}

/* -- the command line ---------------------------------------------------------------------- */

/* An unsigned number in C notation (0x hex, 0 octal, else decimal), as simple_strtoull(s, 0)
 * reads it; returns the character after it, or NULL when there are no digits. */
static const char *parse_c_number(const char *s, uint64_t *out)
{
	unsigned base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	} else if (s[0] == '0') {
		base = 8;
	}
	uint64_t v = 0;
	const char *start = s;
	for (;; s++) {
		unsigned dgt;
		if (*s >= '0' && *s <= '9')
			dgt = (unsigned)(*s - '0');
		else if (*s >= 'a' && *s <= 'f')
			dgt = (unsigned)(*s - 'a' + 10);
		else if (*s >= 'A' && *s <= 'F')
			dgt = (unsigned)(*s - 'A' + 10);
		else
			break;
		if (dgt >= base)
			break;
		v = v * base + dgt;
	}
	if (s == start)
		return 0;
	*out = v;
	return s;
}

/* Linux's memparse(): a number with an optional K/M/G/T/P/E suffix. */
static const char *parse_size(const char *s, uint64_t *out)
{
	s = parse_c_number(s, out);
	if (!s)
		return 0;
	unsigned shift = 0;
	switch (*s) {
	case 'E': case 'e': shift += 10; /* fall through */
	case 'P': case 'p': shift += 10; /* fall through */
	case 'T': case 't': shift += 10; /* fall through */
	case 'G': case 'g': shift += 10; /* fall through */
	case 'M': case 'm': shift += 10; /* fall through */
	case 'K': case 'k': shift += 10; s++; break;
	default: break;
	}
	*out <<= shift;
	return s;
}

/* <size>@<base>:<irq>[:<id>] as Linux's virtio_mmio.c reads it. */
static int parse_device(const char *s, uint64_t *size, uint64_t *base, uint64_t *irq)
{
	s = parse_size(s, size);
	if (!s || *s++ != '@')
		return -1;
	s = parse_c_number(s, base);
	if (!s || *s++ != ':')
		return -1;
	const char *irq_start = s;
	uint64_t v = 0;
	for (; *s >= '0' && *s <= '9'; s++)
		v = v * 10 + (uint64_t)(*s - '0');
	if (s == irq_start || v > 0xffffffffu)
		return -1;
	*irq = v;
	if (*s == ':') { /* the platform device id: ours are numbered by position */
		uint64_t id;
		s = parse_c_number(s + 1, &id);
		if (!s)
			return -1;
	}
	return *s ? -1 : 0;
}

static void virtio_probe(struct virtio_dev *d)
{
	if (d->size < VIRTIO_MMIO_CONFIG) {
		d->problem = "window smaller than the register block";
		return;
	}
	if (d->base >= IDENTITY_MAPPED || d->size > IDENTITY_MAPPED - d->base) {
		d->problem = "not below 4 GiB (not mapped)";
		return;
	}
	d->magic = virtio_read(d, VIRTIO_MMIO_MAGIC);
	if (d->magic != VIRTIO_MMIO_MAGIC_VALUE) {
		d->problem = PROBLEM_MAGIC;
		return;
	}
	d->version = virtio_read(d, VIRTIO_MMIO_VERSION);
	if (d->version != VIRTIO_MMIO_VERSION_MODERN) {
		d->device_id = virtio_read(d, VIRTIO_MMIO_DEVICE_ID);
		d->problem = PROBLEM_VERSION;
		return;
	}
	d->device_id = virtio_read(d, VIRTIO_MMIO_DEVICE_ID);
	d->vendor_id = virtio_read(d, VIRTIO_MMIO_VENDOR_ID);
	if (!d->device_id)
		return; /* an empty slot (§4.2.3.1.1: the driver must ignore it) */
	for (unsigned i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
		if (drivers[i]->device_id == d->device_id)
			d->driver = drivers[i];
	if (!d->driver)
		return;
	/* A clean device before its interrupt is routed, so no stale edge arrives. */
	virtio_write(d, VIRTIO_MMIO_STATUS, 0);
	virtio_route_irq(d);
	virtio_start(d);
}

void virtio_init(void)
{
	const char *cur = boot.cmdline;
	struct cmdline_arg a;
	static const char key[] = "virtio_mmio.device";
	char val[64];

	while (cmdline_next(&cur, &a)) {
		if (a.key_len != (int)sizeof(key) - 1 || memcmp(a.key, key, sizeof(key) - 1))
			continue;
		uint64_t size = 0, base = 0, irq = 0;
		int len = a.val ? a.val_len : 0;
		if (len <= 0 || len >= (int)sizeof(val)) {
			printf("virtio: bad entry %.*s\n", a.key_len + 1 + (len > 0 ? len : 0), a.key);
			continue;
		}
		memcpy(val, a.val, (size_t)len);
		val[len] = '\0';
		if (parse_device(val, &size, &base, &irq)) {
			printf("virtio: bad entry %s\n", val);
			continue;
		}
		if (virtio_count >= VIRTIO_MAX_DEVICES) {
			printf("virtio: too many entries, %s ignored\n", val);
			continue;
		}
		struct virtio_dev *d = &virtio_devs[virtio_count];
		memset(d, 0, sizeof(*d));
		d->slot = virtio_count++;
		d->base = base;
		d->size = size;
		d->irq = (unsigned)irq;
		d->vector = -1;
		for (unsigned i = 0; i < VIRTIO_MAX_QUEUES; i++)
			d->vq[i].mem_slot = -1;
		virtio_probe(d);
		virtio_print_slot(d, 0);
	}
}

/* -- helpers for the drivers --------------------------------------------------------------- */

int virtio_parse_num(const char *s, uint64_t *out)
{
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		return parse_hex(s, out);
	return parse_dec(s, out);
}

int virtio_parse_mac(const char *s, uint8_t mac[6])
{
	for (int i = 0; i < 6; i++) {
		char part[3] = {s[0], s[0] ? s[1] : 0, 0};
		uint64_t v;
		if (!part[0] || !part[1] || parse_hex(part, &v))
			return -1;
		mac[i] = (uint8_t)v;
		s += 2;
		if (i < 5 && *s++ != ':')
			return -1;
	}
	return *s ? -1 : 0;
}

const char *virtio_common_feature_name(unsigned bit)
{
	switch (bit) {
	case VIRTIO_F_INDIRECT_DESC: return "INDIRECT_DESC";
	case VIRTIO_F_EVENT_IDX: return "EVENT_IDX";
	case VIRTIO_F_VERSION_1: return "VERSION_1";
	case VIRTIO_F_ACCESS_PLATFORM: return "ACCESS_PLATFORM";
	case VIRTIO_F_RING_PACKED: return "RING_PACKED";
	case VIRTIO_F_IN_ORDER: return "IN_ORDER";
	case 36: return "ORDER_PLATFORM";
	case 37: return "SR_IOV";
	case VIRTIO_F_NOTIFICATION_DATA: return "NOTIFICATION_DATA";
	default: return 0;
	}
}

/* "<label>: 0x<hex> NAME NAME ..." with unnamed bits as bitN. */
void virtio_print_features(const char *label, uint64_t features,
			   const char *(*name_of)(unsigned bit))
{
	char line[400];
	int n = snprintf(line, sizeof(line), "%s: 0x%lx", label, features);
	for (unsigned bit = 0; bit < 64; bit++) {
		if (!((features >> bit) & 1) || n >= (int)sizeof(line))
			continue;
		const char *name = name_of ? name_of(bit) : 0;
		if (!name)
			name = virtio_common_feature_name(bit);
		if (name)
			n += snprintf(line + n, sizeof(line) - (size_t)n, " %s", name);
		else
			n += snprintf(line + n, sizeof(line) - (size_t)n, " bit%u", bit);
	}
	printf("%s\n", line);
}

/* -- the virtio command ---------------------------------------------------------------------- */

const char *cmd_virtio(int argc, char **argv, const char *args)
{
	(void)args;
	if (argc == 1) {
		virtio_irq_window();
		if (!virtio_count)
			printf("virtio: no devices\n");
		for (unsigned i = 0; i < virtio_count; i++)
			virtio_print_slot(&virtio_devs[i], 1);
		return 0;
	}
	uint64_t slot;
	if (argc != 3 || virtio_parse_num(argv[2], &slot) ||
	    (strcmp(argv[1], "init") && strcmp(argv[1], "reset")))
		return "usage: virtio [init <slot>|reset <slot>]";
	if (slot >= virtio_count)
		return errorf("no virtio slot %lu", slot);
	struct virtio_dev *d = &virtio_devs[slot];
	if (d->problem || !d->driver)
		return errorf("virtio %lu has no device with a driver", slot);
	if (!strcmp(argv[1], "reset")) {
		/* Leaves the device reset and the driver stopped, until "virtio init". */
		virtio_write(d, VIRTIO_MMIO_STATUS, 0);
		d->started = 0;
		d->failure = "reset by command";
		printf("status: 0x%02x\n", virtio_status(d));
		return 0;
	}
	const char *err = virtio_start(d);
	printf("status: 0x%02x\n", virtio_status(d));
	return err;
}
