"""pop_batch / add_used_batch against pop / add_used (no KVM): two queues over two identical guest
memories, one served chain by chain, the other in batches, through several rounds of a (mostly
hostile) driver. Both must hand over the same chains in the same order, fail with the same
QueueError at the same point, leave the same bytes in guest memory (used ring, avail_event) and
take the same interrupt decisions. Hypothesis draws the rings; the bulk descriptor contents come
from a seeded generator, as in test_virtio_queue_fuzz."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pystratovirt.virtio import queue as queuemod
from pystratovirt.virtio.queue import QueueError, QueueState, SplitQueue
from virtio.helper import INDIRECT, NEXT, WRITE, Ring, SpyMemory, spied_memory

RAM = 64 * 1024
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # room for up to 32 entries each
TABLES = (0x4000, 0x5000)                   # where indirect tables may live
TABLE_MAX = 12
DATA = 0x8000                               # where well-formed buffers live

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _hostile_desc(rnd: random.Random, n_max: int) -> tuple[int, int, int, int]:
    """A descriptor that may be anything: outside or straddling RAM, over the rings, looping,
    readable after writable, indirect where it must not be, or well formed after all."""
    pick = rnd.random()
    if pick < 0.5:
        addr = rnd.randrange(DATA, RAM - 600)
    elif pick < 0.7:
        addr = rnd.choice(TABLES + (DESC, AVAIL, USED))
    else:
        addr = rnd.choice([RAM - 1, RAM - 8, RAM, RAM + 1, 0xC000_0000, 2**63, 2**64 - 16, 2**64 - 1])
    length = rnd.randrange(0, 600) if rnd.random() < 0.8 else rnd.choice([0xFFFF_FFFF, RAM, 16 * TABLE_MAX])
    pick = rnd.random()
    if pick < 0.6:
        flags = rnd.choice([0, NEXT, WRITE, NEXT | WRITE])
    elif pick < 0.9:
        flags = INDIRECT | rnd.choice([0, WRITE, NEXT])
    else:
        flags = rnd.getrandbits(16)
    nxt = rnd.randrange(n_max + 1) if rnd.random() < 0.9 else rnd.getrandbits(16)
    return addr, length, flags, nxt


def _chain_descs(rnd: random.Random, ids: list[int]) -> list[tuple[int, tuple[int, int, int, int]]]:
    """A well-formed chain over descriptor slots ``ids``: readable buffers, then writable ones."""
    n_readable = rnd.randrange(len(ids) + 1)
    out = []
    for k, i in enumerate(ids):
        last = k == len(ids) - 1
        flags = (WRITE if k >= n_readable else 0) | (0 if last else NEXT)
        out.append((i, (rnd.randrange(DATA, RAM - 600), rnd.randrange(0, 600), flags, 0 if last else ids[k + 1])))
    return out


def _tables(rnd: random.Random, size: int, mutations: int, indirect: bool) -> tuple[list, list, list[int]]:
    """What a driver lays out: the descriptor table cut into well-formed chains (some through an
    indirect table when ``indirect``), then ``mutations`` descriptors overwritten with anything at all. Returns
    the table, the indirect tables and the chain heads."""
    table: list = [None] * size
    indirect_tables = [[_hostile_desc(rnd, TABLE_MAX)] for _ in TABLES]
    order = rnd.sample(range(size), size)
    heads = []
    while order:
        n = min(rnd.randrange(1, 5), len(order))
        ids, order = order[:n], order[n:]
        heads.append(ids[0])
        if indirect and rnd.random() < 0.3:
            k = rnd.randrange(len(TABLES))
            entries = _chain_descs(rnd, list(range(rnd.randrange(1, TABLE_MAX + 1))))
            indirect_tables[k] = [d for _, d in entries]
            table[ids[0]] = (TABLES[k], 16 * len(entries), INDIRECT, 0)
            for i in ids[1:]:
                table[i] = _hostile_desc(rnd, size)
        else:
            for i, d in _chain_descs(rnd, ids):
                table[i] = d
    for _ in range(mutations):
        k = rnd.randrange(len(TABLES) + 1)
        if k == len(TABLES):
            table[rnd.randrange(size)] = _hostile_desc(rnd, size)
        else:
            t = indirect_tables[k]
            t[rnd.randrange(len(t))] = _hostile_desc(rnd, TABLE_MAX)
    return table, indirect_tables, heads


@st.composite
def workloads(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    rnd = random.Random(draw(st.integers(0, 2**64 - 1)))
    indirect = draw(st.booleans())
    # Which kinds of hostility this driver shows (none at all in about a third of the cases).
    hostile = draw(st.sets(st.sampled_from(["descriptors", "heads", "index"])))
    mutations = rnd.choice([1, 1, 2, 4]) if "descriptors" in hostile else 0
    table, indirect_tables, chain_heads = _tables(rnd, size, mutations,
                                                  indirect or "descriptors" in hostile)
    rounds = []
    for _ in range(draw(st.integers(1, 5))):
        advance = draw(st.integers(0, size))
        if "index" in hostile and rnd.random() < 0.3:
            advance = rnd.choice([size + 1, 0x8000, 0xFFFF, rnd.randrange(size + 1, 0x10000)])
        heads = [rnd.randrange(0x10000) if "heads" in hostile and rnd.random() < 0.1
                 else rnd.choice(chain_heads) for _ in range(size)]
        rounds.append(dict(advance=advance, heads=heads, batch=draw(st.integers(1, size + 2)),
                           used_event=draw(st.one_of(st.integers(0, 0xFFFF), st.none())),
                           flags=draw(st.integers(0, 1))))
    return dict(
        size=size,
        table=table,
        indirect_tables=indirect_tables,
        start=draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFF, 0xFFFE, 0x10000 - size]))),
        signalled=draw(st.one_of(st.none(), st.integers(0, 0xFFFF))),
        event_idx=draw(st.booleans()),
        indirect=indirect,
        rounds=rounds,
    )


def _written(chain) -> int:
    """What the device says it wrote: any deterministic function of the chain will do."""
    return (chain.head * 7919 + sum(n for _, n in chain.writable)) & 0xFFFF_FFFF


def serve_one_by_one(q: SplitQueue, batch: int, trace: list) -> bool:
    """The reference: pop up to ``batch`` chains one at a time, complete each with add_used,
    decide about an interrupt once for what was completed; a QueueError ends it (after the
    chains popped before it were completed). Returns False once the queue is dead."""
    while True:
        chains, error = [], None
        while len(chains) < batch:
            try:
                chain = q.pop()
            except QueueError as exc:
                error = str(exc)
                break
            if chain is None:
                break
            chains.append(chain)
        for chain in chains:
            q.add_used(chain.head, _written(chain))
        if chains:
            trace.append(("used", chains, q.needs_notification()))
        if error is not None:
            trace.append(("error", error))
            return False
        if len(chains) < batch:
            return True


def serve_in_batches(q: SplitQueue, batch: int, trace: list) -> bool:
    """The batched path as virtio-blk drives it: pop_batch, add_used_batch, one interrupt
    decision, and another round while the batch was full or chains are known available."""
    while True:
        try:
            chains = q.pop_batch(batch)
        except QueueError as exc:
            trace.append(("error", str(exc)))
            return False
        if not chains:
            return True
        q.add_used_batch([(chain.head, _written(chain)) for chain in chains])
        trace.append(("used", chains, q.needs_notification()))
        if not (len(chains) >= batch or q.has_available()):
            return True


def _lay_out(mem: SpyMemory, spec: dict) -> Ring:
    ring = Ring(mem, spec["size"], DESC, AVAIL, USED)
    for i, desc in enumerate(spec["table"]):
        ring.set_desc(i, *desc)
    for base, table in zip(TABLES, spec["indirect_tables"], strict=True):
        for i, desc in enumerate(table):
            ring.set_desc(i, *desc, table=base)
    ring.avail_idx = spec["start"]
    ring.publish()
    return ring


def _queue(mem: SpyMemory, spec: dict) -> SplitQueue:
    start = spec["start"]
    return SplitQueue.from_state(mem, QueueState(
        spec["size"], DESC, AVAIL, USED, spec["event_idx"], spec["indirect"], start, start,
        spec["signalled"]))


@settings(max_examples=1500, **SETTINGS)
@given(workloads())
def test_batched_queue_matches_one_chain_at_a_time(spec):
    check_batched_against_single(spec)


def check_batched_against_single(spec):
    mems = (SpyMemory(RAM), SpyMemory(RAM))
    try:
        rings = [_lay_out(m, spec) for m in mems]
        single, batched = (_queue(m, spec) for m in mems)
        traces: tuple[list, list] = ([], [])
        alive = [True, True]
        size = spec["size"]
        for rnd in spec["rounds"]:
            for ring in rings:  # the driver does the same to both guests
                for head in rnd["heads"][:min(rnd["advance"], size)]:
                    ring.push(head, publish=False)
                ring.avail_idx = (ring.avail_idx - min(rnd["advance"], size) + rnd["advance"]) & 0xFFFF
                ring.publish()
                ring.set_flags(rnd["flags"])
                used_event = rnd["used_event"]
                ring.set_used_event(ring.used_idx() if used_event is None else used_event)
            if alive[0]:
                alive[0] = serve_one_by_one(single, rnd["batch"], traces[0])
            if alive[1]:
                alive[1] = serve_in_batches(batched, rnd["batch"], traces[1])
            assert traces[1] == traces[0]
            assert alive[1] == alive[0]
            assert mems[1].read(0, RAM) == mems[0].read(0, RAM)
            assert (batched.last_avail_idx, batched.used_idx) == (single.last_avail_idx, single.used_idx)
            if not alive[0]:
                break
        used = [chain for entry in traces[0] if entry[0] == "used" for chain in entry[1]]
        for chain in used:
            assert all(mems[0].contains(a, n) for a, n in chain.readable + chain.writable)
        event(f"chains used: {min(len(used), 8)}{'+' if len(used) >= 8 else ''}")
        event("ends in QueueError" if not alive[0] else "no QueueError")
        if not alive[0] and len(traces[0]) > 1 and traces[0][-2][0] == "used":
            event("QueueError right after chains were used")
        assert not mems[0].violations and not mems[1].violations
    finally:
        for m in mems:
            m.close()


# -- the cases the property test must cover, spelled out ----------------------------------------------
@pytest.fixture
def mem():
    yield from spied_memory(RAM)


def _chain_ring(mem, *, size=8, event_idx=False, bad=None):
    """Five one-descriptor chains 0..4; ``bad`` names one whose buffer lies outside RAM."""
    ring = Ring(mem, size, DESC, AVAIL, USED)
    for i in range(5):
        ring.set_desc(i, RAM + 0x1000 if i == bad else DATA + 0x100 * i, 0x10, WRITE)
        ring.push(i)
    return ring, SplitQueue(mem, size, DESC, AVAIL, USED, event_idx=event_idx)


@pytest.mark.parametrize("event_idx", [False, True])
def test_a_bad_chain_does_not_swallow_the_good_ones_before_it(mem, event_idx):
    """pop would hand over chains 0 and 1 and then fail on 2: pop_batch hands over the same two
    (they were taken off the ring, and only the caller can complete them) and fails on its next
    call, on chain 2, still at the same place in the ring."""
    ring, q = _chain_ring(mem, event_idx=event_idx, bad=2)
    assert [c.head for c in q.pop_batch(8)] == [0, 1]
    assert q.last_avail_idx == 2 and q.has_available()
    if event_idx:
        assert ring.avail_event() == 2
    with pytest.raises(QueueError, match="chain 2: buffer .* outside guest RAM"):
        q.pop_batch(8)
    assert q.last_avail_idx == 2


def test_a_bad_first_chain_fails_at_once(mem):
    _, q = _chain_ring(mem, bad=0)
    with pytest.raises(QueueError, match="chain 0"):
        q.pop_batch(8)
    assert q.last_avail_idx == 0


def test_a_hostile_index_seen_after_a_batch_does_not_lose_the_batch(mem, monkeypatch):
    """With EVENT_IDX, pop_batch looks at avail->idx once more after the batch. A driver that
    moves it more than the ring's size ahead meanwhile is broken, but the chains already taken
    are still handed over; the next look at the index fails, as the next pop would."""
    ring, q = _chain_ring(mem, event_idx=True)
    barrier = queuemod._full_barrier

    def driver_jumps(fence):
        barrier(fence)
        if q.last_avail_idx == 5:
            ring.publish(5 + 100)
    monkeypatch.setattr(queuemod, "_full_barrier", driver_jumps)
    assert [c.head for c in q.pop_batch(8)] == [0, 1, 2, 3, 4]
    q.add_used_batch([(h, 0) for h in range(5)])
    assert ring.used_idx() == 5
    with pytest.raises(QueueError, match="100 entries ahead"):
        q.pop_batch(8)


# -- the two descriptor walks -------------------------------------------------------------------------
@settings(max_examples=1000, **SETTINGS)
@given(workloads(), st.integers(0, 31))
def test_the_direct_walk_matches_the_general_walk(spec, head):
    """``_walk`` (direct descriptors, the per-request path) and ``_walk_general`` (which also
    follows indirect tables) must agree on every chain that has no indirect descriptor: the same
    chain, or both refuse it."""
    mem = SpyMemory(RAM)
    try:
        _lay_out(mem, spec)
        q = _queue(mem, spec)

        def outcome(walk):
            try:
                return walk(head)
            except QueueError:
                return "QueueError"

        head %= spec["size"]   # _walk checks the head before it ever hands a chain to _walk_general
        general = outcome(q._walk_general)
        assert outcome(q._walk) == general
        event(("a chain" if general != "QueueError" else "refused")
              + (" (indirect at the head: _walk hands over at once)" if spec["table"][head][2] & INDIRECT else ""))
        assert not mem.violations
    finally:
        mem.close()
