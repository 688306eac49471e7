"""Unit tests of the virtio-mmio transport model (no KVM): register semantics, feature
negotiation and the FEATURES_OK refusal, queue set-up, reset, ConfigGeneration, interrupt
status/ack, notification paths, and DEVICE_NEEDS_RESET on malformed queues."""

import os
import select
import time

import pytest

from pystratovirt.devices.bus import Bus
from pystratovirt.memory.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE
from pystratovirt.virtio import mmio as r
from pystratovirt.virtio.device import (
    INT_CONFIG,
    INT_VRING,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    bit,
)
from pystratovirt.virtio.mmio import VirtioMmio, cmdline_entry, slot_resources
from pystratovirt.virtio.mock_driver import VirtioDriver
from virtio.helper import EchoDevice, spied_memory

MEM = 16 << 20


@pytest.fixture
def mem():
    yield from spied_memory(MEM)


@pytest.fixture
def echo(mem):
    dev = EchoDevice()
    t = VirtioMmio(dev, mem, name="echo0")
    t.start()
    yield dev, t, VirtioDriver(t, mem)
    t.close(timeout=5)


def rd(t, reg):
    return t.read(reg, 4)


def wr(t, reg, value):
    t.write(reg, 4, value)


def irq_pending(t, timeout=0.0):
    ready, _, _ = select.select([t.irq_eventfd], [], [], timeout)
    if ready:
        os.eventfd_read(t.irq_eventfd)
    return bool(ready)


def echo_roundtrip(drv, qi=0, payload=b"hello"):
    src = drv.put(payload)
    dst = drv.alloc(len(payload))
    head = drv.submit(qi, [(src, len(payload))], [(dst, len(payload))])
    drv.notify(qi)
    assert drv.wait_used(qi) == [(head, len(payload))]
    return drv.mem.read(dst, len(payload))


# -- identification -------------------------------------------------------------------------------
def test_identification_registers(echo):
    _, t, _ = echo
    assert rd(t, r.MAGIC) == 0x74726976
    assert rd(t, r.VERSION) == 2
    assert rd(t, r.DEVICE_ID) == 0x42
    assert rd(t, r.VENDOR) == 0
    for reg in (r.SHM_LEN_LOW, r.SHM_LEN_HIGH, r.SHM_BASE_LOW, r.SHM_BASE_HIGH):
        assert rd(t, reg) == 0xFFFF_FFFF  # no shared memory regions
    assert rd(t, r.QUEUE_RESET) == 0


def test_narrow_reads_return_register_bytes(echo):
    _, t, _ = echo
    assert t.read(r.MAGIC, 1) == ord("v")
    assert t.read(r.MAGIC + 1, 1) == ord("i")
    assert t.read(r.MAGIC + 2, 2) == int.from_bytes(b"rt", "little")
    assert t.read(r.MAGIC, 8) == 0  # not a width the bus delivers for control registers


def test_on_the_mmio_bus(echo):
    _, t, _ = echo
    bus = Bus("mmio")
    bus.insert(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, t)
    assert bus.read(VIRTIO_MMIO_BASE, 4) == r.MAGIC_VALUE
    assert bus.read(VIRTIO_MMIO_BASE + r.DEVICE_ID, 4) == 0x42


def test_slot_resources_and_cmdline():
    assert slot_resources(0) == (0xF010_0000, 5)
    assert slot_resources(1) == (0xF010_0200, 6)
    assert slot_resources(10) == (0xF010_1400, 15)
    with pytest.raises(ValueError):
        slot_resources(11)
    assert cmdline_entry(0xF010_0000, 5) == "virtio_mmio.device=512@0xf0100000:5"
    assert cmdline_entry(*slot_resources(3)) == "virtio_mmio.device=512@0xf0100600:8"


