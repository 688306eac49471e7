"""Unit tests of the split virtqueue model (no KVM): chains, indirect tables, used ring,
EVENT_IDX / NO_INTERRUPT notification rules with wrap-around, and hostile rings."""

import pytest

from pystratovirt.virtio.queue import (
    DescChain,
    QueueError,
    SplitQueue,
    read_buffers,
    split_buffers,
    vring_need_event,
    write_buffers,
)
from virtio.helper import INDIRECT, NEXT, WRITE, Ring, spied_memory

RAM = 1 << 20


@pytest.fixture
def mem():
    yield from spied_memory(RAM)


def make(mem, size=8, *, event_idx=False, indirect=True):
    ring = Ring(mem, size)
    q = SplitQueue(mem, size, ring.desc, ring.avail, ring.used, event_idx=event_idx, indirect=indirect)
    return ring, q


# -- normal operation -----------------------------------------------------------------------------
def test_empty_ring_pops_nothing(mem):
    _, q = make(mem)
    assert q.pop() is None
    assert q.pending() == 0


def test_simple_chain_and_used_ring(mem):
    ring, q = make(mem)
    ring.set_desc(0, 0x10000, 16, NEXT, 1)
    ring.set_desc(1, 0x11000, 512, NEXT | WRITE, 2)
    ring.set_desc(2, 0x12000, 1, WRITE)
    ring.push(0)
    assert q.pending() == 1
    chain = q.pop()
    assert chain == DescChain(0, ((0x10000, 16),), ((0x11000, 512), (0x12000, 1)))
    assert chain.readable_len == 16 and chain.writable_len == 513
    assert q.pop() is None
    q.add_used(chain.head, 513)
    assert ring.used_idx() == 1
    assert ring.used_elem(0) == (0, 513)


def test_chains_in_ring_order_and_used_wraps_slots(mem):
    ring, q = make(mem, size=4)
    for _ in range(3):  # 12 chains through a 4-entry ring
        for i in range(4):
            ring.set_desc(i, 0x10000 + i * 0x100, 8 + i, WRITE)
            ring.push(3 - i)
        heads = [q.pop().head for _ in range(4)]
        assert heads == [3, 2, 1, 0]
        assert q.pop() is None
        for h in heads:
            q.add_used(h, 1)
    assert ring.used_idx() == 12
    assert [ring.used_elem(s)[0] for s in range(8, 12)] == [3, 2, 1, 0]


def test_avail_index_wraps_at_65536(mem):
    ring, q = make(mem, size=4)
    # A queue that has been running for a while: indices just below the wrap.
    q.last_avail_idx = q._avail_shadow = 0xFFFE
    q.used_idx = 0xFFFE
    ring.avail_idx = 0xFFFE
    ring.set_desc(0, 0x10000, 4, WRITE)
    for _ in range(4):
        ring.push(0)
    assert ring.avail_idx == 2
    assert q.pending() == 4
    for _ in range(4):
        chain = q.pop()
        assert chain.head == 0
        q.add_used(0, 4)
    assert q.pop() is None
    assert q.last_avail_idx == 2 and ring.used_idx() == 2


def test_chain_as_long_as_the_queue_is_accepted(mem):
    ring, q = make(mem, size=8)
    for i in range(8):
        ring.set_desc(i, 0x10000 + 16 * i, 16, NEXT if i < 7 else 0, i + 1)
    ring.push(0)
    assert len(q.pop().readable) == 8


def test_zero_length_buffers_are_kept(mem):
    ring, q = make(mem)
    ring.set_desc(0, 0x10000, 0, NEXT, 1)
    ring.set_desc(1, RAM, 0, WRITE)  # zero bytes at the very end of RAM: still inside
    ring.push(0)
    chain = q.pop()
    assert chain.readable == ((0x10000, 0),) and chain.writable == ((RAM, 0),)


