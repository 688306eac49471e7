/* virtio_rng.c: owns the probe's virtio-rng driver (virtio 1.x §5.4) and the `rng` command:
 * reading N random bytes and reporting what came (count, requests, CRC-32, how many distinct
 * byte values, the first bytes), and timing such a read by the guest's own clock (the TSC,
 * scaled by kvmclock; see tsc_to_us) to see the device's rate limit from inside.
 *
 * Requests are synchronous, one at a time: one device-writable buffer of at most RNG_CHUNK
 * bytes from .bss per request. A device may fill less than the buffer (a rate limit's edge);
 * one that claims to have written more than the buffer holds is an error. */
#include "probe.h"
#include "lib.h"
#include "x86.h"
#include "virtio.h"

#define RNG_CHUNK 512
#define RNG_MAX_READ (1u << 20)
#define RNG_TIMEOUT_US 30000000ull /* per request: a rate-limited device answers within a period */

static uint8_t rng_buf[RNG_CHUNK] __attribute__((aligned(64)));

struct rng_result {
	uint64_t bytes, requests, partial, us;
	uint32_t crc;
	unsigned distinct;
	uint8_t first[16];
	unsigned nfirst;
};

static uint8_t seen[256];

static const char *rng_setup(struct virtio_dev *d)
{
	return virtq_setup(d, 0);
}

static const char *rng_read(struct virtio_dev *d, uint64_t n, struct rng_result *res)
{
	memset(res, 0, sizeof(*res));
	memset(seen, 0, sizeof(seen));
	uint64_t t0 = rdtsc();
	while (res->bytes < n) {
		uint32_t want = n - res->bytes < RNG_CHUNK ? (uint32_t)(n - res->bytes) : RNG_CHUNK;
		struct virtq_buf buf = {(uint64_t)rng_buf, want, 1};
		uint32_t len = 0;
		const char *err = virtq_run(d, &d->vq[0], &buf, 1, RNG_TIMEOUT_US, &len);
		if (err)
			return errorf("rng: request %lu: %s", res->requests, err);
		if (len > want)
			return errorf("rng: the device claims %u bytes written into a %u-byte buffer", len, want);
		res->requests++;
		if (len < want)
			res->partial++;
		res->crc = crc32(res->crc, rng_buf, len);
		for (uint32_t i = 0; i < len; i++) {
			if (!seen[rng_buf[i]]) {
				seen[rng_buf[i]] = 1;
				res->distinct++;
			}
			if (res->nfirst < sizeof(res->first))
				res->first[res->nfirst++] = rng_buf[i];
		}
		res->bytes += len;
	}
	res->us = tsc_to_us(rdtsc() - t0);
	return 0;
}

const struct virtio_driver virtio_rng_driver = {
	.device_id = VIRTIO_ID_RNG,
	.name = "rng",
	.features = 0,
	.setup = rng_setup,
	.started = 0,
};

#define RNG_USAGE "usage: rng info|read <bytes>|rate <bytes>"

const char *cmd_rng(int argc, char **argv, const char *args)
{
	(void)args;
	if (argc < 2)
		return RNG_USAGE;
	const char *err = 0;
	struct virtio_dev *d = virtio_find_running(VIRTIO_ID_RNG, 0, &err);
	if (!d)
		return err;
	if (!strcmp(argv[1], "info") && argc == 2) {
		printf("rng: queue size %u\n", d->vq[0].size);
		virtio_print_features("features", d->driver_features, 0);
		virtio_print_features("offered", d->device_features, 0);
		return 0;
	}
	uint64_t n;
	if (argc != 3 || virtio_parse_num(argv[2], &n) || !n || n > RNG_MAX_READ)
		return RNG_USAGE;
	struct rng_result res;
	if (!strcmp(argv[1], "read")) {
		err = rng_read(d, n, &res);
		if (err)
			return err;
		char hex[2 * sizeof(res.first) + 1];
		for (unsigned i = 0; i < res.nfirst; i++)
			snprintf(hex + 2 * i, 3, "%02x", res.first[i]);
		hex[2 * res.nfirst] = 0;
		printf("rng: bytes=%lu requests=%lu partial=%lu crc32=0x%08x distinct=%u first=%s\n",
		       res.bytes, res.requests, res.partial, res.crc, res.distinct, hex);
		return 0;
	}
	if (!strcmp(argv[1], "rate")) {
		err = rng_read(d, n, &res);
		if (err)
			return err;
		printf("rng: rate bytes=%lu requests=%lu partial=%lu us=%lu bytes_per_s=%lu\n", res.bytes,
		       res.requests, res.partial, res.us, res.us ? res.bytes * 1000000 / res.us : 0);
		return 0;
	}
	return RNG_USAGE;
}