# -- feature negotiation --------------------------------------------------------------------------
def test_device_features_by_selector(echo):
    dev, t, _ = echo
    wr(t, r.DEVICE_FEATURES_SEL, 0)
    assert rd(t, r.DEVICE_FEATURES) == bit(EchoDevice.FEATURE_X)
    wr(t, r.DEVICE_FEATURES_SEL, 1)
    assert rd(t, r.DEVICE_FEATURES) == 1  # VIRTIO_F_VERSION_1 is bit 32
    wr(t, r.DEVICE_FEATURES_SEL, 2)
    assert rd(t, r.DEVICE_FEATURES) == 0


def negotiate(t, features):
    wr(t, r.STATUS, 0)
    wr(t, r.STATUS, STATUS_ACKNOWLEDGE)
    wr(t, r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    wr(t, r.DRIVER_FEATURES_SEL, 0)
    wr(t, r.DRIVER_FEATURES, features & 0xFFFF_FFFF)
    wr(t, r.DRIVER_FEATURES_SEL, 1)
    wr(t, r.DRIVER_FEATURES, features >> 32)
    wr(t, r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    return rd(t, r.STATUS)


def test_features_ok_accepted_for_a_subset(echo):
    _, t, _ = echo
    assert negotiate(t, bit(VIRTIO_F_VERSION_1)) & STATUS_FEATURES_OK
    assert negotiate(t, bit(VIRTIO_F_VERSION_1) | bit(EchoDevice.FEATURE_X)) & STATUS_FEATURES_OK


def test_features_ok_refused_for_unoffered_bit(echo):
    _, t, _ = echo
    status = negotiate(t, bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX))  # echo does not offer it
    assert not status & STATUS_FEATURES_OK
    assert status & STATUS_DRIVER


def test_features_ok_refused_without_version_1(echo):
    _, t, _ = echo
    assert not negotiate(t, bit(EchoDevice.FEATURE_X)) & STATUS_FEATURES_OK


def test_driver_features_frozen_after_features_ok(echo):
    dev, t, drv = echo
    drv.initialize()
    wr(t, r.DRIVER_FEATURES_SEL, 0)
    wr(t, r.DRIVER_FEATURES, 0xFFFF_FFFF)  # ignored
    assert dev.state.features == bit(VIRTIO_F_VERSION_1) | bit(EchoDevice.FEATURE_X)


# -- queue set-up and activation ------------------------------------------------------------------
def test_queue_registers(echo):
    _, t, _ = echo
    wr(t, r.QUEUE_SEL, 0)
    assert rd(t, r.QUEUE_NUM_MAX) == 16
    assert rd(t, r.QUEUE_READY) == 0
    wr(t, r.QUEUE_SEL, 1)
    assert rd(t, r.QUEUE_NUM_MAX) == 8
    wr(t, r.QUEUE_SEL, 2)
    assert rd(t, r.QUEUE_NUM_MAX) == 0  # no such queue
    wr(t, r.QUEUE_READY, 1)  # ignored for a missing queue
    assert rd(t, r.QUEUE_READY) == 0
    wr(t, r.QUEUE_SEL, 0)
    wr(t, r.QUEUE_READY, 1)
    assert rd(t, r.QUEUE_READY) == 1


def test_full_initialisation_and_echo(echo):
    dev, t, drv = echo
    features = drv.initialize()
    assert features == bit(VIRTIO_F_VERSION_1) | bit(EchoDevice.FEATURE_X)
    assert rd(t, r.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    assert dev.active and dev.activations == 1
    assert echo_roundtrip(drv, 0, b"queue zero") == b"queue zero"
    assert echo_roundtrip(drv, 1, b"queue one") == b"queue one"
    assert dev.processed == 2


def test_queue_config_writes_ignored_while_ready(echo):
    dev, t, drv = echo
    drv.initialize()
    q = drv.queues[0]
    wr(t, r.QUEUE_SEL, 0)
    wr(t, r.QUEUE_NUM, 4)
    wr(t, r.QUEUE_DESC_LOW, 0x1234_0000)
    assert dev.state.queues[0].size == 16 and dev.state.queues[0].desc_addr == q.desc
    assert echo_roundtrip(drv) == b"hello"


def test_requests_before_start_are_served_once_started(mem):
    dev = EchoDevice()
    t = VirtioMmio(dev, mem)
    drv = VirtioDriver(t, mem)
    try:
        drv.initialize()
        src, dst = drv.put(b"early"), drv.alloc(5)
        drv.submit(0, [(src, 5)], [(dst, 5)])
        drv.notify(0)
        time.sleep(0.05)
        assert dev.processed == 0  # no I/O thread yet: nothing runs on the "vCPU"
        t.start()
        drv.wait_used(0)
        assert mem.read(dst, 5) == b"early"
    finally:
        t.close(timeout=5)


def test_kvm_style_notification_through_the_eventfd(echo):
    dev, t, drv = echo
    drv.initialize()
    fds = t.notify_eventfds()
    assert [i for _, i in fds] == [0, 1]
    src, dst = drv.put(b"via eventfd"), drv.alloc(11)
    drv.submit(1, [(src, 11)], [(dst, 11)])
    os.eventfd_write(dict((i, fd) for fd, i in fds)[1], 1)  # what KVM does on a matched write
    drv.wait_used(1)
    assert mem_read(drv, dst, 11) == b"via eventfd"


def mem_read(drv, addr, n):
    return drv.mem.read(addr, n)


def test_notify_for_unknown_queue_is_ignored(echo):
    dev, t, drv = echo
    drv.initialize()
    wr(t, r.QUEUE_NOTIFY, 7)
    wr(t, r.QUEUE_NOTIFY, 0xFFFF_FFFF)
    assert echo_roundtrip(drv) == b"hello"


def test_queue_ready_zero_stops_the_queue(echo):
    dev, t, drv = echo
    drv.initialize()
    wr(t, r.QUEUE_SEL, 1)
    wr(t, r.QUEUE_READY, 0)
    assert rd(t, r.QUEUE_READY) == 0
    src, dst = drv.put(b"x"), drv.alloc(1)
    drv.submit(1, [(src, 1)], [(dst, 1)])
    drv.notify(1)
    time.sleep(0.05)
    assert drv.take_used(1) == []
    assert echo_roundtrip(drv, 0) == b"hello"


def test_unready_queue_is_not_handed_to_the_device(echo):
    dev, t, drv = echo
    wr(t, r.STATUS, 0)
    negotiate(t, bit(VIRTIO_F_VERSION_1))
    drv.queues = [drv.setup_queue(0, 16)]  # queue 1 never set up
    wr(t, r.STATUS, rd(t, r.STATUS) | STATUS_DRIVER_OK)
    assert dev.active and dev.state.queues[1] is None
    assert echo_roundtrip(drv) == b"hello"


def test_writes_narrower_than_32_bits_to_control_registers_are_ignored(echo):
    dev, t, drv = echo
    t.write(r.STATUS, 1, STATUS_ACKNOWLEDGE)
    t.write(r.STATUS + 1, 1, 0xFF)
    assert rd(t, r.STATUS) == 0
    t.write(r.STATUS + 2, 4, 1)  # unaligned
    assert rd(t, r.STATUS) == 0


# -- status, reset --------------------------------------------------------------------------------
def test_reset_clears_everything(echo):
    dev, t, drv = echo
    drv.initialize()
    echo_roundtrip(drv)
    dev.set_counter(1)  # a pending, unacknowledged config interrupt
    assert rd(t, r.INTERRUPT_STATUS) & INT_CONFIG
    wr(t, r.STATUS, 0)
    assert rd(t, r.STATUS) == 0
    assert rd(t, r.INTERRUPT_STATUS) == 0
    for qi in (0, 1):
        wr(t, r.QUEUE_SEL, qi)
        assert rd(t, r.QUEUE_READY) == 0
    assert not dev.active and dev.resets >= 1 and dev.state is None
    # and the device comes back
    drv.initialize()
    assert echo_roundtrip(drv, 0, b"again") == b"again"


def test_driver_cannot_set_needs_reset(echo):
    _, t, _ = echo
    wr(t, r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET)
    assert rd(t, r.STATUS) == STATUS_ACKNOWLEDGE


def test_driver_ok_without_features_ok_needs_reset(echo):
    dev, t, _ = echo
    wr(t, r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert rd(t, r.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert not dev.active
    assert rd(t, r.INTERRUPT_STATUS) & INT_CONFIG


# -- config space and generation ------------------------------------------------------------------
def test_config_space_any_width(echo):
    dev, t, _ = echo
    dev.set_counter(0x1122_3344)
    assert t.read(r.CONFIG + 4, 4) == 0x1122_3344
    assert t.read(r.CONFIG + 4, 1) == 0x44
    assert t.read(r.CONFIG + 5, 2) == 0x2233
    assert t.read(r.CONFIG, 8) == 0x1122_3344 << 32
    assert t.read(r.CONFIG + 100, 4) == 0  # past the device's config


def test_config_generation_changes_with_config(echo):
    dev, t, drv = echo
    drv.initialize()
    g0 = rd(t, r.CONFIG_GENERATION)
    dev.set_counter(1)
    g1 = rd(t, r.CONFIG_GENERATION)
    assert g1 != g0
    t.write(r.CONFIG, 4, 77)  # a driver-written field also changes the generation
    assert rd(t, r.CONFIG_GENERATION) != g1
    assert t.read(r.CONFIG, 4) == 77


def test_config_change_interrupt_only_when_active(echo):
    dev, t, drv = echo
    irq_pending(t)
    dev.set_counter(5)  # driver not initialised yet: no interrupt, but the generation moves
    assert not irq_pending(t, 0.05)
    assert rd(t, r.INTERRUPT_STATUS) == 0
    drv.initialize()
    dev.set_counter(6)
    assert irq_pending(t, 1)
    assert rd(t, r.INTERRUPT_STATUS) == INT_CONFIG


# -- interrupts -----------------------------------------------------------------------------------
def test_interrupt_status_and_ack(echo):
    dev, t, drv = echo
    drv.initialize()
    src, dst = drv.put(b"i"), drv.alloc(1)
    drv.submit(0, [(src, 1)], [(dst, 1)])
    irq_pending(t)
    drv.notify(0)
    assert irq_pending(t, 5)
    deadline = time.monotonic() + 5
    while not rd(t, r.INTERRUPT_STATUS) & INT_VRING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert rd(t, r.INTERRUPT_STATUS) == INT_VRING
    dev.set_counter(9)
    assert rd(t, r.INTERRUPT_STATUS) == INT_VRING | INT_CONFIG
    wr(t, r.INTERRUPT_ACK, INT_VRING)
    assert rd(t, r.INTERRUPT_STATUS) == INT_CONFIG
    wr(t, r.INTERRUPT_ACK, INT_CONFIG)
    assert rd(t, r.INTERRUPT_STATUS) == 0


def test_interrupt_status_is_read_only(echo):
    dev, t, drv = echo
    drv.initialize()
    wr(t, r.INTERRUPT_STATUS, 3)
    assert rd(t, r.INTERRUPT_STATUS) == 0


# -- DEVICE_NEEDS_RESET ---------------------------------------------------------------------------
def wait_needs_reset(t, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rd(t, r.STATUS) & STATUS_DEVICE_NEEDS_RESET:
            return True
        time.sleep(0.002)
    return False


def test_malformed_queue_sets_needs_reset_and_stops_the_device(echo, caplog):
    dev, t, drv = echo
    drv.initialize()
    wr(t, r.INTERRUPT_ACK, 3)
    irq_pending(t)
    drv.submit(0, [], [(MEM + 0x1000, 16)])  # a buffer outside guest RAM
    drv.notify(0)
    assert wait_needs_reset(t)
    assert t.needs_reset
    assert rd(t, r.INTERRUPT_STATUS) & INT_CONFIG
    assert irq_pending(t, 1)
    assert sum("needs a reset" in rec.message for rec in caplog.records) == 1
    # Further notifications are ignored, even for well-formed chains on another queue.
    src, dst = drv.put(b"z"), drv.alloc(1)
    drv.submit(1, [(src, 1)], [(dst, 1)])
    drv.notify(1)
    drv.notify(0)
    time.sleep(0.05)
    assert drv.take_used(1) == [] and dev.processed == 0
    assert sum("needs a reset" in rec.message for rec in caplog.records) == 1  # logged once
    # A reset brings it back.
    drv.initialize()
    assert not rd(t, r.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert echo_roundtrip(drv) == b"hello"


def test_device_level_error_sets_needs_reset(echo):
    dev, t, drv = echo
    drv.initialize()
    src = drv.put(b"no writable buffer")
    drv.submit(0, [(src, 18)], [])
    drv.notify(0)
    assert wait_needs_reset(t)


def test_bad_ring_address_at_driver_ok_sets_needs_reset(echo):
    dev, t, drv = echo
    negotiate(t, bit(VIRTIO_F_VERSION_1))
    wr(t, r.QUEUE_SEL, 0)
    wr(t, r.QUEUE_NUM, 16)
    wr(t, r.QUEUE_DESC_LOW, 0)
    wr(t, r.QUEUE_DESC_HIGH, 0x10)  # 64 GiB: not RAM
    wr(t, r.QUEUE_READY, 1)
    wr(t, r.STATUS, rd(t, r.STATUS) | STATUS_DRIVER_OK)
    assert rd(t, r.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert not dev.active


def test_non_power_of_two_queue_size_sets_needs_reset(echo):
    dev, t, drv = echo
    negotiate(t, bit(VIRTIO_F_VERSION_1))
    drv.queues = [drv.setup_queue(0, 16)]
    wr(t, r.QUEUE_SEL, 1)
    wr(t, r.QUEUE_NUM, 6)
    wr(t, r.QUEUE_READY, 1)
    wr(t, r.STATUS, rd(t, r.STATUS) | STATUS_DRIVER_OK)
    assert rd(t, r.STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_device_bug_is_contained(echo, caplog):
    dev, t, drv = echo
    drv.initialize()

    def broken(index):
        raise RuntimeError("model bug")
    dev.process_queue = broken
    drv.notify(0)
    assert wait_needs_reset(t)
    assert any("device failed" in rec.message for rec in caplog.records)


# -- shutdown ------------------------------------------------------------------------------------
def test_close_joins_the_io_thread(mem):
    dev = EchoDevice()
    t = VirtioMmio(dev, mem, name="joinme")
    t.start()
    assert t.io.running
    t.close(timeout=5)
    assert not t.io.running
    t.close()  # idempotent
    t.write(r.QUEUE_NOTIFY, 4, 0)  # a late vCPU write after close does not crash


def test_kvm_attach_registers_ioeventfds_and_irqfd(echo):
    _, t, _ = echo
    calls = []

    class FakeVm:
        def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
            calls.append(("ioeventfd", fd, addr, length, datamatch, deassign))

        def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
            calls.append(("irqfd", fd, gsi, deassign))

    base, irq = slot_resources(2)
    t.kvm_attach(FakeVm(), base, irq)
    (fd0, _), (fd1, _) = t.notify_eventfds()
    assert calls == [("ioeventfd", fd0, base + 0x50, 4, 0, False), ("ioeventfd", fd1, base + 0x50, 4, 1, False),
                     ("irqfd", t.irq_eventfd, 7, False)]
    calls.clear()
    t.kvm_detach(FakeVm(), base, irq)
    assert [c[-1] for c in calls] == [True, True, True]
