"""virtio-net (device id 1, virtio 1.x §5.1) over a Linux tap, with StratoVirt's replaceable slots.

Owns: the network device model -- one receive queue (0) and one transmit queue (1) of 256
entries, no control queue -- its config space (MAC, link status), the feature set, moving frames
and their 12-byte ``virtio_net_hdr`` between guest buffers and a :class:`~.tap.Tap`, the tap
poller thread, and the NIC's counters (:class:`NetStats`).

Slots and hot-plug. The machine creates a fixed number of NICs (StratoVirt: 2, eth0/eth1); an
empty slot is a NIC with no tap: transmitted frames are dropped (their chains completed) and
nothing is received. :meth:`VirtioNet.set_backend` attaches a tap or detaches it, thread-safely
(under the device lock: a batch in flight finishes on the old tap first). VIRTIO_NET_F_STATUS is
offered and the link is up exactly while a tap is attached; each change bumps ConfigGeneration
and raises a config-change interrupt, so the guest sees carrier come and go. StratoVirt sends no
interrupt on a NIC hot-plug (the guest is not told), but a user who unplugs a tap expects the
guest's link to go down, and Linux's virtio_net handles the interrupt with the standard driver.

MAC. ``mac=`` from the configuration, else :func:`generated_mac`: stable for a VM name and slot
(the same VM gets the same MAC on every boot, two slots never share one), locally administered
and unicast.

Threads. Everything runs on the device's I/O thread (``self.io``, see device.py): the
transport calls :meth:`process_queue` there on guest notifications, and the NIC registers its
tap on the same loop, so one thread serves both directions under ``device.lock``. Only
:meth:`process_queue` pops chains from the rings, so a malformed ring raises QueueError where the
transport turns it into DEVICE_NEEDS_RESET; tap events only consume chains already popped and
validated -- they fill cached receive chains from the tap and retry transmit chains the tap
refused with EAGAIN. Every notification pops *all* receive chains the driver made available, and
while transmission is blocked also all transmit chains, so no chain the driver announced is left
in a ring waiting for a notification that already came. A device that needs a reset stops using
its cached chains until the driver resets it.

Back-pressure. The tap fd is polled for reading only while cached receive chains exist. When the
guest has posted no buffers the device stops reading, so frames wait in the tap's own queue
(``txqueuelen`` frames, 1000 by default; beyond that the *kernel* drops them and counts them in
the tap's tx_dropped) until the guest posts buffers and notifies. Transmission runs on the I/O
thread, never on a vCPU; if the tap write would block, the chain is kept and retried when the
tap becomes writable (EPOLLOUT), later chains behind it in order.

Sizes. A frame longer than the receive chain it would go into is read into an overflow buffer
past the chain's end, dropped and counted (``rx_oversized``); it is never written past the
guest's buffers, and the chain stays for the next frame. A receive chain shorter than the
header, or a transmit chain shorter than the header, violates the spec: the former is a
QueueError, the latter is dropped and counted.

Offloads, passed through only where the tap really does the work:

* guest to host: VIRTIO_NET_F_CSUM, HOST_TSO4, HOST_TSO6 -- the tap takes partially
  checksummed and GSO frames with their vnet header and the host kernel finishes them;
* host to guest: GUEST_CSUM, GUEST_TSO4, GUEST_TSO6 -- set with TUNSETOFFLOAD to exactly what
  the driver accepted (nothing at all without GUEST_CSUM), so the kernel checksums and segments
  everything else before we read it. A frame that still carries something the driver did not
  accept (queued under older settings, or a tap whose offloads could not be changed) is dropped
  and counted rather than handed over; without GUEST_CSUM the header flags are cleared, as
  §5.1.6.4.1 requires. No MRG_RXBUF, ECN or UFO.

A tap that goes away under a running VM (deleted: reads and writes fail with EBADFD, epoll
reports EPOLLERR) is logged once, closed, and the NIC becomes an empty slot with the link down;
the VMM carries on. A tap that is merely down (writes fail with EIO) keeps its place: frames are
dropped and counted until it is up again.

vhost-net (``vhost=on``) is not implemented; see :mod:`.vhost_net`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import string
import struct
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..memory.guest import GuestMemory
from ..util.eventloop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Interrupt, VirtioDevice, VirtioState, bit
from .queue import Buffers, DescChain, QueueError, SplitQueue, read_buffers, write_buffers
from .tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN, Tap

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
HDR_LEN = VNET_HDR_LEN   # struct virtio_net_hdr with num_buffers: the VERSION_1 layout

# Feature bits (spec §5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_STATUS = 16

OFFLOAD_FEATURES = (bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6))

# struct virtio_net_hdr fields (spec §5.1.6).
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers

# struct virtio_net_config up to max_virtqueue_pairs (spec §5.1.4).
VIRTIO_NET_S_LINK_UP = 1
CONFIG = struct.Struct("<6sHH")
CONFIG_MAC = 0
CONFIG_STATUS = 6

# Frames handled per lock hold, so a hot-plug or reset waiting on the lock gets its turn.
RX_BUDGET = 64
TX_BATCH = 64
# Catches the part of a frame that does not fit the receive chain, so that its length is known
# and nothing lands beyond the guest's buffers. Frames from a tap are at most 64 KiB plus the
# header (GSO); a read that fills this completely is treated as oversized as well.
OVERFLOW_SIZE = 65536 + 4096
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# errno values meaning the interface behind the tap file is gone.
_TAP_GONE = frozenset({errno.EBADFD, errno.EBADF, errno.ENODEV, errno.ENXIO})


# -- MAC addresses ---------------------------------------------------------------------------------
def parse_mac(text: str) -> bytes:
    """``12:34:56:78:9a:bc`` to 6 bytes; raises ValueError for anything but a unicast address."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in string.hexdigits for c in p) for p in parts):
        raise ValueError(f"'{text}' is not a MAC address (six hexadecimal bytes separated by ':').")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address '{text}' is a multicast address; a NIC needs a unicast one.")
    if mac == bytes(6):
        raise ValueError(f"MAC address '{text}' is all zeroes.")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def generated_mac(vm_name: str, slot: int) -> bytes:
    """The MAC of a NIC configured without one: the first 6 bytes of
    SHA-256(``"pystratovirt-net:<vm_name>:<slot>"``) with the first byte's multicast bit cleared
    and its locally-administered bit set. Stable across boots of the same VM; VMs must have
    different names to get different MACs (as with any derived address)."""
    digest = hashlib.sha256(f"pystratovirt-net:{vm_name}:{slot}".encode()).digest()
    return bytes(((digest[0] & 0xFC) | 0x02,)) + digest[1:6]


