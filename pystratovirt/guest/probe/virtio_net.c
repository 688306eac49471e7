/* virtio_net.c: owns the probe's virtio-net driver (virtio 1.x §5.1) and the `net` command:
 * MAC, link status and features; sending one frame; receiving one frame.
 *
 * One receive and one transmit queue (no MQ, no control queue), no offloads and no
 * MRG_RXBUF: every packet is the 12-byte struct virtio_net_hdr (the VERSION_1 layout, with
 * num_buffers) followed by the Ethernet frame without its FCS, in one descriptor. NET_RX_BUFS
 * receive buffers stay posted; frames that arrive while nobody runs `net recv` wait in them
 * (the device drops what finds no buffer), and `net recv` hands them out oldest first. */
#include "probe.h"
#include "lib.h"
#include "virtio.h"

/* Feature bits (§5.1.3). */
#define NET_F_CSUM 0
#define NET_F_GUEST_CSUM 1
#define NET_F_CTRL_GUEST_OFFLOADS 2
#define NET_F_MTU 3
#define NET_F_MAC 5
#define NET_F_GUEST_TSO4 7
#define NET_F_GUEST_TSO6 8
#define NET_F_GUEST_ECN 9
#define NET_F_GUEST_UFO 10
#define NET_F_HOST_TSO4 11
#define NET_F_HOST_TSO6 12
#define NET_F_HOST_ECN 13
#define NET_F_HOST_UFO 14
#define NET_F_MRG_RXBUF 15
#define NET_F_STATUS 16
#define NET_F_CTRL_VQ 17
#define NET_F_CTRL_RX 18
#define NET_F_CTRL_VLAN 19
#define NET_F_GUEST_ANNOUNCE 21
#define NET_F_MQ 22
#define NET_F_CTRL_MAC_ADDR 23
#define NET_F_SPEED_DUPLEX 63

/* struct virtio_net_config offsets (§5.1.4). */
#define NET_CFG_MAC 0
#define NET_CFG_STATUS 6
#define NET_CFG_MTU 10
#define NET_S_LINK_UP 1
#define NET_S_ANNOUNCE 2

#define NET_RXQ 0
#define NET_TXQ 1
#define NET_HDR_LEN 12   /* struct virtio_net_hdr with num_buffers: VERSION_1 always has it */
#define NET_FRAME_MAX 1526 /* what a receive buffer holds besides the header (§5.1.6.3.1) */
#define NET_BUF_LEN (NET_HDR_LEN + NET_FRAME_MAX)
#define NET_BUF_STRIDE 2048
#define NET_RX_BUFS 4
#define NET_MAX 2 /* the micro-VM has two net slots */
#define NET_TX_TIMEOUT_US 2000000ull
#define ETH_HLEN 14

struct net_state {
	uint8_t rx[NET_RX_BUFS][NET_BUF_STRIDE];
	uint8_t tx[NET_BUF_STRIDE];
	struct virtio_dev *dev;
	uint8_t mac[6];
	int mac_generated;
};

static struct net_state nets[NET_MAX] __attribute__((aligned(4096)));

static const char *net_feature_name(unsigned bit)
{
	switch (bit) {
	case NET_F_CSUM: return "CSUM";
	case NET_F_GUEST_CSUM: return "GUEST_CSUM";
	case NET_F_CTRL_GUEST_OFFLOADS: return "CTRL_GUEST_OFFLOADS";
	case NET_F_MTU: return "MTU";
	case NET_F_MAC: return "MAC";
	case NET_F_GUEST_TSO4: return "GUEST_TSO4";
	case NET_F_GUEST_TSO6: return "GUEST_TSO6";
	case NET_F_GUEST_ECN: return "GUEST_ECN";
	case NET_F_GUEST_UFO: return "GUEST_UFO";
	case NET_F_HOST_TSO4: return "HOST_TSO4";
	case NET_F_HOST_TSO6: return "HOST_TSO6";
	case NET_F_HOST_ECN: return "HOST_ECN";
	case NET_F_HOST_UFO: return "HOST_UFO";
	case NET_F_MRG_RXBUF: return "MRG_RXBUF";
	case NET_F_STATUS: return "STATUS";
	case NET_F_CTRL_VQ: return "CTRL_VQ";
	case NET_F_CTRL_RX: return "CTRL_RX";
	case NET_F_CTRL_VLAN: return "CTRL_VLAN";
	case NET_F_GUEST_ANNOUNCE: return "GUEST_ANNOUNCE";
	case NET_F_MQ: return "MQ";
	case NET_F_CTRL_MAC_ADDR: return "CTRL_MAC_ADDR";
	case NET_F_SPEED_DUPLEX: return "SPEED_DUPLEX";
	default: return 0;
	}
}

