/* virtio_balloon.c: owns the probe's virtio-balloon driver (virtio 1.x §5.5) and the `balloon`
 * command: reading num_pages/actual, and inflating or deflating toward num_pages.
 *
 * Where the pages come from: the e820 RAM from 32 MiB (BALLOON_LOW) up to 4 GiB (the end of
 * the identity map), minus the initrd. Below 32 MiB lie the VMM's boot structures and page
 * tables (0x9000..0xEFFF), the command line and the probe's own image (16..17 MiB). The first
 * pages of that pool hold the bitmap of which pool pages are in the balloon; the rest are
 * given lowest first and taken back highest first. Each page is written before it is given,
 * so the host sees resident memory to release.
 *
 * Statistics (STATS_VQ, §5.5.6.3): one buffer of (tag, value) entries is posted at start and
 * reposted, refilled, each time the device hands it back to ask for fresh values. The probe
 * reports what it knows: its e820 RAM as total memory, and the pool pages not in the balloon
 * as free and available memory. It answers while `balloon run` works and on `balloon stats`. */
#include "probe.h"
#include "lib.h"
#include "x86.h"
#include "virtio.h"

/* Feature bits (§5.5.3). */
#define BALLOON_F_MUST_TELL_HOST 0
#define BALLOON_F_STATS_VQ 1
#define BALLOON_F_DEFLATE_ON_OOM 2
#define BALLOON_F_FREE_PAGE_HINT 3
#define BALLOON_F_PAGE_POISON 4
#define BALLOON_F_REPORTING 5

/* struct virtio_balloon_config offsets (§5.5.4). */
#define BALLOON_CFG_NUM_PAGES 0
#define BALLOON_CFG_ACTUAL 4

#define BALLOON_INFLATEQ 0
#define BALLOON_DEFLATEQ 1
#define BALLOON_STATSQ 2
#define BALLOON_BATCH 256 /* PFNs per buffer */
#define BALLOON_LOW (32ull << 20)
#define BALLOON_HIGH (1ull << 32)
#define PAGE_SHIFT 12 /* the balloon's PFNs are always of 4 KiB pages */
#define PAGE_SIZE (1ull << PAGE_SHIFT)
#define POOL_RANGES 8
#define BALLOON_TIMEOUT_US 10000000ull
#define IDLE_POLL_US 10000

struct pfn_range {
	uint64_t start, end; /* page frame numbers, end exclusive */
};

static struct {
	struct virtio_dev *dev;
	int pool_ready;
	struct pfn_range ranges[POOL_RANGES];
	unsigned nranges;
	uint64_t span_lo;  /* the bitmap's bit i stands for PFN span_lo + i */
	uint8_t *bitmap;
	uint64_t bitmap_pages;
	uint64_t pool_pages; /* pages that can be given */
	uint64_t held;       /* pages in the balloon */
	uint64_t low_hint;   /* every pool page below this PFN is in the balloon */
	uint64_t high_hint;  /* no page at or above this PFN is in the balloon */
} bal;

static uint32_t pfn_batch[BALLOON_BATCH] __attribute__((aligned(64)));

/* Statistic tags (§5.5.6.3). */
#define BALLOON_S_MEMFREE 4
#define BALLOON_S_MEMTOT 5
#define BALLOON_S_AVAIL 6

struct balloon_stat {
	uint16_t tag;
	uint64_t val;
} __attribute__((packed));

static struct balloon_stat stats_buf[3] __attribute__((aligned(64)));
static uint64_t stats_answered; /* requests for fresh statistics answered */

static const char *balloon_feature_name(unsigned bit)
{
	switch (bit) {
	case BALLOON_F_MUST_TELL_HOST: return "MUST_TELL_HOST";
	case BALLOON_F_STATS_VQ: return "STATS_VQ";
	case BALLOON_F_DEFLATE_ON_OOM: return "DEFLATE_ON_OOM";
	case BALLOON_F_FREE_PAGE_HINT: return "FREE_PAGE_HINT";
	case BALLOON_F_PAGE_POISON: return "PAGE_POISON";
	case BALLOON_F_REPORTING: return "REPORTING";
	default: return 0;
	}
}

static void add_range(uint64_t start, uint64_t end)
{
	if (start < end && bal.nranges < POOL_RANGES)
		bal.ranges[bal.nranges++] = (struct pfn_range){start, end};
}