# -- indirect descriptors -------------------------------------------------------------------------
def test_indirect_table(mem):
    ring, q = make(mem)
    table = 0x8000
    ring.set_desc(0, 0x10000, 16, NEXT, 2, table=table)
    ring.set_desc(2, 0x11000, 4096, NEXT | WRITE, 1, table=table)
    ring.set_desc(1, 0x12000, 1, WRITE, table=table)
    ring.set_desc(5, table, 48, INDIRECT | WRITE)  # WRITE on the table descriptor is ignored
    ring.push(5)
    chain = q.pop()
    assert chain.head == 5
    assert chain.readable == ((0x10000, 16),)
    assert chain.writable == ((0x11000, 4096), (0x12000, 1))


def test_direct_descriptors_then_one_indirect(mem):
    ring, q = make(mem)
    table = 0x8000
    ring.set_desc(0, 0x10000, 16, NEXT, 1)
    ring.set_desc(1, table, 32, INDIRECT)
    ring.set_desc(0, 0x11000, 512, NEXT, 1, table=table)
    ring.set_desc(1, 0x12000, 1, WRITE, table=table)
    ring.push(0)
    chain = q.pop()
    assert chain.readable == ((0x10000, 16), (0x11000, 512))
    assert chain.writable == ((0x12000, 1),)


def test_indirect_table_longer_than_queue(mem):
    ring, q = make(mem, size=2)
    table = 0x8000
    for i in range(20):
        ring.set_desc(i, 0x10000 + 16 * i, 16, NEXT if i < 19 else WRITE, i + 1, table=table)
    ring.set_desc(0, table, 20 * 16, INDIRECT)
    ring.push(0)
    assert len(q.pop().readable) == 19


@pytest.mark.parametrize("case", ["not_negotiated", "with_next", "nested", "len_zero", "len_unaligned",
                                  "outside_ram", "huge", "loop", "next_out_of_table"])
def test_bad_indirect_tables(mem, case):
    ring, q = make(mem, indirect=case != "not_negotiated")
    table = 0x8000
    ring.set_desc(0, 0x10000, 8, WRITE, table=table)
    desc = dict(addr=table, length=16, flags=INDIRECT, nxt=0)
    if case == "with_next":
        desc["flags"] |= NEXT
        ring.set_desc(1, 0x10000, 1, WRITE)
        desc["nxt"] = 1
    elif case == "nested":
        ring.set_desc(0, 0x9000, 16, INDIRECT, table=table)
        ring.set_desc(0, 0x10000, 8, WRITE, table=0x9000)
    elif case == "len_zero":
        desc["length"] = 0
    elif case == "len_unaligned":
        desc["length"] = 24
    elif case == "outside_ram":
        desc["addr"] = RAM - 16
        desc["length"] = 32
    elif case == "huge":
        desc["length"] = 0xFFFF_FFF0
    elif case == "loop":
        desc["length"] = 32
        ring.set_desc(0, 0x10000, 8, NEXT, 1, table=table)
        ring.set_desc(1, 0x10000, 8, NEXT, 0, table=table)
    elif case == "next_out_of_table":
        ring.set_desc(0, 0x10000, 8, NEXT, 1, table=table)  # table has one entry
    ring.set_desc(0, desc["addr"], desc["length"], desc["flags"], desc["nxt"])
    ring.push(0)
    with pytest.raises(QueueError):
        q.pop()


# -- hostile main tables --------------------------------------------------------------------------
def test_self_loop(mem):
    ring, q = make(mem)
    ring.set_desc(3, 0x10000, 8, NEXT, 3)
    ring.push(3)
    with pytest.raises(QueueError, match="loop"):
        q.pop()


def test_two_descriptor_loop(mem):
    ring, q = make(mem)
    ring.set_desc(0, 0x10000, 8, NEXT, 1)
    ring.set_desc(1, 0x10000, 8, NEXT, 0)
    ring.push(0)
    with pytest.raises(QueueError):
        q.pop()


def test_next_out_of_range(mem):
    ring, q = make(mem, size=8)
    ring.set_desc(0, 0x10000, 8, NEXT, 8)
    ring.push(0)
    with pytest.raises(QueueError, match="past the table"):
        q.pop()


def test_head_out_of_range(mem):
    ring, q = make(mem, size=8)
    ring.push(200)
    with pytest.raises(QueueError):
        q.pop()