static void net_post_rx(struct net_state *s, unsigned i)
{
	struct virtq_buf b = {(uint64_t)s->rx[i], NET_BUF_LEN, 1};
	/* The cookie is the buffer's number + 1, so buffer 0 is not a NULL cookie. */
	virtq_add(&s->dev->vq[NET_RXQ], &b, 1, (void *)(uint64_t)(i + 1));
}

static const char *net_setup(struct virtio_dev *d)
{
	struct net_state *s = d->priv;
	for (unsigned i = 0; !s && i < NET_MAX; i++)
		if (!nets[i].dev)
			s = &nets[i];
	if (!s)
		return errorf("the probe drives at most %u net devices", NET_MAX);
	s->dev = d;
	d->priv = s;

	if (virtio_has(d, NET_F_MAC)) {
		virtio_cfg_bytes(d, NET_CFG_MAC, s->mac, 6);
		s->mac_generated = 0;
	} else {
		/* A locally administered address of our own (§5.1.5: the driver picks one). */
		static const uint8_t base[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x00};
		memcpy(s->mac, base, 6);
		s->mac[5] = (uint8_t)d->slot;
		s->mac_generated = 1;
	}
	const char *err = virtq_setup(d, NET_RXQ);
	if (!err)
		err = virtq_setup(d, NET_TXQ);
	if (err)
		return err;
	/* Receive buffers go in before DRIVER_OK (allowed); the notification only after it. */
	for (unsigned i = 0; i < NET_RX_BUFS; i++)
		net_post_rx(s, i);
	return 0;
}

static void net_started(struct virtio_dev *d)
{
	virtq_kick(d, &d->vq[NET_RXQ]);
}

/* MAC and STATUS for the report, MTU to print it; nothing that changes the packet format. */
const struct virtio_driver virtio_net_driver = {
	.device_id = VIRTIO_ID_NET,
	.name = "net",
	.features = VIRTIO_BIT(NET_F_MAC) | VIRTIO_BIT(NET_F_STATUS) | VIRTIO_BIT(NET_F_MTU),
	.setup = net_setup,
	.started = net_started,
};