# -- counters --------------------------------------------------------------------------------------
@dataclass
class NetStats:
    """Frame counters of one NIC (bytes count Ethernet frames, without the vnet header)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_oversized: int = 0   # longer than the receive chain that was next: dropped
    rx_dropped: int = 0     # offload kinds the driver did not accept: dropped
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0     # no tap attached, or the tap is down
    tx_errors: int = 0      # shorter than the header, or refused by the tap


class _RxChain(NamedTuple):
    """A popped receive chain waiting for a frame, with the iovec that reads one into it:
    ``views`` of its buffers and then the overflow buffer (``iov`` None: too many pieces for
    one readv, the frame goes through the bounce buffer and is scattered); ``limit`` is what the
    iovec holds (a read that fills it may have been cut short)."""

    head: int
    cap: int
    bufs: Buffers
    views: list[memoryview]
    iov: list[memoryview] | None
    limit: int

    def release(self) -> None:
        for v in self.views:
            v.release()


_new_rx = tuple.__new__   # building one per posted buffer: tuple's __new__, not NamedTuple's


# -- the device ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetState:
    """A NIC as a value (for snapshots): the virtio base state, the MAC and whether the link is
    up. Receive chains the NIC caches and transmit chains waiting for the tap are given back to
    their rings (see :meth:`VirtioNet.unfinished_chains`); the tap is the machine's to reopen."""

    virtio: VirtioState
    mac: bytes
    link_up: bool