@pytest.mark.parametrize("addr,length", [(RAM, 1), (RAM - 4, 8), (0, 0xFFFF_FFFF), (2**64 - 1, 1),
                                         (2**64 - 16, 32), (0xC000_0000, 16)])
def test_buffer_outside_ram(mem, addr, length):
    ring, q = make(mem)
    ring.set_desc(0, addr, length, WRITE)
    ring.push(0)
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.pop()


def test_readable_after_writable_is_malformed(mem):
    ring, q = make(mem)
    ring.set_desc(0, 0x10000, 8, NEXT | WRITE, 1)
    ring.set_desc(1, 0x11000, 8, 0)
    ring.push(0)
    with pytest.raises(QueueError):
        q.pop()


def test_avail_index_too_far_ahead(mem):
    ring, q = make(mem, size=8)
    ring.set_desc(0, 0x10000, 8, WRITE)
    ring.publish(9)
    with pytest.raises(QueueError, match="ahead"):
        q.pop()


def test_avail_index_exactly_a_full_ring_is_fine(mem):
    ring, q = make(mem, size=8)
    ring.set_desc(0, 0x10000, 8, WRITE)
    for _ in range(8):
        ring.push(0)
    assert q.pending() == 8


def test_avail_index_moving_backwards_is_malformed(mem):
    ring, q = make(mem, size=8)
    ring.set_desc(0, 0x10000, 8, WRITE)
    ring.push(0)
    ring.push(0)
    q.pop()
    q.pop()
    ring.publish(1)  # "unexposes" a buffer: looks like 65535 new entries
    with pytest.raises(QueueError):
        q.pop()


@pytest.mark.parametrize("size", [0, 3, 6, 65536, 32768 * 2])
def test_bad_queue_sizes(mem, size):
    with pytest.raises(QueueError, match="power of two"):
        SplitQueue(mem, size, 0x1000, 0x2000, 0x3000)


@pytest.mark.parametrize("desc,avail,used,match", [
    (0x1008, 0x2000, 0x3000, "descriptor table.*aligned"),
    (0x1000, 0x2001, 0x3000, "available ring.*aligned"),
    (0x1000, 0x2000, 0x3002, "used ring.*aligned"),
    (RAM - 16, 0x2000, 0x3000, "descriptor table.*outside"),
    (0x1000, RAM - 4, 0x3000, "available ring.*outside"),
    (0x1000, 0x2000, RAM - 8, "used ring.*outside"),
    (0x1000, 0x2000, 2**64 - 4, "used ring.*outside"),
])
def test_bad_ring_layout(mem, desc, avail, used, match):
    with pytest.raises(QueueError, match=match):
        SplitQueue(mem, 8, desc, avail, used)


def test_max_queue_size_fits_when_ram_allows(mem):
    q = SplitQueue(mem, 32768, 0x10000, 0x90000, 0xA1000)
    assert q.pop() is None


# -- notification rules ---------------------------------------------------------------------------
def brute_need_event(event, new, old):
    """Reference: did the index pass through ``event`` stepping from old to new?"""
    i = old
    while i != new:
        if i == event:
            return True
        i = (i + 1) & 0xFFFF
    return False


@pytest.mark.parametrize("event,new,old", [(0, 1, 0), (0, 2, 1), (5, 6, 4), (5, 5, 4), (0xFFFF, 0, 0xFFFE),
                                           (0xFFFF, 1, 0xFFFD), (0, 1, 0xFFFF), (1, 1, 0xFFFF),
                                           (7, 7, 7), (0xFFFE, 3, 0xFFF0), (4, 3, 0xFFF0)])
def test_vring_need_event_matches_reference(event, new, old):
    assert vring_need_event(event, new, old) == brute_need_event(event, new, old)


def test_no_interrupt_flag_without_event_idx(mem):
    ring, q = make(mem)
    ring.set_desc(0, 0x10000, 8, WRITE)
    ring.push(0)
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing new since
    ring.set_flags(1)
    ring.push(0)
    q.add_used(q.pop().head, 0)
    assert not q.needs_notification()
    ring.set_flags(0)
    ring.push(0)
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()