static void format_mac(char *out, const uint8_t *m)
{
	snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

static const char *net_info(struct virtio_dev *d, struct net_state *s)
{
	char mac[18];
	format_mac(mac, s->mac);
	printf("mac: %s%s\n", mac, s->mac_generated ? " (generated)" : "");
	if (virtio_has(d, NET_F_STATUS)) {
		uint16_t st = virtio_cfg16(d, NET_CFG_STATUS);
		printf("link: %s\n", st & NET_S_LINK_UP ? "up" : "down");
		printf("status: 0x%04x\n", st);
	} else {
		/* Without VIRTIO_NET_F_STATUS the link is to be assumed up (§5.1.4.2). */
		printf("link: up (assumed: no STATUS feature)\n");
	}
	if (virtio_has(d, NET_F_MTU))
		printf("mtu: %u\n", virtio_cfg16(d, NET_CFG_MTU));
	virtio_print_features("features", d->driver_features, net_feature_name);
	virtio_print_features("offered", d->device_features, net_feature_name);
	return 0;
}

static const char *net_send(struct virtio_dev *d, struct net_state *s, int argc, char **argv)
{
	uint8_t dst[6];
	uint64_t type, len, fill;
	if (argc != 7 || virtio_parse_mac(argv[3], dst) || parse_hex(argv[4], &type) ||
	    virtio_parse_num(argv[5], &len) || parse_hex(argv[6], &fill))
		return "usage: net <n> send <dst-mac> <ethertype-hex> <len> <fill-hexbyte>";
	if (type > 0xffff || fill > 0xff)
		return "the ethertype is 16 bits, the fill one byte";
	if (len < ETH_HLEN || len > NET_FRAME_MAX)
		return errorf("len is the whole frame without FCS: %u..%u", ETH_HLEN, NET_FRAME_MAX);

	uint8_t *p = s->tx;
	memset(p, 0, NET_HDR_LEN); /* no checksum, no GSO, num_buffers 0 */
	uint8_t *f = p + NET_HDR_LEN;
	memcpy(f, dst, 6);
	memcpy(f + 6, s->mac, 6);
	f[12] = (uint8_t)(type >> 8);
	f[13] = (uint8_t)type;
	memset(f + ETH_HLEN, (int)fill, len - ETH_HLEN);
	struct virtq_buf b = {(uint64_t)p, (uint32_t)(NET_HDR_LEN + len), 0};
	const char *err = virtq_run(d, &d->vq[NET_TXQ], &b, 1, NET_TX_TIMEOUT_US, 0);
	if (err)
		return err;
	printf("sent\n");
	return 0;
}

/* Take a received buffer, report it, and post it again. */
static void net_take_rx(struct virtio_dev *d, struct net_state *s, int print)
{
	uint32_t used;
	void *cookie;
	if (virtq_get(&d->vq[NET_RXQ], &used, &cookie) < 0)
		return;
	unsigned i = (unsigned)(uint64_t)cookie - 1;
	if (i >= NET_RX_BUFS)
		return; /* not ours: a device bug, the chain is gone */
	if (print) {
		const uint8_t *f = s->rx[i] + NET_HDR_LEN;
		uint32_t len = used > NET_HDR_LEN ? used - NET_HDR_LEN : 0;
		if (len > NET_FRAME_MAX)
			len = NET_FRAME_MAX;
		if (len < ETH_HLEN) {
			printf("frame: len=%u crc32=0x%08x (runt)\n", len, crc32(0, f, len));
		} else {
			char dst[18], src[18];
			format_mac(dst, f);
			format_mac(src, f + 6);
			printf("frame: len=%u dst=%s src=%s type=0x%04x crc32=0x%08x\n", len, dst, src,
			       (unsigned)f[12] << 8 | f[13], crc32(0, f, len));
		}
	}
	net_post_rx(s, i);
	virtq_kick(d, &d->vq[NET_RXQ]);
}

static const char *net_recv(struct virtio_dev *d, struct net_state *s, int argc, char **argv)
{
	uint64_t ms;
	if (argc != 4 || virtio_parse_num(argv[3], &ms) || ms > 3600000)
		return "usage: net <n> recv <timeout_ms>";
	if (!virtq_wait(&d->vq[NET_RXQ], ms * 1000)) {
		const char *err = virtio_check(d);
		return err ? err : "timeout";
	}
	net_take_rx(d, s, 1);
	return 0;
}

const char *cmd_net(int argc, char **argv, const char *args)
{
	(void)args;
	uint64_t n;
	if (argc < 3 || virtio_parse_num(argv[1], &n))
		return "usage: net <n> info|send|recv|drain ...";
	const char *err = 0;
	struct virtio_dev *d = virtio_find(VIRTIO_ID_NET, (unsigned)n, &err);
	if (!d)
		return err;
	struct net_state *s = d->priv;
	err = virtio_check(d);
	if (err)
		return err;
	const char *op = argv[2];
	if (!strcmp(op, "info"))
		return argc == 3 ? net_info(d, s) : "usage: net <n> info";
	if (!strcmp(op, "send"))
		return net_send(d, s, argc, argv);
	if (!strcmp(op, "recv"))
		return net_recv(d, s, argc, argv);
	if (!strcmp(op, "drain")) {
		/* Forget the frames waiting in the receive buffers. */
		unsigned k = 0;
		for (; k < VIRTQ_SIZE && virtq_has_used(&d->vq[NET_RXQ]); k++)
			net_take_rx(d, s, 0);
		printf("drained: %u\n", k);
		return 0;
	}
	return errorf("unknown net operation %s", op);
}