/* The pool: e820 RAM within [BALLOON_LOW, BALLOON_HIGH), whole pages, minus the initrd. */
static void pool_init(void)
{
	uint64_t rd_lo = boot.initrd_addr >> PAGE_SHIFT;
	uint64_t rd_hi = (boot.initrd_addr + boot.initrd_size + PAGE_SIZE - 1) >> PAGE_SHIFT;
	for (unsigned i = 0; i < boot.e820_count; i++) {
		const struct e820_entry *e = &boot.e820[i];
		if (e->type != E820_RAM)
			continue;
		uint64_t lo = e->addr < BALLOON_LOW ? BALLOON_LOW : e->addr;
		uint64_t hi = e->addr + e->size > BALLOON_HIGH ? BALLOON_HIGH : e->addr + e->size;
		if (lo >= hi)
			continue;
		uint64_t s = (lo + PAGE_SIZE - 1) >> PAGE_SHIFT, t = hi >> PAGE_SHIFT;
		if (boot.initrd_size && rd_lo < t && rd_hi > s) {
			add_range(s, rd_lo);
			add_range(rd_hi, t);
		} else {
			add_range(s, t);
		}
	}
	if (!bal.nranges)
		return;
	uint64_t lo = bal.ranges[0].start, hi = bal.ranges[0].end;
	for (unsigned i = 1; i < bal.nranges; i++) {
		if (bal.ranges[i].start < lo)
			lo = bal.ranges[i].start;
		if (bal.ranges[i].end > hi)
			hi = bal.ranges[i].end;
	}
	/* The bitmap takes the first range's first pages: it is ours and above the image. */
	uint64_t bytes = (hi - lo + 7) / 8;
	bal.bitmap_pages = (bytes + PAGE_SIZE - 1) >> PAGE_SHIFT;
	for (unsigned i = 0; i < bal.nranges; i++) {
		struct pfn_range *r = &bal.ranges[i];
		if (r->end - r->start > bal.bitmap_pages) {
			bal.bitmap = phys(r->start << PAGE_SHIFT);
			r->start += bal.bitmap_pages;
			break;
		}
	}
	if (!bal.bitmap) {
		bal.nranges = 0;
		return;
	}
	bal.span_lo = lo;
	bal.pool_pages = 0;
	for (unsigned i = 0; i < bal.nranges; i++)
		bal.pool_pages += bal.ranges[i].end - bal.ranges[i].start;
	bal.pool_ready = 1;
}

static void pool_clear(void)
{
	if (bal.pool_ready)
		memset(bal.bitmap, 0, bal.bitmap_pages << PAGE_SHIFT);
	bal.held = 0;
	bal.low_hint = 0;
	bal.high_hint = 0;
}

static int bit_get(uint64_t pfn)
{
	uint64_t i = pfn - bal.span_lo;
	return (bal.bitmap[i >> 3] >> (i & 7)) & 1;
}

