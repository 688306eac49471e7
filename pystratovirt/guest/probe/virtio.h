/* virtio.h: owns the probe's virtio-mmio interface: the register map (virtio 1.x §4.2.2), the
 * status and feature bits, split virtqueues (§2.7), the per-slot device state shared by the
 * common layer (virtio.c) and the blk, net, balloon, rng and console drivers, and the drivers' command
 * handlers that commands.c puts in its table. */
#ifndef VIRTIO_H
#define VIRTIO_H

#include <stdint.h>

/* -- virtio-mmio registers (offsets from the slot's base) ---------------------------------- */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC_VALUE 0x74726976 /* "virt" */
#define VIRTIO_MMIO_VERSION_MODERN 2

/* Device status bits (§2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* InterruptStatus bits (§4.2.2). */
#define VIRTIO_INT_USED 0x1
#define VIRTIO_INT_CONFIG 0x2

/* Device-independent feature bits (§6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED 34
#define VIRTIO_F_IN_ORDER 35
#define VIRTIO_F_NOTIFICATION_DATA 38

#define VIRTIO_BIT(n) (1ull << (n))

/* Device ids (§5). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5

/* -- split virtqueues (§2.7) --------------------------------------------------------------- */
/* Small queues: every descriptor and ring entry costs the emulated guest time and the probe's
 * image must stay within 1 MiB. A device offering less gets the largest power of 2 it takes. */
#define VIRTQ_SIZE 16

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VIRTQ_SIZE];
	uint16_t used_event; /* only with VIRTIO_F_EVENT_IDX, which we never negotiate */
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[VIRTQ_SIZE];
	uint16_t avail_event;
};

/* One piece of a request: guest-physical buffer, length, and whether the device writes it. */
struct virtq_buf {
	uint64_t addr;
	uint32_t len;
	int device_writes;
};

struct virtq {
	unsigned index; /* the queue's number on its device */
	unsigned size;  /* 0: not set up */
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	uint16_t free_head; /* free descriptors are chained through their next fields */
	uint16_t num_free;
	uint16_t avail_idx; /* our copy of avail->idx */
	uint16_t last_used; /* the used ring entries before this one have been taken */
	void *cookie[VIRTQ_SIZE]; /* per chain head: what the driver submitted it for */
	int mem_slot;             /* which slot of the static ring area it lives in, -1 none yet */
};

/* -- devices ------------------------------------------------------------------------------- */
#define VIRTIO_MAX_DEVICES 16
#define VIRTIO_MAX_QUEUES 3

struct virtio_dev;

struct virtio_driver {
	uint32_t device_id;
	const char *name;
	uint64_t features; /* what the driver can use, VIRTIO_F_VERSION_1 aside */
	/* After FEATURES_OK: set up the queues, read the config. NULL or an error message. */
	const char *(*setup)(struct virtio_dev *d);
	/* After DRIVER_OK: the first notifications (e.g. posted receive buffers). */
	void (*started)(struct virtio_dev *d);
};

struct virtio_dev {
	unsigned slot; /* position among the command line's virtio_mmio.device entries */
	uint64_t base, size;
	unsigned irq;
	uint32_t magic, version, device_id, vendor_id;
	const char *problem; /* why the slot is unusable ("bad magic ..."), NULL when fine */
	const struct virtio_driver *driver;
	int started;          /* DRIVER_OK was set */
	const char *failure;  /* why starting the driver failed */
	uint64_t device_features, driver_features;
	int vector;  /* -1: polled only */
	unsigned pin; /* IOAPIC input */
	/* Counted by the interrupt handler from InterruptStatus. */
	volatile uint64_t irq_used, irq_config, irq_none;
	uint64_t config_seen; /* irq_config when a command last looked at the config */
	uint32_t generation_seen;
	struct virtq vq[VIRTIO_MAX_QUEUES];
	unsigned nvq;
	void *priv; /* the driver's state */
};

extern struct virtio_dev virtio_devs[VIRTIO_MAX_DEVICES];
extern unsigned virtio_count;

/* Parse the command line's virtio_mmio.device entries, probe each slot, start the drivers,
 * print one line per slot. */
void virtio_init(void);

