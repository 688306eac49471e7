"""virtio-console (device id 3, virtio 1.x §5.3) with one port, port 0, on a host chardev.

Owns: the console device model -- receiveq 0 (host to guest) and transmitq 1 (guest to host),
no control queues -- its config space and features, and moving bytes between guest buffers and
a :class:`~pystratovirt.devices.chardev.Chardev`.

One port. VIRTIO_CONSOLE_F_MULTIPORT is not offered, so the device has exactly port 0 and its
two queues; Linux's virtio_console makes it a console of its own (hvc0 for the first such
device), which is what ``console=hvc0`` names. StratoVirt's ``virtconsole,nr=N`` with N other
than 0 needs multiport and is refused by the machine. VIRTIO_CONSOLE_F_SIZE and EMERG_WRITE are
not offered either (the config space reads as zeros: cols, rows, max_nr_ports, emerg_wr).

Guest to host: each transmit chain's device-readable bytes are handed to the chardev, which
never blocks (it buffers a bounded amount and drops the rest, counting it; see chardev.py), so a
host that stops reading cannot stall the guest's console or the VMM. At most
:data:`MAX_TX_CHAIN` bytes of one chain are forwarded (Linux sends at most a few pages); the
rest is counted as dropped. The chain is returned with length 0 (nothing was written into it).

Host to guest, with back-pressure: every receive chain the driver posts is popped and kept
(``process_queue`` on receiveq); while at least one is kept the chardev is polled for input,
and as input arrives it fills the oldest chain (up to its writable length) and returns it. With
no receive chain kept the chardev is not read, so the host's bytes wait in its own buffers (the
socket's, the pty's) instead of being read and lost.

Threading (see device.py): everything runs on the device's I/O thread. The chardev is attached
to that thread when the transport gives it (:meth:`attach_io`), so a socket accepts clients
before the guest's driver is up. Only :meth:`process_queue` pops chains; chardev input only
consumes chains already popped and validated, under ``self.lock``.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..devices.chardev import Chardev
from ..memory.guest import GuestMemory
from ..util.eventloop import EventLoop
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, Interrupt, VirtioDevice, VirtioState, bit
from .queue import DescChain, SplitQueue, write_buffers

log = logging.getLogger(__name__)

VIRTIO_ID_CONSOLE = 3
RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256

# Feature bits (spec §5.3.3), none of them offered; see the module docstring.
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
CONFIG = struct.Struct("<HHII")

#: Bytes of one transmit chain forwarded at most.
MAX_TX_CHAIN = 1 << 20
#: Bytes read from the chardev into one receive chain at most.
MAX_RX_CHUNK = 64 * 1024
# Chains handled per lock hold, so a reset waiting on the lock gets its turn.
BATCH = 64


@dataclass
class ConsoleStats:
    """Bytes the guest sent (``tx_bytes``; ``tx_dropped`` of them beyond a chain's limit) and
    bytes the guest received (``rx_bytes``). What the chardev itself dropped is its own count."""

    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_bytes: int = 0


@dataclass(frozen=True)
class ConsoleState:
    """virtio-console as a value (for snapshots): the virtio base state (the config space is
    all zeros: nothing offered). The receive buffers the driver posted and the device keeps are
    given back to the ring (:meth:`VirtioConsole.unfinished_chains`) and kept again after the
    restore, so host input reaches the guest. The chardev is host-side: the restored device has
    the new command line's (a new socket, pty or file); bytes it held -- output not yet taken by
    the host, input not yet given to the guest -- belong to the old process and are not saved."""

    virtio: VirtioState


class VirtioConsole(VirtioDevice):
    """A virtio-console with port 0 on ``chardev`` (the device owns it from now on)."""

    device_id = VIRTIO_ID_CONSOLE
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, chardev: Chardev, *, name: str = "console"):
        super().__init__(name)
        self.chardev = chardev
        self._rx_chains: deque[DescChain] = deque()
        self._stats = ConsoleStats()
        self._closed = False
        self._logged: set[str] = set()
        self._config = bytearray(CONFIG.size)

    def device_features(self) -> int:
        return super().device_features() | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)

    @property
    def stats(self) -> ConsoleStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    @property
    def receive_buffers(self) -> int:
        """Receive chains the driver posted that wait for host input."""
        return len(self._rx_chains)

    # -- lifecycle -------------------------------------------------------------------------------
    def attach_io(self, io: EventLoop) -> None:
        super().attach_io(io)
        self.chardev.attach(io, self._on_input)

    def activate(self, mem: GuestMemory, queues: Sequence[SplitQueue | None], interrupt: Interrupt,
                 features: int) -> None:  # lock held
        super().activate(mem, queues, interrupt, features)
        log.info("%s: driver ready on chardev %s (%s)", self.name, self.chardev.id, self.chardev.kind)

    def reset(self) -> None:  # lock held
        self._rx_chains.clear()   # the rings are gone with the reset: nothing to return
        self.chardev.want_input(False)
        super().reset()

    def close(self) -> None:
        """Close the chardev (the I/O thread is already stopped)."""
        with self.lock:
            self._closed = True
            self._rx_chains.clear()
        self.chardev.close()
        s, c = self._stats, self.chardev.stats
        log.info("%s: guest sent %d bytes (%d beyond a chain's limit), received %d; chardev %s took "
                 "%d, dropped %d", self.name, s.tx_bytes, s.tx_dropped, s.rx_bytes, self.chardev.id,
                 c.bytes_out, c.dropped)

    # -- state as a value (lock held) -------------------------------------------------------------
    def unfinished_chains(self, index: int) -> int:
        # Receive chains are filled oldest first, so the kept ones are the last ones popped;
        # transmit chains are completed as they are popped.
        return len(self._rx_chains) if index == RX_QUEUE else 0

    def save_state(self) -> ConsoleState:
        """The device's state (lock held, device quiet)."""
        return ConsoleState(self.save_virtio_state())

    def restore_state(self, state: object, mem: GuestMemory, interrupt: Interrupt) -> None:
        """Take back a saved state (lock held, inactive, I/O thread not started); the receive
        buffers are popped and kept again when the machine notifies the queue."""
        if not isinstance(state, ConsoleState):
            raise ValueError(f"{self.name} is a console; the saved state is a {type(state).__name__}")
        self.restore_virtio_state(state.virtio, mem, interrupt)

    # -- guest notifications (I/O thread, lock held) ---------------------------------------------
    def process_queue(self, index: int) -> bool:
        queue = self.queue(index)
        if queue is None:
            return False
        if index == RX_QUEUE:
            while (chain := queue.pop()) is not None:
                self._rx_chains.append(chain)
            self._receive(queue)
            return False
        if index == TX_QUEUE:
            return self._transmit(queue)
        return False

    def _transmit(self, queue: SplitQueue) -> bool:
        handled = 0
        while handled < BATCH:
            chain = queue.pop()
            if chain is None:
                break
            self._send(chain)
            queue.add_used(chain.head, 0)
            handled += 1
        if handled:
            self.notify_used(queue)
        return handled >= BATCH

    def _send(self, chain: DescChain) -> None:
        left = MAX_TX_CHAIN
        for addr, length in chain.readable:
            take = min(length, left)
            if take:
                view = self.mem.view(addr, take)
                try:
                    self.chardev.write(view)
                finally:
                    view.release()
                left -= take
            self._stats.tx_bytes += take
            self._stats.tx_dropped += length - take
        if chain.readable_len > MAX_TX_CHAIN:
            self._once("tx-long", "%s: a transmit chain of %d bytes: bytes beyond %d were dropped",
                       self.name, chain.readable_len, MAX_TX_CHAIN)

    # -- host input (I/O thread) -----------------------------------------------------------------
    def _on_input(self) -> None:
        with self.lock:
            if self._closed:
                return
            queue = self.queue(RX_QUEUE)
            if queue is None or self.needs_reset:
                self.chardev.want_input(False)
                return
            self._receive(queue)

    def _receive(self, queue: SplitQueue) -> None:  # lock held
        """Fill kept receive chains from the chardev as far as it has input; poll it for more
        only while chains are kept."""
        delivered = 0
        while self._rx_chains and delivered < BATCH:
            chain = self._rx_chains[0]
            room = min(chain.writable_len, MAX_RX_CHUNK)
            if room == 0:
                self._once("rx-empty", "%s: receive chain %d has no device-writable bytes; "
                           "returned empty", self.name, chain.head)
                self._rx_chains.popleft()
                queue.add_used(chain.head, 0)
                delivered += 1
                continue
            data = self.chardev.read(room)
            if not data:
                break
            n = write_buffers(self.mem, chain.writable, data)
            self._rx_chains.popleft()
            queue.add_used(chain.head, n)
            self._stats.rx_bytes += n
            delivered += 1
        if delivered:
            self.notify_used(queue)
        self.chardev.want_input(bool(self._rx_chains) and not self.needs_reset)

    def _once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg + " (logged once)", *args)