class VirtioNet(VirtioDevice):
    """A virtio-net NIC in one slot, over an optional :class:`Tap` (owned once attached).

    ``mac``: "aa:bb:cc:dd:ee:ff" or 6 bytes; default :func:`generated_mac` of ``vm_name`` and
    ``slot``. ``offloads=False`` offers no checksum or segmentation offloads at all.
    """

    device_id = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: Tap | None = None, *, mac: str | bytes | None = None, vm_name: str = "",
                 slot: int = 0, name: str | None = None, offloads: bool = True):
        super().__init__(name or f"net{slot}")
        if mac is None:
            self.mac = generated_mac(vm_name, slot)
        elif isinstance(mac, str):
            self.mac = parse_mac(mac)
        else:
            if len(mac) != 6:
                raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
            self.mac = parse_mac(format_mac(bytes(mac)))  # the same unicast/non-zero checks
        self.offloads = offloads
        self._backend = tap
        self._link_up = tap is not None
        self._rx_chains: deque[_RxChain] = deque()
        self._tx_pending: deque[DescChain] = deque()
        self._closed = False
        self._warned: set[str] = set()   # one-time warnings, per backend
        self._stats = NetStats()
        self._overflow: memoryview | None = None   # allocated when the first buffer is posted
        self._bounce: bytearray | None = None
        self._watched: tuple[int, int] = (-1, 0)   # (tap fd, epoll mask) registered on self.io
        self._config = bytearray(CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP if self._link_up else 0, 1))

    # -- features, config, state -----------------------------------------------------------------
    def device_features(self) -> int:
        features = (super().device_features() | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)
                    | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS))
        if self.offloads:
            features |= OFFLOAD_FEATURES
        return features

    @property
    def backend(self) -> Tap | None:
        return self._backend

    @property
    def link_up(self) -> bool:
        return self._link_up

    @property
    def stats(self) -> NetStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def _set_link(self, up: bool) -> None:  # lock held
        if up != self._link_up:
            self._link_up = up
            self._update_config(CONFIG_STATUS, struct.pack("<H", VIRTIO_NET_S_LINK_UP if up else 0))

    def _tun_offload(self) -> int:
        """TUNSETOFFLOAD flags for what the driver accepted (the tap needs CSUM for TSO)."""
        if not self.negotiated(VIRTIO_NET_F_GUEST_CSUM):
            return 0
        flags = TUN_F_CSUM
        if self.negotiated(VIRTIO_NET_F_GUEST_TSO4):
            flags |= TUN_F_TSO4
        if self.negotiated(VIRTIO_NET_F_GUEST_TSO6):
            flags |= TUN_F_TSO6
        return flags

    def _apply_offload(self, tap: Tap) -> None:  # lock held
        flags = self._tun_offload()
        try:
            tap.set_offload(flags)
        except OSError as exc:
            # Harmless for correctness: frames the driver cannot take are dropped on receive.
            self._warn_once("offload", "%s: tap %s refused offloads %#x (%s); receiving without them",
                            self.name, tap.ifname, flags, exc.strerror)
            try:
                tap.set_offload(0)
            except OSError:
                pass

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg + " (further occurrences are counted, not logged)", *args)

    # -- hot-plug --------------------------------------------------------------------------------
    def set_backend(self, tap: Tap | None) -> Future[None]:
        """Attach ``tap`` (the device owns it from now on) or, with None, empty the slot; the old
        tap is closed. Any thread: the swap runs on the I/O thread after the batch in flight;
        the future says when it is done."""
        return self.on_io_thread(lambda: self._swap(tap))

    def _swap(self, tap: Tap | None) -> None:
        with self.lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            old, self._backend = self._backend, tap
            self._warned.clear()
            if tap is not None and self.active:
                self._apply_offload(tap)
            self._update_watch()    # unregisters the old fd before it is closed below
            self._settle_tx()
            self._set_link(tap is not None)
        if old is not None and old is not tap:
            old.close()
        log.info("%s: %s", self.name, f"tap {tap.ifname} attached" if tap is not None else "tap detached")

    def _lose_backend(self, exc: OSError) -> None:  # lock held
        tap = self._backend
        if tap is None:
            return
        log.warning("%s: tap %s failed (%s); the NIC behaves as an empty slot with the link down "
                    "until a tap is attached again", self.name, tap.ifname, exc.strerror or exc)
        self._backend = None
        self._watch(-1, 0)
        tap.close()
        self._set_link(False)

    # -- lifecycle (lock held) -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:
        super().activate(mem, queues, interrupt, features)
        if self._backend is not None:
            self._apply_offload(self._backend)
        self._update_watch()

    def reset(self) -> None:
        self._release_rx()
        self._tx_pending.clear()  # the rings are gone with the reset; nothing to complete
        super().reset()
        self._update_watch()

    def close(self) -> None:
        """Close the tap (the I/O thread is already stopped)."""
        with self.lock:
            self._closed = True
            self._release_rx()
            self._tx_pending.clear()
            tap, self._backend = self._backend, None
            self._watch(-1, 0)
        if tap is not None:
            tap.close()

    # -- state as a value (lock held) -------------------------------------------------------------
    def unfinished_chains(self, index: int) -> int:
        # Both are popped and kept in ring order, so they are the last chains popped.
        if index == RX_QUEUE:
            return len(self._rx_chains)
        if index == TX_QUEUE:
            return len(self._tx_pending)
        return 0

    def save_state(self) -> NetState:
        """The NIC's state (lock held, device quiet)."""
        return NetState(self.save_virtio_state(), self.mac, self._link_up)

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved state (lock held, inactive, after the machine attached the tap)."""
        if not isinstance(state, NetState):
            raise ValueError(f"{self.name} is a NIC; the saved state is a {type(state).__name__}")
        if len(state.mac) != 6:
            raise ValueError(f"{self.name}: a MAC address of {len(state.mac)} bytes")
        self.mac = parse_mac(format_mac(state.mac))
        self._link_up = state.link_up
        self._release_rx()
        self._tx_pending.clear()
        self.restore_virtio_state(state.virtio, mem, interrupt)

    def _release_rx(self) -> None:
        while self._rx_chains:
            self._rx_chains.popleft().release()

    def _update_watch(self) -> None:  # lock held
        """Poll the tap for what is waiting on it: reading while receive chains are cached (the
        back-pressure rule), writing while transmission is blocked, errors always."""
        if self._closed:
            return
        tap = self._backend
        if tap is None or not self.active or self.needs_reset:
            self._watch(-1, 0)
            return
        mask = (EPOLLIN if self._rx_chains else 0) | (EPOLLOUT if self._tx_pending else 0)
        self._watch(tap.fd, mask)

    def _watch(self, fd: int, mask: int) -> None:  # lock held
        """Poll ``fd`` on the I/O thread for ``mask`` (0: errors only), or nothing when ``fd`` is -1."""
        io = self.io
        old_fd, old_mask = self._watched
        if io is None or (fd, mask) == (old_fd, old_mask):
            return
        if fd != old_fd:
            if old_fd >= 0:
                io.unregister(old_fd)
            if fd >= 0:
                io.register(fd, mask, self._on_tap_event)
        elif fd >= 0:
            io.modify(fd, mask)
        self._watched = (fd, mask)

    # -- guest notifications (transport I/O thread, lock held) ------------------------------------
    def process_queue(self, index: int) -> bool:
        try:
            if index == RX_QUEUE:
                self._collect_rx()
                more = False
            elif index == TX_QUEUE:
                more = self._process_tx()
            else:
                more = False
        except BaseException:
            self.needs_reset = True  # the transport logs it and tells the driver; hands off the tap
            try:
                self._update_watch()
            except OSError:
                pass
            raise
        self._update_watch()
        return more

    def _collect_rx(self) -> None:
        """Take every receive chain the driver posted, each with the iovec a frame is read into.
        The usual chain is one buffer (Linux's small-buffer receive): one view of it, taken
        through the queue's view of guest RAM (the walk checked the buffer), and the overflow
        buffer behind it. This runs for every buffer the driver re-posts, so as often as frames
        arrive: it is kept to a few operations."""
        queue = self.queue(RX_QUEUE)
        if queue is None:
            return
        if self._overflow is None:
            self._overflow = memoryview(bytearray(OVERFLOW_SIZE))
        overflow = self._overflow
        view, at = queue.view, queue.host_offset
        append = self._rx_chains.append
        limit = len(overflow)
        while chains := queue.pop_batch(QUEUE_SIZE):
            for head, _readable, writable in chains:
                if len(writable) == 1:
                    addr, cap = writable[0]
                    if cap >= HDR_LEN:
                        buf = view[(off := at(addr)):off + cap]
                        append(_new_rx(_RxChain, (head, cap, writable, [buf], [buf, overflow], cap + limit)))
                        continue
                cap = sum(length for _, length in writable)
                if cap < HDR_LEN:
                    raise QueueError(f"virtio-net receive chain {head} has {cap} writable bytes, "
                                     f"less than the {HDR_LEN}-byte header")
                if len(writable) < IOV_MAX:
                    views = [view[(off := at(addr)):off + length] for addr, length in writable if length]
                    append(_new_rx(_RxChain, (head, cap, writable, views, views + [overflow], cap + limit)))
                else:  # too many pieces for one readv: read into the bounce buffer and scatter
                    append(_new_rx(_RxChain, (head, cap, writable, [], None, OVERFLOW_SIZE)))

    def _process_tx(self) -> bool:
        queue = self.queue(TX_QUEUE)
        if queue is None:
            return False
        blocked = bool(self._tx_pending)
        chains = queue.pop_batch(QUEUE_SIZE if blocked else TX_BATCH)
        self._tx_pending.extend(chains)
        self._flush_tx(queue)
        if self._tx_pending:
            # Blocked: take every chain the driver has announced, so that none waits in the ring
            # for a notification that already came (the poller cannot pop; see module doc).
            while chains := queue.pop_batch(QUEUE_SIZE):
                self._tx_pending.extend(chains)
            return False
        # pop_batch looked at avail->idx again after it asked for the next notification.
        return len(chains) >= TX_BATCH or queue.has_available()

    # -- transmit --------------------------------------------------------------------------------
    def _flush_tx(self, queue: SplitQueue) -> None:  # lock held
        """Send the pending chains in order until the tap would block; the sent ones are
        published together. The usual chain (header and frame in one buffer, Linux's) is
        written straight from the queue's view of guest RAM (the walk checked the buffer)."""
        pending = self._tx_pending
        used: list[tuple[int, int]] = []
        tap = self._backend
        stats = self._stats
        view, at = queue.view, queue.host_offset
        try:
            while pending:
                chain = pending[0]
                readable = chain.readable
                if tap is not None and len(readable) == 1 and readable[0][1] >= HDR_LEN:
                    addr, length = readable[0]
                    try:
                        os.write(tap.fd, view[(off := at(addr)):off + length])
                    except BlockingIOError:
                        break  # the tap would block: EPOLLOUT resumes here
                    except OSError as exc:
                        self._tx_failed(tap, exc, length)
                        tap = self._backend
                    else:
                        stats.tx_packets += 1
                        stats.tx_bytes += length - HDR_LEN
                elif not self._transmit(chain):
                    break
                pending.popleft()
                used.append((chain.head, 0))
        finally:
            if used:
                queue.add_used_batch(used)
        if used:
            self.notify_used(queue)

    def _settle_tx(self) -> None:  # lock held
        """Complete blocked chains as dropped once there is no tap to retry them on."""
        queue = self.queue(TX_QUEUE)
        if self._tx_pending and self._backend is None and self.active and queue is not None:
            self._flush_tx(queue)

    def _transmit(self, chain: DescChain) -> bool:
        """Send one chain's frame; False if the tap would block (the chain stays pending)."""
        length = chain.readable_len
        stats = self._stats
        if length < HDR_LEN:
            stats.tx_errors += 1
            self._warn_once("tx-short", "%s: transmit chain %d has %d bytes, less than the %d-byte "
                            "header; dropped", self.name, chain.head, length, HDR_LEN)
            return True
        tap = self._backend
        if tap is None:
            stats.tx_dropped += 1
            return True
        bufs = [(addr, n) for addr, n in chain.readable if n]
        views = []
        try:
            if len(bufs) <= IOV_MAX:
                views = [self.mem.view(addr, n) for addr, n in bufs]
                os.writev(tap.fd, views)
            else:
                os.write(tap.fd, read_buffers(self.mem, tuple(bufs)))
        except BlockingIOError:
            return False
        except OSError as exc:
            self._tx_failed(tap, exc, length)
            return True
        finally:
            for v in views:
                v.release()
        stats.tx_packets += 1
        stats.tx_bytes += length - HDR_LEN
        return True

    def _tx_failed(self, tap: Tap, exc: OSError, length: int) -> None:  # lock held
        """A frame the tap refused (not EAGAIN): the chain completes, the frame is counted."""
        stats = self._stats
        if exc.errno in _TAP_GONE:
            self._lose_backend(exc)
            stats.tx_dropped += 1
        elif exc.errno == errno.EIO:  # the tap interface is down: no carrier, frame lost
            stats.tx_dropped += 1
            self._warn_once("tx-down", "%s: tap %s is down; transmitted frames are dropped",
                            self.name, tap.ifname)
        else:
            stats.tx_errors += 1
            self._warn_once("tx-error", "%s: tap %s refused a %d-byte frame: %s", self.name,
                            tap.ifname, length - HDR_LEN, exc.strerror)

    # -- tap events (I/O thread) -----------------------------------------------------------------
    def _on_tap_event(self, mask: int) -> None:
        with self.lock:
            if self._closed:
                return
            tap = self._backend
            if tap is not None and self.active and not self.needs_reset:
                if mask & (EPOLLERR | EPOLLHUP) and not tap.attached():
                    self._lose_backend(OSError(errno.EBADFD, "the tap interface was removed"))
                else:
                    queue = self.queue(TX_QUEUE)
                    if mask & EPOLLOUT and self._tx_pending and queue is not None:
                        self._flush_tx(queue)
                    if mask & EPOLLIN and self._rx_chains:
                        self._receive()
                self._settle_tx()
            self._update_watch()

    def _receive(self) -> None:  # lock held
        """Read up to RX_BUDGET frames from the tap into cached receive chains; the chains filled
        are published together, with one interrupt decision."""
        queue = self.queue(RX_QUEUE)
        if queue is None:
            return
        stats = self._stats
        chains = self._rx_chains
        used: list[tuple[int, int]] = []
        readv = os.readv
        budget = RX_BUDGET
        try:
            while chains and budget:
                tap = self._backend
                if tap is None:
                    break
                rx = chains[0]
                iov: Sequence[memoryview | bytearray] | None = rx.iov
                bounce = None
                if iov is None:   # a chain of several buffers: read into the bounce buffer
                    bounce = self._bounce
                    if bounce is None:
                        bounce = self._bounce = bytearray(OVERFLOW_SIZE)
                    iov = [bounce]
                try:
                    n = readv(tap.fd, iov)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._lose_backend(exc)
                    break
                budget -= 1
                if n > rx.cap or n >= rx.limit:
                    stats.rx_oversized += 1
                    self._warn_once("rx-oversized", "%s: dropped a %d-byte frame from tap %s: the "
                                    "guest's receive buffer holds %d", self.name, n - HDR_LEN,
                                    tap.ifname, rx.cap - HDR_LEN)
                    continue
                if n < HDR_LEN:
                    stats.rx_dropped += 1
                    continue
                if bounce is not None:
                    write_buffers(self.mem, rx.bufs, memoryview(bounce)[:n])
                views = rx.views
                first = views[0] if views else None
                if first is not None and len(first) >= HDR_LEN:
                    # The usual layout (header and frame in one buffer): the header in place. A
                    # frame without checksum or segmentation work (flags and gso_type 0) only
                    # needs num_buffers, 1 without MRG_RXBUF (the tap does not write it).
                    if first[0] or first[1]:
                        if not self._fix_rx_header(first):
                            stats.rx_dropped += 1
                            continue
                    else:
                        first[10:12] = b"\x01\x00"
                else:
                    header = bytearray(read_buffers(self.mem, rx.bufs, HDR_LEN))
                    if not self._fix_rx_header(memoryview(header)):
                        stats.rx_dropped += 1
                        continue
                    write_buffers(self.mem, rx.bufs, header)
                chains.popleft()
                used.append((rx.head, n))
                stats.rx_packets += 1
                stats.rx_bytes += n - HDR_LEN
        finally:
            if used:
                queue.add_used_batch(used)
        if used:
            self.notify_used(queue)

    def _fix_rx_header(self, header: memoryview) -> bool:
        """Turn the header the tap wrote (first HDR_LEN bytes of ``header``) into the one the
        driver gets; False when the frame uses an offload the driver did not accept."""
        flags, gso_type = header[0], header[1]
        kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if kind != VIRTIO_NET_HDR_GSO_NONE:
            if not ((kind == VIRTIO_NET_HDR_GSO_TCPV4 and self.negotiated(VIRTIO_NET_F_GUEST_TSO4))
                    or (kind == VIRTIO_NET_HDR_GSO_TCPV6 and self.negotiated(VIRTIO_NET_F_GUEST_TSO6))):
                return False
            if gso_type & VIRTIO_NET_HDR_GSO_ECN and not self.negotiated(VIRTIO_NET_F_GUEST_ECN):
                return False
        if self.negotiated(VIRTIO_NET_F_GUEST_CSUM):
            header[0] = flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)
        elif flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return False  # a partial checksum the driver cannot finish
        else:
            header[0] = 0  # §5.1.6.4.1: flags zero without GUEST_CSUM
        # num_buffers is 1 without MRG_RXBUF; the tap does not write that field at all.
        header[10:12] = b"\x01\x00"
        return True