static void bit_set(uint64_t pfn, int on)
{
	uint64_t i = pfn - bal.span_lo;
	if (on)
		bal.bitmap[i >> 3] |= (uint8_t)(1u << (i & 7));
	else
		bal.bitmap[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

/* The lowest pool page not in the balloon, or 0 when every one is. */
static uint64_t take_free_page(void)
{
	for (unsigned r = 0; r < bal.nranges; r++) {
		uint64_t p = bal.ranges[r].start, end = bal.ranges[r].end;
		if (p < bal.low_hint)
			p = bal.low_hint;
		while (p < end) {
			uint64_t i = p - bal.span_lo;
			/* Whole bytes of given pages at once. */
			if (!(i & 7) && p + 8 <= end && bal.bitmap[i >> 3] == 0xff) {
				p += 8;
				continue;
			}
			if (!bit_get(p)) {
				bit_set(p, 1);
				bal.low_hint = p + 1;
				if (p + 1 > bal.high_hint)
					bal.high_hint = p + 1;
				return p;
			}
			p++;
		}
	}
	bal.low_hint = ~0ull;
	return 0;
}

/* The highest page in the balloon, or 0 when it is empty. */
static uint64_t take_held_page(void)
{
	uint64_t p = bal.high_hint;
	while (p > bal.span_lo) {
		uint64_t i = p - 1 - bal.span_lo;
		if (!((i + 1) & 7) && i >= 7 && !bal.bitmap[i >> 3]) {
			p -= 8;
			continue;
		}
		p--;
		if (bit_get(p)) {
			bit_set(p, 0);
			bal.high_hint = p;
			if (p < bal.low_hint)
				bal.low_hint = p;
			return p;
		}
	}
	bal.high_hint = bal.span_lo;
	return 0;
}

static const char *balloon_setup(struct virtio_dev *d)
{
	bal.dev = d;
	d->priv = &bal;
	if (!bal.pool_ready)
		pool_init();
	/* A reset device has forgotten what it held: so do we. */
	pool_clear();
	const char *err = virtq_setup(d, BALLOON_INFLATEQ);
	if (!err)
		err = virtq_setup(d, BALLOON_DEFLATEQ);
	if (!err && virtio_has(d, BALLOON_F_STATS_VQ))
		err = virtq_setup(d, BALLOON_STATSQ);
	return err;
}

static uint64_t e820_ram_bytes(void)
{
	uint64_t total = 0;
	for (unsigned i = 0; i < boot.e820_count; i++)
		if (boot.e820[i].type == E820_RAM)
			total += boot.e820[i].size;
	return total;
}

static void stats_post(struct virtio_dev *d)
{
	uint64_t free = (bal.pool_pages - bal.held) << PAGE_SHIFT;
	stats_buf[0] = (struct balloon_stat){BALLOON_S_MEMTOT, e820_ram_bytes()};
	stats_buf[1] = (struct balloon_stat){BALLOON_S_MEMFREE, free};
	stats_buf[2] = (struct balloon_stat){BALLOON_S_AVAIL, free};
	struct virtq_buf b = {(uint64_t)stats_buf, sizeof stats_buf, 0};
	if (virtq_add(&d->vq[BALLOON_STATSQ], &b, 1, 0) >= 0)
		virtq_kick(d, &d->vq[BALLOON_STATSQ]);
}

/* If the device has handed the statistics buffer back, refill and repost it; returns whether. */
static int stats_service(struct virtio_dev *d)
{
	uint32_t len;
	void *cookie;
	if (!virtio_has(d, BALLOON_F_STATS_VQ) || virtq_get(&d->vq[BALLOON_STATSQ], &len, &cookie) < 0)
		return 0;
	stats_post(d);
	stats_answered++;
	return 1;
}

/* After a (re)start the balloon is empty: say so, and post the first statistics. */
static void balloon_started(struct virtio_dev *d)
{
	virtio_cfg_write32(d, BALLOON_CFG_ACTUAL, 0);
	if (virtio_has(d, BALLOON_F_STATS_VQ))
		stats_post(d);
}

/* MUST_TELL_HOST is honoured (pages go back to use only after the deflate buffer is used, and
 * we never reuse them before); DEFLATE_ON_OOM is only reported. */
const struct virtio_driver virtio_balloon_driver = {
	.device_id = VIRTIO_ID_BALLOON,
	.name = "balloon",
	.features = VIRTIO_BIT(BALLOON_F_MUST_TELL_HOST) | VIRTIO_BIT(BALLOON_F_DEFLATE_ON_OOM) |
		    VIRTIO_BIT(BALLOON_F_STATS_VQ),
	.setup = balloon_setup,
	.started = balloon_started,
};

static const char *submit_batch(struct virtio_dev *d, unsigned queue, unsigned n)
{
	struct virtq_buf b = {(uint64_t)pfn_batch, n * 4, 0};
	return virtq_run(d, &d->vq[queue], &b, 1, BALLOON_TIMEOUT_US, 0);
}

/* Give up to `want` pages; returns how many (0: the pool is used up), -1 on a device error. */
static int inflate(struct virtio_dev *d, uint64_t want, const char **err)
{
	unsigned n = 0;
	while (n < want && n < BALLOON_BATCH) {
		uint64_t pfn = take_free_page();
		if (!pfn)
			break;
		/* Touch the page, so it is resident on the host side before we give it. */
		*(volatile uint64_t *)phys(pfn << PAGE_SHIFT) = pfn;
		pfn_batch[n++] = (uint32_t)pfn;
	}
	if (!n)
		return 0;
	/* Counted as given even if the device fails: it may have taken them. */
	bal.held += n;
	*err = submit_batch(d, BALLOON_INFLATEQ, n);
	virtio_cfg_write32(d, BALLOON_CFG_ACTUAL, (uint32_t)bal.held);
	return *err ? -1 : (int)n;
}

static int deflate(struct virtio_dev *d, uint64_t want, const char **err)
{
	unsigned n = 0;
	while (n < want && n < BALLOON_BATCH) {
		uint64_t pfn = take_held_page();
		if (!pfn)
			break;
		pfn_batch[n++] = (uint32_t)pfn;
	}
	if (!n)
		return 0;
	bal.held -= n;
	*err = submit_batch(d, BALLOON_DEFLATEQ, n);
	virtio_cfg_write32(d, BALLOON_CFG_ACTUAL, (uint32_t)bal.held);
	return *err ? -1 : (int)n;
}

static const char *balloon_run(struct virtio_dev *d, uint64_t ms)
{
	uint64_t end = rdtsc() + ms * 1000 * tsc_per_us();
	const char *err = 0;
	int exhausted = 0;
	while (!err && rdtsc() < end) {
		stats_service(d);
		uint64_t target = virtio_cfg32(d, BALLOON_CFG_NUM_PAGES);
		if (target > bal.held && !exhausted) {
			if (!inflate(d, target - bal.held, &err) && !err) {
				exhausted = 1;
				printf("balloon: pool exhausted at %lu pages\n", bal.held);
			}
		} else if (target < bal.held) {
			exhausted = 0;
			deflate(d, bal.held - target, &err);
		} else {
			/* At the target (or stuck below it): wait for the device to change it (a
			 * config interrupt), looking again every 10 ms regardless. */
			if (target == bal.held)
				exhausted = 0;
			virtio_config_seen(d);
			virtio_wait_config(d, IDLE_POLL_US);
		}
	}
	printf("balloon: actual=%lu\n", bal.held);
	return err;
}

/* Wait up to `ms` for the device to ask for statistics, answer it, print what was sent. */
static const char *balloon_stats(struct virtio_dev *d, uint64_t ms)
{
	if (!virtio_has(d, BALLOON_F_STATS_VQ))
		return "balloon: no statistics queue (STATS_VQ not negotiated)";
	int answered = stats_service(d);
	if (!answered && virtq_wait(&d->vq[BALLOON_STATSQ], ms * 1000))
		answered = stats_service(d);
	printf("balloon: stats %s total=0x%lx free=0x%lx answered=%lu\n",
	       answered ? "answered" : "not requested", stats_buf[0].val, stats_buf[1].val,
	       stats_answered);
	return 0;
}

#define BALLOON_USAGE "usage: balloon info|run <timeout_ms>|stats <timeout_ms>"

const char *cmd_balloon(int argc, char **argv, const char *args)
{
	(void)args;
	if (argc < 2)
		return BALLOON_USAGE;
	const char *err = 0;
	struct virtio_dev *d = virtio_find_running(VIRTIO_ID_BALLOON, 0, &err);
	if (!d)
		return err;
	if (!strcmp(argv[1], "info") && argc == 2) {
		printf("balloon: num_pages=%u actual=%u\n", virtio_cfg32(d, BALLOON_CFG_NUM_PAGES),
		       virtio_cfg32(d, BALLOON_CFG_ACTUAL));
		printf("held: %lu\n", bal.held);
		if (bal.pool_ready)
			printf("pool: pages=%lu from=0x%lx bitmap=0x%lx\n", bal.pool_pages,
			       bal.ranges[0].start << PAGE_SHIFT, (uint64_t)bal.bitmap);
		else
			printf("pool: none (no RAM above 32 MiB)\n");
		virtio_print_features("features", d->driver_features, balloon_feature_name);
		virtio_print_features("offered", d->device_features, balloon_feature_name);
		return 0;
	}
	uint64_t ms;
	if (argc == 3 && !virtio_parse_num(argv[2], &ms) && ms <= 3600000) {
		if (!strcmp(argv[1], "run"))
			return balloon_run(d, ms);
		if (!strcmp(argv[1], "stats"))
			return balloon_stats(d, ms);
	}
	return BALLOON_USAGE;
}