uint32_t virtio_read(struct virtio_dev *d, unsigned reg);
void virtio_write(struct virtio_dev *d, unsigned reg, uint32_t v);
uint8_t virtio_status(struct virtio_dev *d);
/* NULL, or a message when the device set DEVICE_NEEDS_RESET or is not running. */
const char *virtio_check(struct virtio_dev *d);
/* The n-th started device with this id (0-based), or NULL; *err says why not. */
struct virtio_dev *virtio_find(uint32_t device_id, unsigned n, const char **err);
/* virtio_find, and the device must also be running (virtio_check): else NULL and *err says why. */
struct virtio_dev *virtio_find_running(uint32_t device_id, unsigned n, const char **err);
int virtio_has(const struct virtio_dev *d, unsigned bit);

/* Device-specific config space, read generation-consistently (§2.5.1, §4.2.2.2): 8-, 16- and
 * 32-bit fields with accesses of their own width, 64-bit fields as two 32-bit halves. */
uint32_t virtio_generation(struct virtio_dev *d);
uint8_t virtio_cfg8(struct virtio_dev *d, unsigned off);
uint16_t virtio_cfg16(struct virtio_dev *d, unsigned off);
uint32_t virtio_cfg32(struct virtio_dev *d, unsigned off);
uint64_t virtio_cfg64(struct virtio_dev *d, unsigned off);
void virtio_cfg_bytes(struct virtio_dev *d, unsigned off, uint8_t *out, unsigned len);
void virtio_cfg_write32(struct virtio_dev *d, unsigned off, uint32_t v);

/* Queue `index` of the device, set up during the driver's setup(). */
const char *virtq_setup(struct virtio_dev *d, unsigned index);
/* Post a chain (device-readable pieces first); returns the head or -1 when the ring is full. */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n, void *cookie);
/* Tell the device about new chains (unless it asked not to be told). */
void virtq_kick(struct virtio_dev *d, struct virtq *q);
/* Take one used chain: returns its head (and *len, *cookie) or -1 when there is none. */
int virtq_get(struct virtq *q, uint32_t *len, void **cookie);
int virtq_has_used(struct virtq *q);
/* Wait up to timeout_us for the device to use a chain; returns whether one is there. */
int virtq_wait(struct virtq *q, uint64_t timeout_us);
/* Submit one chain, kick, wait for it and take it back; NULL or an error message. */
const char *virtq_run(struct virtio_dev *d, struct virtq *q, const struct virtq_buf *bufs,
		      unsigned n, uint64_t timeout_us, uint32_t *used_len);

/* Wait up to timeout_us, interrupts on, for the device's config-change counter to pass
 * d->config_seen or its ConfigGeneration to leave d->generation_seen; returns whether so. */
int virtio_wait_config(struct virtio_dev *d, uint64_t timeout_us);
/* Record the current counter and generation as seen. */
void virtio_config_seen(struct virtio_dev *d);

/* Shared helpers for the drivers' argument parsing and output. */
int virtio_parse_num(const char *s, uint64_t *out); /* decimal, or hex with 0x */
int virtio_parse_mac(const char *s, uint8_t mac[6]);
void virtio_print_features(const char *label, uint64_t features,
			   const char *(*name_of)(unsigned bit));
const char *virtio_common_feature_name(unsigned bit);

/* The drivers (virtio_blk.c, virtio_net.c, virtio_balloon.c, virtio_rng.c, virtio_console.c). */
extern const struct virtio_driver virtio_blk_driver;
extern const struct virtio_driver virtio_net_driver;
extern const struct virtio_driver virtio_balloon_driver;
extern const struct virtio_driver virtio_rng_driver;
extern const struct virtio_driver virtio_console_driver;

/* Command handlers (command_fn, see probe.h). */
const char *cmd_virtio(int argc, char **argv, const char *args);
const char *cmd_blk(int argc, char **argv, const char *args);
const char *cmd_net(int argc, char **argv, const char *args);
const char *cmd_balloon(int argc, char **argv, const char *args);
const char *cmd_rng(int argc, char **argv, const char *args);
const char *cmd_console(int argc, char **argv, const char *args);

#endif
