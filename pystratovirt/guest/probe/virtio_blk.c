/* virtio_blk.c: owns the probe's virtio-blk driver (virtio 1.x §5.2) and the `blk` command:
 * capacity and feature report, GET_ID, read, write (a fill byte or the sector pattern), flush,
 * discard, write-zeroes, and waiting for a config change (hot-plug).
 *
 * The sector pattern, which host tests recompute: byte i (0..511) of sector s (the absolute
 * sector number on the disk, 512-byte sectors) is (s * 7 + i) & 0xff.
 *
 * Requests are synchronous, one at a time: a header, the data in as few descriptors as the
 * device's size_max/seg_max allow, and the status byte, from static buffers in .bss. */
#include "probe.h"
#include "lib.h"
#include "virtio.h"

/* Feature bits (§5.2.3). */
#define BLK_F_SIZE_MAX 1
#define BLK_F_SEG_MAX 2
#define BLK_F_GEOMETRY 4
#define BLK_F_RO 5
#define BLK_F_BLK_SIZE 6
#define BLK_F_FLUSH 9
#define BLK_F_TOPOLOGY 10
#define BLK_F_CONFIG_WCE 11
#define BLK_F_MQ 12
#define BLK_F_DISCARD 13
#define BLK_F_WRITE_ZEROES 14
#define BLK_F_LIFETIME 15
#define BLK_F_SECURE_ERASE 16

/* struct virtio_blk_config offsets (§5.2.4). */
#define BLK_CFG_CAPACITY 0
#define BLK_CFG_SIZE_MAX 8
#define BLK_CFG_SEG_MAX 12
#define BLK_CFG_CYLINDERS 16
#define BLK_CFG_HEADS 18
#define BLK_CFG_SECTORS 19
#define BLK_CFG_BLK_SIZE 20
#define BLK_CFG_PHYS_BLOCK_EXP 24
#define BLK_CFG_ALIGNMENT_OFFSET 25
#define BLK_CFG_MIN_IO_SIZE 26
#define BLK_CFG_OPT_IO_SIZE 28
#define BLK_CFG_WRITEBACK 32
#define BLK_CFG_MAX_DISCARD_SECTORS 36
#define BLK_CFG_MAX_DISCARD_SEG 40
#define BLK_CFG_DISCARD_ALIGNMENT 44
#define BLK_CFG_MAX_WZ_SECTORS 48
#define BLK_CFG_MAX_WZ_SEG 52
#define BLK_CFG_WZ_MAY_UNMAP 56

/* Request types and status values (§5.2.6). */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_T_WRITE_ZEROES 13
#define BLK_S_OK 0
#define BLK_S_UNSET 0xff /* what we put there: a device that never wrote it shows as 255 */

#define BLK_ID_BYTES 20
#define SECTOR_SIZE 512
#define BLK_MAX_SECTORS 64
#define BLK_TIMEOUT_US 10000000ull
#define WZ_FLAG_UNMAP 1

struct blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

