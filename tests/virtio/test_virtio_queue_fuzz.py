"""Property tests of the split virtqueue model (no KVM), with hypothesis generating thousands
of rings: random (mostly hostile) descriptor tables give valid chains or QueueError -- never
another exception, never an access outside guest RAM -- and well-formed rings written by a
model driver are read back exactly."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.virtio.queue import MAX_TABLE_STEPS, QueueError, SplitQueue
from virtio.helper import INDIRECT, NEXT, WRITE, Ring, SpyMemory

RAM = 64 * 1024
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # room for up to 32 entries each
TABLES = (0x4000, 0x5000)  # where indirect tables may live
TABLE_MAX = 12

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

addresses = st.one_of(
    st.integers(0, RAM),
    st.sampled_from(TABLES),
    st.sampled_from([RAM - 1, RAM, RAM + 1, 0xC000_0000, 2**63, 2**64 - 16, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.integers(0, 600),
    st.sampled_from([16, 32, 48, 64, 256, 512]),
    st.sampled_from([0xFFFF_FFFF, 0x8000_0000, RAM, RAM - 1]),
    st.integers(0, 2**32 - 1),
)
flag_values = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))


def descriptors(n_max):
    nexts = st.one_of(st.integers(0, n_max + 1), st.integers(0, 0xFFFF))
    return st.lists(st.tuples(addresses, lengths, flag_values, nexts), min_size=0, max_size=n_max)


@st.composite
def hostile_rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    return dict(
        size=size,
        table=draw(descriptors(size)),
        indirect_tables=[draw(descriptors(TABLE_MAX)) for _ in TABLES],
        ring=draw(st.lists(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)), min_size=size,
                           max_size=size)),
        start=draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF, 0xFFFE]))),
        ahead=draw(st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))),
        used_event=draw(st.integers(0, 0xFFFF)),
        flags=draw(st.integers(0, 0xFFFF)),
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
    )


def _random_desc(rnd: random.Random, n_max: int) -> tuple[int, int, int, int]:
    """One descriptor drawn like the hypothesis strategies above, from a seeded generator."""
    pick = rnd.random()
    if pick < 0.55:
        addr = rnd.randrange(0, RAM + 1)
    elif pick < 0.7:
        addr = rnd.choice(TABLES)
    elif pick < 0.85:
        addr = rnd.choice([RAM - 1, RAM, RAM + 1, 0xC000_0000, 2**63, 2**64 - 16, 2**64 - 1])
    else:
        addr = rnd.getrandbits(64)
    pick = rnd.random()
    if pick < 0.5:
        length = rnd.randrange(0, 601)
    elif pick < 0.75:
        length = rnd.choice([16, 32, 48, 64, 256, 512])
    elif pick < 0.9:
        length = rnd.choice([0xFFFF_FFFF, 0x8000_0000, RAM, RAM - 1])
    else:
        length = rnd.getrandbits(32)
    flags = rnd.randrange(8) if rnd.random() < 0.8 else rnd.getrandbits(16)
    nxt = rnd.randrange(n_max + 2) if rnd.random() < 0.85 else rnd.getrandbits(16)
    return addr, length, flags, nxt


@st.composite
def seeded_rings(draw):
    """Ring parameters from hypothesis, bulk descriptor contents from a seeded generator (fast
    enough for thousands of examples)."""
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))
    return dict(
        size=size,
        table=[_random_desc(rnd, size) for _ in range(size)],
        indirect_tables=[[_random_desc(rnd, TABLE_MAX) for _ in range(rnd.randrange(TABLE_MAX + 1))]
                         for _ in TABLES],
        ring=[rnd.randrange(size + 1) if rnd.random() < 0.9 else rnd.getrandbits(16) for _ in range(size)],
        start=draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF, 0xFFFE]))),
        ahead=draw(st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))),
        used_event=draw(st.integers(0, 0xFFFF)),
        flags=draw(st.integers(0, 3)),
        event_idx=draw(st.booleans()),
        indirect=draw(st.booleans()),
    )


@settings(max_examples=300, **SETTINGS)
@given(hostile_rings())
def test_hostile_rings_give_chains_or_queue_error(spec):
    check_hostile_ring(spec)


@settings(max_examples=5000, **SETTINGS)
@given(seeded_rings())
def test_thousands_of_seeded_hostile_rings(spec):
    check_hostile_ring(spec)


def check_hostile_ring(spec):
    """Valid chains or QueueError, never another exception and never an access outside RAM."""
    mem = SpyMemory(RAM)
    try:
        size = spec["size"]
        ring = Ring(mem, size, DESC, AVAIL, USED)
        for i, (a, n, f, nx) in enumerate(spec["table"]):
            ring.set_desc(i, a, n, f, nx)
        for base, table in zip(TABLES, spec["indirect_tables"], strict=True):
            for i, (a, n, f, nx) in enumerate(table):
                ring.set_desc(i, a, n, f, nx, table=base)
        for slot, head in enumerate(spec["ring"]):
            mem.write_u16(AVAIL + 4 + 2 * slot, head)
        mem.write_u16(AVAIL, spec["flags"])
        ring.publish((spec["start"] + spec["ahead"]) & 0xFFFF)
        ring.set_used_event(spec["used_event"])
        q = SplitQueue(mem, size, DESC, AVAIL, USED, event_idx=spec["event_idx"], indirect=spec["indirect"])
        q.last_avail_idx = q._avail_shadow = spec["start"]
        q.used_idx = spec["start"]
        popped = 0
        for _ in range(size + 2):
            try:
                chain = q.pop()
            except QueueError:
                break
            if chain is None:
                break
            popped += 1
            assert 0 <= chain.head < size
            bufs = chain.readable + chain.writable
            assert len(bufs) <= size + min(RAM // 16, MAX_TABLE_STEPS)
            for addr, length in bufs:
                assert mem.contains(addr, length)
            q.add_used(chain.head, chain.writable_len)
            q.needs_notification()
        assert popped <= size
        assert not mem.violations, mem.violations
    finally:
        mem.close()


@st.composite
def valid_workloads(draw):
    size = draw(st.sampled_from([2, 4, 8, 16]))
    chains = draw(st.lists(
        st.tuples(st.lists(st.integers(0, 300), max_size=5),   # readable lengths
                  st.lists(st.integers(0, 300), max_size=5),   # writable lengths
                  st.booleans()),                              # through an indirect table?
        min_size=1, max_size=3 * size))
    return size, chains, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=1000, **SETTINGS)
@given(valid_workloads())
def test_model_driver_rings_read_back_exactly(work):
    size, chains, start, seed = work
    rnd = random.Random(seed)
    mem = SpyMemory(RAM)
    try:
        ring = Ring(mem, size, DESC, AVAIL, USED)
        ring.avail_idx = start
        q = SplitQueue(mem, size, DESC, AVAIL, USED, event_idx=True, indirect=True)
        q.last_avail_idx = q._avail_shadow = q.used_idx = start
        free = list(range(size))
        in_flight = {}
        expected = []
        for readable, writable, indirect in chains:
            if not readable and not writable:
                writable = [1]
            bufs = [(rnd.randrange(0x8000, RAM - 300), n, 0) for n in readable] + \
                   [(rnd.randrange(0x8000, RAM - 300), n, WRITE) for n in writable]
            indirect = indirect or len(bufs) > size  # a direct chain must fit in the table
            need = 1 if indirect else len(bufs)
            while len(free) < need:  # device catches up: pop and complete one chain
                chain = q.pop()
                assert chain == expected.pop(0)
                q.add_used(chain.head, 0)
                free += in_flight.pop(chain.head)
            ids = rnd.sample(free, need)
            for i in ids:
                free.remove(i)
            if indirect:
                table = TABLES[len(expected) % 2] + 0x400 * rnd.randrange(2)
                for i, (a, n, f) in enumerate(bufs):
                    last = i == len(bufs) - 1
                    ring.set_desc(i, a, n, f | (0 if last else NEXT), 0 if last else i + 1, table=table)
                ring.set_desc(ids[0], table, 16 * len(bufs), INDIRECT)
            else:
                for i, (a, n, f) in enumerate(bufs):
                    last = i == len(bufs) - 1
                    ring.set_desc(ids[i], a, n, f | (0 if last else NEXT), 0 if last else ids[i + 1])
            ring.push(ids[0])
            in_flight[ids[0]] = ids
            expected.append(_expect(ids[0], bufs))
            if indirect:
                # The table memory is reused by later chains: let the device catch up now.
                while expected:
                    chain = q.pop()
                    assert chain == expected.pop(0)
                    q.add_used(chain.head, 0)
                    free += in_flight.pop(chain.head)
        while expected:
            chain = q.pop()
            assert chain == expected.pop(0)
            q.add_used(chain.head, 0)
        assert q.pop() is None
        assert ring.used_idx() == (start + len(chains)) & 0xFFFF
        assert not mem.violations
    finally:
        mem.close()


def _expect(head, bufs):
    from pystratovirt.virtio.queue import DescChain
    return DescChain(head, tuple((a, n) for a, n, f in bufs if not f & WRITE),
                     tuple((a, n) for a, n, f in bufs if f & WRITE))