def test_event_idx_used_event(mem):
    ring, q = make(mem, event_idx=True)
    ring.set_desc(0, 0x10000, 8, WRITE)
    ring.set_flags(1)  # ignored with EVENT_IDX
    for _ in range(4):
        ring.push(0)
    ring.set_used_event(2)  # "interrupt me when entry 2 is used"
    q.add_used(q.pop().head, 0)
    assert q.needs_notification()  # first decision: nothing known yet, so notify
    q.add_used(q.pop().head, 0)   # used idx 1 -> 2: entry 1 written
    assert not q.needs_notification()
    q.add_used(q.pop().head, 0)   # entry 2 written
    assert q.needs_notification()
    q.add_used(q.pop().head, 0)   # entry 3; used_event still 2
    assert not q.needs_notification()


def test_event_idx_batch_crossing_used_event(mem):
    ring, q = make(mem, size=8, event_idx=True)
    ring.set_desc(0, 0x10000, 8, WRITE)
    q.needs_notification()  # settle the "first decision"
    for _ in range(6):
        ring.push(0)
    ring.set_used_event(3)
    for _ in range(6):
        q.add_used(q.pop().head, 0)  # entries 0..5 in one batch, 3 among them
    assert q.needs_notification()


def test_event_idx_wraparound(mem):
    ring, q = make(mem, size=4, event_idx=True)
    q.last_avail_idx = q._avail_shadow = q.used_idx = 0xFFFD
    q._signalled_used = 0xFFFD
    ring.avail_idx = 0xFFFD
    ring.set_desc(0, 0x10000, 8, WRITE)
    for _ in range(4):
        ring.push(0)
    ring.set_used_event(0xFFFF)
    q.add_used(q.pop().head, 0)          # entry 0xFFFD
    assert not q.needs_notification()
    q.add_used(q.pop().head, 0)          # entry 0xFFFE
    q.add_used(q.pop().head, 0)          # entry 0xFFFF -> used idx wraps to 0
    assert q.used_idx == 0
    assert q.needs_notification()
    ring.set_used_event(1)
    q.add_used(q.pop().head, 0)          # entry 0
    assert not q.needs_notification()


def test_event_idx_avail_event_tracks_consumption(mem):
    ring, q = make(mem, event_idx=True)
    ring.set_desc(0, 0x10000, 8, WRITE)
    for _ in range(3):
        ring.push(0)
    q.pop()
    assert ring.avail_event() == 1
    q.pop()
    q.pop()
    assert ring.avail_event() == 3
    assert q.pop() is None


def test_avail_event_not_written_without_event_idx(mem):
    ring, q = make(mem, event_idx=False)
    ring.set_desc(0, 0x10000, 8, WRITE)
    mem.write_u16(ring.used + 4 + 8 * ring.size, 0xABCD)
    ring.push(0)
    q.pop()
    assert ring.avail_event() == 0xABCD


# -- buffer helpers -------------------------------------------------------------------------------
def test_split_and_copy_helpers(mem):
    bufs = ((0x10000, 10), (0x20000, 6), (0x30000, 4))
    head, tail = split_buffers(bufs, 12)
    assert head == ((0x10000, 10), (0x20000, 2))
    assert tail == ((0x20002, 4), (0x30000, 4))
    assert split_buffers(bufs, 0) == ((), bufs)
    assert split_buffers(bufs, 100) == (bufs, ())
    assert write_buffers(mem, bufs, bytes(range(25))) == 20
    assert read_buffers(mem, bufs) == bytes(range(20))
    assert read_buffers(mem, bufs, 13) == bytes(range(13))


def test_read_buffers_with_a_limit_skips_empty_buffers(mem):
    # A zero-length descriptor before the header (the fuzzer found it) must not end the read early.
    mem.write(0x10000, bytes(range(16)))
    assert read_buffers(mem, ((0x20000, 0), (0x10000, 16)), 16) == bytes(range(16))
    assert read_buffers(mem, ((0x10000, 8), (0x20000, 0), (0x10008, 8)), 12) == bytes(range(12))