struct blk_discard_wz {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

static struct {
	struct blk_req_hdr hdr;
	struct blk_discard_wz range;
	char id[BLK_ID_BYTES];
	uint8_t status;
} blk_req __attribute__((aligned(64)));

static uint8_t blk_data[BLK_MAX_SECTORS * SECTOR_SIZE] __attribute__((aligned(4096)));

static const char *blk_feature_name(unsigned bit)
{
	switch (bit) {
	case 0: return "BARRIER";
	case BLK_F_SIZE_MAX: return "SIZE_MAX";
	case BLK_F_SEG_MAX: return "SEG_MAX";
	case BLK_F_GEOMETRY: return "GEOMETRY";
	case BLK_F_RO: return "RO";
	case BLK_F_BLK_SIZE: return "BLK_SIZE";
	case 7: return "SCSI";
	case BLK_F_FLUSH: return "FLUSH";
	case BLK_F_TOPOLOGY: return "TOPOLOGY";
	case BLK_F_CONFIG_WCE: return "CONFIG_WCE";
	case BLK_F_MQ: return "MQ";
	case BLK_F_DISCARD: return "DISCARD";
	case BLK_F_WRITE_ZEROES: return "WRITE_ZEROES";
	case BLK_F_LIFETIME: return "LIFETIME";
	case BLK_F_SECURE_ERASE: return "SECURE_ERASE";
	default: return 0;
	}
}

static const char *blk_setup(struct virtio_dev *d)
{
	return virtq_setup(d, 0);
}

/* Everything but MQ (one queue is plenty), CONFIG_WCE (we never switch the cache mode),
 * LIFETIME and SECURE_ERASE (no commands for them). */
const struct virtio_driver virtio_blk_driver = {
	.device_id = VIRTIO_ID_BLOCK,
	.name = "blk",
	.features = VIRTIO_BIT(BLK_F_SIZE_MAX) | VIRTIO_BIT(BLK_F_SEG_MAX) |
		    VIRTIO_BIT(BLK_F_GEOMETRY) | VIRTIO_BIT(BLK_F_RO) | VIRTIO_BIT(BLK_F_BLK_SIZE) |
		    VIRTIO_BIT(BLK_F_FLUSH) | VIRTIO_BIT(BLK_F_TOPOLOGY) |
		    VIRTIO_BIT(BLK_F_DISCARD) | VIRTIO_BIT(BLK_F_WRITE_ZEROES),
	.setup = blk_setup,
	.started = 0,
};

/* One request: the header, `len` bytes at `data` (device-readable unless `data_in`), the
 * status byte. Returns NULL (the status is in blk_req.status) or why it did not complete. */
static const char *blk_request(struct virtio_dev *d, uint32_t type, uint64_t sector,
			       const void *data, uint32_t len, int data_in)
{
	struct virtq_buf bufs[VIRTQ_SIZE];
	struct virtq *q = &d->vq[0];
	unsigned n = 0;
	bufs[n++] = (struct virtq_buf){(uint64_t)&blk_req.hdr, sizeof(blk_req.hdr), 0};

	/* The data split into segments no larger than size_max, and no more of them than
	 * seg_max and the ring allow. */
	uint32_t seg = len;
	if (virtio_has(d, BLK_F_SIZE_MAX)) {
		uint32_t size_max = virtio_cfg32(d, BLK_CFG_SIZE_MAX);
		if (size_max && size_max < seg)
			seg = size_max;
	}
	unsigned max_segs = q->size - 2;
	if (virtio_has(d, BLK_F_SEG_MAX)) {
		uint32_t seg_max = virtio_cfg32(d, BLK_CFG_SEG_MAX);
		if (seg_max && seg_max < max_segs)
			max_segs = seg_max;
	}
	for (uint32_t off = 0; off < len; off += seg) {
		if (n - 1 >= max_segs)
			return errorf("%u bytes need more than the %u segments the device takes", len,
				      max_segs);
		uint32_t piece = len - off < seg ? len - off : seg;
		bufs[n++] = (struct virtq_buf){(uint64_t)data + off, piece, data_in};
	}
	bufs[n++] = (struct virtq_buf){(uint64_t)&blk_req.status, 1, 1};

	blk_req.hdr.type = type;
	blk_req.hdr.reserved = 0;
	blk_req.hdr.sector = sector;
	blk_req.status = BLK_S_UNSET;
	return virtq_run(d, q, bufs, n, BLK_TIMEOUT_US, 0);
}

static void print_hex(const char *label, const uint8_t *p, unsigned len)
{
	char line[80];
	int n = snprintf(line, sizeof(line), "%s: ", label);
	for (unsigned i = 0; i < len && n + 3 < (int)sizeof(line); i++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%02x", p[i]);
	printf("%s\n", line);
}

static void fill_pattern(uint8_t *buf, uint64_t sector, unsigned count)
{
	for (unsigned s = 0; s < count; s++) {
		uint8_t *p = buf + s * SECTOR_SIZE;
		uint8_t v = (uint8_t)((sector + s) * 7);
		for (unsigned i = 0; i < SECTOR_SIZE; i++)
			p[i] = (uint8_t)(v + i);
	}
}

static const char *blk_info(struct virtio_dev *d)
{
	printf("capacity: %lu\n", virtio_cfg64(d, BLK_CFG_CAPACITY));
	virtio_print_features("features", d->driver_features, blk_feature_name);
	virtio_print_features("offered", d->device_features, blk_feature_name);
	if (virtio_has(d, BLK_F_SIZE_MAX))
		printf("size_max: %u\n", virtio_cfg32(d, BLK_CFG_SIZE_MAX));
	if (virtio_has(d, BLK_F_SEG_MAX))
		printf("seg_max: %u\n", virtio_cfg32(d, BLK_CFG_SEG_MAX));
	if (virtio_has(d, BLK_F_GEOMETRY))
		printf("geometry: cylinders=%u heads=%u sectors=%u\n", virtio_cfg16(d, BLK_CFG_CYLINDERS),
		       virtio_cfg8(d, BLK_CFG_HEADS), virtio_cfg8(d, BLK_CFG_SECTORS));
	if (virtio_has(d, BLK_F_BLK_SIZE))
		printf("blk_size: %u\n", virtio_cfg32(d, BLK_CFG_BLK_SIZE));
	if (virtio_has(d, BLK_F_TOPOLOGY))
		printf("topology: physical_block_exp=%u alignment_offset=%u min_io_size=%u "
		       "opt_io_size=%u\n",
		       virtio_cfg8(d, BLK_CFG_PHYS_BLOCK_EXP), virtio_cfg8(d, BLK_CFG_ALIGNMENT_OFFSET),
		       virtio_cfg16(d, BLK_CFG_MIN_IO_SIZE), virtio_cfg32(d, BLK_CFG_OPT_IO_SIZE));
	if (virtio_has(d, BLK_F_DISCARD))
		printf("discard: max_sectors=%u max_seg=%u alignment=%u\n",
		       virtio_cfg32(d, BLK_CFG_MAX_DISCARD_SECTORS),
		       virtio_cfg32(d, BLK_CFG_MAX_DISCARD_SEG),
		       virtio_cfg32(d, BLK_CFG_DISCARD_ALIGNMENT));
	if (virtio_has(d, BLK_F_WRITE_ZEROES))
		printf("write_zeroes: max_sectors=%u max_seg=%u may_unmap=%u\n",
		       virtio_cfg32(d, BLK_CFG_MAX_WZ_SECTORS), virtio_cfg32(d, BLK_CFG_MAX_WZ_SEG),
		       virtio_cfg8(d, BLK_CFG_WZ_MAY_UNMAP));

	memset(blk_req.id, 0, sizeof(blk_req.id));
	const char *err = blk_request(d, BLK_T_GET_ID, 0, blk_req.id, BLK_ID_BYTES, 1);
	if (err)
		return err;
	if (blk_req.status != BLK_S_OK) {
		printf("serial= (status %u)\n", blk_req.status);
		return 0;
	}
	/* Up to 20 bytes, NUL-terminated only when shorter; anything unprintable shows as '.'. */
	char id[BLK_ID_BYTES + 1];
	unsigned n = 0;
	for (; n < BLK_ID_BYTES && blk_req.id[n]; n++)
		id[n] = blk_req.id[n] >= 0x20 && blk_req.id[n] < 0x7f ? blk_req.id[n] : '.';
	id[n] = '\0';
	printf("serial=%s\n", id);
	return 0;
}

/* <sector> <count> at argv[3], argv[4], with 1 <= count <= max (0: no limit). */
static const char *sector_args(int argc, char **argv, uint64_t *sector, uint64_t *count,
			       uint64_t max)
{
	if (argc < 5 || virtio_parse_num(argv[3], sector) || virtio_parse_num(argv[4], count))
		return errorf("usage: blk <n> %s <sector> <count>", argv[2]);
	if (!*count || (max && *count > max))
		return errorf("count must be 1..%lu", max ? max : (uint64_t)0xffffffff);
	if (*count > 0xffffffffull)
		return "count must fit 32 bits";
	return 0;
}

static const char *blk_rw(struct virtio_dev *d, int argc, char **argv, int write)
{
	uint64_t sector, count;
	const char *err = sector_args(argc, argv, &sector, &count, BLK_MAX_SECTORS);
	if (err)
		return err;
	uint32_t len = (uint32_t)count * SECTOR_SIZE;
	if (!write) {
		if (argc != 5)
			return "usage: blk <n> read <sector> <count>";
		/* Poison first, so data the device never wrote cannot pass for zeros. */
		memset(blk_data, 0xa5, len);
		err = blk_request(d, BLK_T_IN, sector, blk_data, len, 1);
		if (err)
			return err;
		printf("crc32: 0x%08x\n", crc32(0, blk_data, len));
		print_hex("data", blk_data, 16);
		printf("status: %u\n", blk_req.status);
		return 0;
	}

	/* A read-only disk is written to only on request, to see the device refuse it. */
	if (argc < 6 || argc > 7 || (argc == 7 && strcmp(argv[6], "force")))
		return "usage: blk <n> write <sector> <count> <hexbyte|pattern> [force]";
	if (virtio_has(d, BLK_F_RO) && argc != 7)
		return "read-only device (add force to send the write anyway)";
	if (!strcmp(argv[5], "pattern")) {
		fill_pattern(blk_data, sector, (unsigned)count);
	} else {
		uint64_t fill;
		if (parse_hex(argv[5], &fill) || fill > 0xff)
			return "the fill must be a hex byte or pattern";
		memset(blk_data, (int)fill, len);
	}
	err = blk_request(d, BLK_T_OUT, sector, blk_data, len, 0);
	if (err)
		return err;
	printf("crc32: 0x%08x\n", crc32(0, blk_data, len));
	printf("status: %u\n", blk_req.status);
	return 0;
}

static const char *blk_range(struct virtio_dev *d, int argc, char **argv, uint32_t type,
			     unsigned feature)
{
	uint64_t sector, count;
	if (!virtio_has(d, feature))
		return "not supported";
	const char *err = sector_args(argc, argv, &sector, &count, 0);
	if (err)
		return err;
	uint32_t flags = 0;
	if (type == BLK_T_WRITE_ZEROES && argc == 6 && !strcmp(argv[5], "unmap"))
		flags = WZ_FLAG_UNMAP;
	else if (argc != 5)
		return type == BLK_T_DISCARD ? "usage: blk <n> discard <sector> <count>"
					     : "usage: blk <n> zeroes <sector> <count> [unmap]";
	blk_req.range.sector = sector;
	blk_req.range.num_sectors = (uint32_t)count;
	blk_req.range.flags = flags;
	err = blk_request(d, type, 0, &blk_req.range, sizeof(blk_req.range), 0);
	if (err)
		return err;
	printf("status: %u\n", blk_req.status);
	return 0;
}

static const char *blk_wait_config(struct virtio_dev *d, int argc, char **argv)
{
	uint64_t ms;
	if (argc != 4 || virtio_parse_num(argv[3], &ms) || ms > 3600000)
		return "usage: blk <n> wait-config <timeout_ms>";
	int changed = virtio_wait_config(d, ms * 1000);
	virtio_config_seen(d);
	printf("capacity: %lu\n", virtio_cfg64(d, BLK_CFG_CAPACITY));
	const char *err = virtio_check(d);
	if (err)
		return err;
	return changed ? 0 : "timeout";
}

const char *cmd_blk(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t n;
	if (argc < 3 || virtio_parse_num(argv[1], &n))
		return "usage: blk <n> info|read|write|flush|discard|zeroes|wait-config ...";
	const char *err = 0;
	struct virtio_dev *d = virtio_find(VIRTIO_ID_BLOCK, (unsigned)n, &err);
	if (!d)
		return err;
	const char *op = argv[2];
	if (!strcmp(op, "wait-config"))
		return blk_wait_config(d, argc, argv);
	err = virtio_check(d);
	if (err)
		return err;
	if (!strcmp(op, "info"))
		return argc == 3 ? blk_info(d) : "usage: blk <n> info";
	if (!strcmp(op, "read"))
		return blk_rw(d, argc, argv, 0);
	if (!strcmp(op, "write"))
		return blk_rw(d, argc, argv, 1);
	if (!strcmp(op, "flush")) {
		if (!virtio_has(d, BLK_F_FLUSH))
			return "not supported";
		if (argc != 3)
			return "usage: blk <n> flush";
		err = blk_request(d, BLK_T_FLUSH, 0, 0, 0, 0);
		if (err)
			return err;
		printf("status: %u\n", blk_req.status);
		return 0;
	}
	if (!strcmp(op, "discard"))
		return blk_range(d, argc, argv, BLK_T_DISCARD, BLK_F_DISCARD);
	if (!strcmp(op, "zeroes"))
		return blk_range(d, argc, argv, BLK_T_WRITE_ZEROES, BLK_F_WRITE_ZEROES);
	return errorf("unknown blk operation %s", op);
}
