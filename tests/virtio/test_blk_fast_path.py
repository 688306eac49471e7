"""virtio-blk's inline IN/OUT fast path against the general request path (no KVM).

:meth:`VirtioBlk.process_queue` serves an IN or OUT laid out as Linux lays it out (header alone
in the first buffer, status byte alone in the last) inline, with its own copy of
:meth:`BlkRequest.execute`'s checks; everything else goes through ``_handle`` (``BlkRequest.parse``
and ``execute``). Here two identical set-ups (two images with the same bytes, two devices on two
guest memories) receive the same requests from a careless or hostile driver: one is served by the
real ``process_queue``, the other by a reference that hands every chain to ``_handle`` and
finishes the batch as ``process_queue`` does. The two must agree on everything the guest or the
host can see: image bytes, guest memory (status bytes, data read, the used ring, avail_event),
the used entries, interrupts, BLOCK_IO_ERROR reports and DEVICE_NEEDS_RESET. The statuses and used
lengths of IN and OUT are also checked against the spec's rule, so the two cannot agree on a
wrong answer."""

from __future__ import annotations

import errno
import math
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pystratovirt.virtio import blk as blkmod
from pystratovirt.virtio.blk import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VirtioBlk,
)
from pystratovirt.virtio.block_backend import FileBackend
from pystratovirt.virtio.device import VIRTIO_F_VERSION_1, Interrupt, bit
from pystratovirt.virtio.queue import QueueError, SplitQueue
from virtio.helper import NEXT, WRITE, Ring, SpyMemory

RAM = 256 * 1024
QSIZE = 64
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
DATA = 0x4000
SENTINEL = 0xA5        # what IN buffers and status bytes hold before the device writes them
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")

OTHER_TYPES = [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
               2, 3, 0x8000_0000, 0xFFFF_FFFF]
# Layouts: "fast" is Linux's (the fast path's); the others a driver may use (any layout, spec
# §2.6.4) or get wrong; "no_status" and "short_header" cannot be framed (QueueError).
LAYOUTS = ["fast", "header_split", "status_shared", "header_with_data", "extra_readable",
           "extra_writable", "aliased", "no_status", "short_header"]


@st.composite
def requests(draw, capacity: int):
    rtype = draw(st.sampled_from([VIRTIO_BLK_T_IN] * 8 + [VIRTIO_BLK_T_OUT] * 8 + OTHER_TYPES))
    if capacity and draw(st.sampled_from([True, True, False])):
        # Two thirds of the requests fit the disk, so that data moves and host errors strike.
        sector = draw(st.integers(0, capacity - 1))
        length = 512 * draw(st.integers(1, min(capacity - sector, 8)))
    else:
        # The rest lie anywhere: at or past the end, past 2**63, not whole sectors.
        sector = draw(st.one_of(
            st.integers(0, capacity + 2),
            st.sampled_from([capacity, max(capacity - 1, 0), 2**32, 2**55, 2**63, 2**64 - 1, 2**64 - 8])))
        length = draw(st.one_of(
            st.sampled_from([0, 1, 511, 512, 513, 1024, 4096, capacity * 512, capacity * 512 + 512]),
            st.integers(0, capacity * 512 + 1024)))
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and draw(st.booleans()):
        length = SEG.size * draw(st.integers(1, 3))   # segments (their content drawn below)
    layout = draw(st.sampled_from(LAYOUTS[:1] * 24 + LAYOUTS[1:7] * 2 + LAYOUTS[7:]))
    nbufs = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, length), min_size=nbufs - 1, max_size=nbufs - 1)))
    parts = [b - a for a, b in zip([0] + cuts, cuts + [length], strict=True)]
    return dict(type=rtype, sector=sector, reserved=draw(st.sampled_from([0, 0, 1, 0xFFFF_FFFF])),
                parts=parts, layout=layout, split=draw(st.integers(1, 15)),
                odd=draw(st.booleans()), seg_seed=draw(st.integers(0, 2**32)))


@st.composite
def workloads(draw):
    capacity = draw(st.sampled_from([16, 16, 8, 1, 0]))
    reqs = draw(st.lists(requests(capacity), min_size=1, max_size=6))
    rounds = sorted(draw(st.lists(st.integers(1, len(reqs)), max_size=2))) + [len(reqs)]
    fault = draw(st.sampled_from(["none", "none", "all", "one"]))
    return dict(
        capacity=capacity,
        tail=draw(st.sampled_from([0, 0, 100, 511])),          # a trailing partial sector
        # (sampled_from, not integers(...) == 0: Hypothesis draws 0 far more often than 1 in 10)
        empty_slot=draw(st.sampled_from([False] * 9 + [True])),
        ro_drive=draw(st.sampled_from([False] * 4 + [True])),
        ro_slot=draw(st.sampled_from([False] * 4 + [True])),
        serial=draw(st.sampled_from([None, "disk-1", "x" * 30, "é"])),
        features=draw(st.sampled_from([0, bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)])),
        event_idx=draw(st.booleans()),
        batch=draw(st.sampled_from([1, 2, 3, blkmod.BATCH])),
        fault=fault,
        fault_call=draw(st.sampled_from([0, 0, 1, 2])),
        fault_after_io=draw(st.booleans()),                    # the I/O happens, then the error
        fault_errno=draw(st.sampled_from([errno.EIO, errno.ENOSPC])),
        requests=reqs,
        rounds=rounds,
        seed=draw(st.integers(0, 2**32)),
    )


# -- the driver ------------------------------------------------------------------------------------
class Layout:
    """Where one request lies in guest RAM (the same in both guests): its first descriptor and
    its status byte (None when it has none)."""

    def __init__(self, head: int, status: int | None):
        self.head, self.status = head, status


def lay_out_requests(mems: tuple[SpyMemory, SpyMemory], spec: dict) -> tuple[list[Ring], list[Layout]]:
    """Write every request's descriptors and buffers into both guests (not yet made available)."""
    rnd = random.Random(spec["seed"])
    rings = [Ring(m, QSIZE, DESC, AVAIL, USED) for m in mems]
    layouts = []
    addr = DATA
    slot = 0

    def alloc(n: int, odd: bool) -> int:
        nonlocal addr
        a = addr + (rnd.randrange(1, 8) if odd else 0)
        addr = (a + n + 64) & ~63
        assert addr < RAM
        return a

    def put(a: int, data: bytes) -> None:
        for m in mems:
            m.write(a, data)

    for req in spec["requests"]:
        rtype, layout, parts = req["type"], req["layout"], req["parts"]
        header = HDR.pack(rtype, req["reserved"], req["sector"])
        length = sum(parts)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and length % SEG.size == 0 and length:
            seg_rnd = random.Random(req["seg_seed"])
            payload = b"".join(SEG.pack(seg_rnd.choice([0, 1, 8, spec["capacity"], 2**63]),
                                        seg_rnd.choice([0, 1, 8, 16]), seg_rnd.choice([0, 0, 1, 2]))
                               for _ in range(length // SEG.size))
        else:
            payload = rnd.randbytes(length)
        # Device-readable data for the types that carry it, device-writable for IN and GET_ID.
        writes_data = rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)
        hdr_addr = alloc(16, req["odd"])
        data_bufs = []
        for n in parts:
            a = alloc(n, req["odd"])
            put(a, bytes([SENTINEL]) * n if writes_data else payload[:n])
            payload = payload[n:]
            data_bufs.append((a, n))
        status = alloc(1, req["odd"])
        put(status, bytes([SENTINEL]))
        put(hdr_addr, header)
        readable: list[tuple[int, int]] = [(hdr_addr, 16)]
        writable: list[tuple[int, int]] = []
        (writable if writes_data else readable).extend(data_bufs)
        writable.append((status, 1))
        status_addr: int | None = status
        if layout == "header_split":
            s = req["split"]
            readable[0:1] = [(hdr_addr, s), (hdr_addr + s, 16 - s)]
        elif layout == "status_shared":
            # The status byte is the last byte of the last writable buffer.
            writable.pop()
            if writable:
                a, n = writable[-1]
                status_addr = a + n
                put(status_addr, bytes([SENTINEL]))
                writable[-1] = (a, n + 1)
            else:
                writable.append((status, 1))
        elif layout == "header_with_data" and not writes_data and data_bufs:
            # The header and the first data buffer in one descriptor.
            a, n = data_bufs[0]
            both = alloc(16 + n, req["odd"])
            put(both, header + bytes(mems[0].read(a, n)))
            readable[0:2] = [(both, 16 + n)]
        elif layout == "extra_readable":
            readable.append((hdr_addr, 16))       # more device-readable bytes than the type wants
        elif layout == "extra_writable":
            writable.insert(0, (alloc(512, req["odd"]), 512))
        elif layout == "aliased" and data_bufs:
            # Every data buffer starts where the first one does (the longer ones run over the
            # request's other buffers); the status byte lies inside it when it is not empty.
            a = data_bufs[0][0]
            bufs = writable if writes_data else readable
            for k, buf in enumerate(bufs):
                if buf in data_bufs:
                    bufs[k] = (a, buf[1])
            if data_bufs[0][1]:
                status_addr = a
                writable[-1] = (a, 1)
        elif layout == "no_status":
            writable = []
            status_addr = None
        elif layout == "short_header":
            readable = [(hdr_addr, req["split"])]
            if writes_data:
                writable = [(status, 1)]
        descs = [(a, n, 0) for a, n in readable] + [(a, n, WRITE) for a, n in writable]
        head = slot
        for k, (a, n, flags) in enumerate(descs):
            last = k == len(descs) - 1
            for ring in rings:
                ring.set_desc(slot, a, n, flags | (0 if last else NEXT), slot + 1)
            slot += 1
        assert slot <= QSIZE
        layouts.append(Layout(head, status_addr))
    return rings, layouts


# -- the two ways of serving a queue ---------------------------------------------------------------
def reference_process_queue(dev: VirtioBlk, index: int) -> bool:
    """process_queue without its inline path: every chain through ``_handle``, the batch
    published and notified as process_queue publishes and notifies it."""
    queue = dev.queue(index)
    if queue is None:
        return False
    chains = queue.pop_batch(blkmod.BATCH)
    if not chains:
        return False
    used: list[tuple[int, int]] = []
    try:
        for chain in chains:
            used.append((chain.head, dev._handle(chain)))
    finally:
        queue.add_used_batch(used)
    dev.notify_used(queue)
    return len(chains) >= blkmod.BATCH or queue.has_available()


def fast_process_queue(dev: VirtioBlk, index: int) -> bool:
    return dev.process_queue(index)


def serve(dev: VirtioBlk, process: Callable[[VirtioBlk, int], bool]) -> None:
    """What the transport's I/O thread does on a notification (VirtioMmio._serve_queue)."""
    while not dev.needs_reset:
        try:
            more = process(dev, 0)
        except QueueError as exc:
            dev.fail(f"queue 0: {exc}")
            return
        if not more:
            return


class Faults:
    """Host I/O errors from the backend's readv/writev: on every call, or on call number k;
    raised before the transfer or after it happened (a device must not trust either)."""

    def __init__(self, backend: FileBackend, spec: dict):
        self.calls = 0
        self.spec = spec
        for name in ("readv", "writev"):
            setattr(backend, name, self._wrap(getattr(backend, name)))

    def _wrap(self, real):
        def io(offset, views):
            call, self.calls = self.calls, self.calls + 1
            spec = self.spec
            failing = spec["fault"] == "all" or (spec["fault"] == "one" and call == spec["fault_call"])
            if failing and spec["fault_after_io"]:
                real(offset, views)
            if failing:
                raise OSError(spec["fault_errno"], "injected")
            real(offset, views)
        return io


def expected_in_out(spec: dict) -> list[tuple[int, int] | None]:
    """Spec §5.2.6 for each request: (status, used length) for IN and OUT, in order; None for
    other types (their rules are test_blk_request's). The n-th transfer fails as Faults says."""
    capacity = 0 if spec["empty_slot"] else spec["capacity"]
    refused = spec["ro_slot"] or (spec["ro_drive"] and not spec["empty_slot"])
    calls = 0
    out: list[tuple[int, int] | None] = []
    for req in spec["requests"]:
        rtype, sector, n = req["type"], req["sector"], sum(req["parts"])
        if rtype == VIRTIO_BLK_T_IN and req["layout"] == "extra_writable":
            n += 512   # the extra buffer is part of the data
        elif rtype == VIRTIO_BLK_T_OUT and req["layout"] == "extra_readable":
            n += 16
        if rtype not in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) or req["layout"] in ("no_status", "short_header"):
            out.append(None)
            continue
        ok = n % 512 == 0 and sector + n // 512 <= capacity and not (rtype == VIRTIO_BLK_T_OUT and refused)
        if ok and n:
            fault = spec["fault"] == "all" or (spec["fault"] == "one" and calls == spec["fault_call"])
            calls += 1
            ok = not fault
        out.append((VIRTIO_BLK_S_OK, n + 1) if ok and rtype == VIRTIO_BLK_T_IN
                   else (VIRTIO_BLK_S_OK if ok else VIRTIO_BLK_S_IOERR, 1))
    return out


def run(spec: dict, paths: tuple[str, str], process_fns) -> list[dict]:
    content = random.Random(spec["seed"] ^ 0x5EED).randbytes(spec["capacity"] * 512 + spec["tail"])
    mems = (SpyMemory(RAM), SpyMemory(RAM))
    results = []
    devices = []
    try:
        rings, layouts = lay_out_requests(mems, spec)
        for mem, path in zip(mems, paths, strict=True):
            with open(path, "wb") as f:
                f.write(content)
            backend = faults = None
            if not spec["empty_slot"]:
                fd = os.open(path, os.O_RDONLY if spec["ro_drive"] else os.O_RDWR)
                backend = FileBackend(fd, path=path, read_only=spec["ro_drive"])
                faults = Faults(backend, spec)
            reports: list[tuple[str, bool, str]] = []
            dev = VirtioBlk(backend, read_only=True if spec["ro_slot"] else None, serial=spec["serial"],
                            on_io_error=lambda *e, reports=reports: reports.append(e))
            devices.append(dev)
            features = (bit(VIRTIO_F_VERSION_1) | spec["features"]) & dev.device_features()
            queue = SplitQueue(mem, QSIZE, DESC, AVAIL, USED, event_idx=spec["event_idx"])
            dev.activate(mem, [queue], Interrupt(), features)
            results.append(dict(dev=dev, mem=mem, reports=reports, faults=faults))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(blkmod, "BATCH", spec["batch"])
            mp.setattr(blkmod, "PUBLISH_AFTER", math.inf)   # one publication per batch, as the reference
            pushed = 0
            for upto in spec["rounds"]:
                for ring, result, process in zip(rings, results, process_fns, strict=True):
                    for layout in layouts[pushed:upto]:
                        ring.push(layout.head, publish=False)
                    ring.publish()
                    ring.set_used_event(ring.used_idx())
                    serve(result["dev"], process)
                pushed = upto
        for ring, result, path in zip(rings, results, paths, strict=True):
            dev, mem = result["dev"], result["mem"]
            n_used = ring.used_idx()
            result.update(
                used=[ring.used_elem(i) for i in range(n_used)],
                statuses=[None if lay.status is None else mem.read_u8(lay.status) for lay in layouts],
                ram=mem.read(0, RAM),
                image=Path(path).read_bytes(),
                needs_reset=dev.needs_reset,
                interrupt=dev.state.interrupt.status,
                queue=(dev.queue(0).last_avail_idx, dev.queue(0).used_idx),
                transfers=0 if result["faults"] is None else result["faults"].calls,
            )
        heads = {lay.head: k for k, lay in enumerate(layouts)}
        results[0]["served"] = [heads[h] for h, _ in results[0]["used"]]
    finally:
        for dev in devices:
            interrupt = dev.state.interrupt if dev.state is not None else None
            dev.release()
            if interrupt is not None:
                interrupt.close()
            if dev.backend is not None:
                dev.backend.close()
        for m in mems:
            m.close()
    for m in mems:
        assert not m.violations, m.violations
    return results


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(workloads())
def test_fast_path_matches_general_path(tmp_path, spec):
    paths = (str(tmp_path / "fast.img"), str(tmp_path / "general.img"))
    fast, general = run(spec, paths, (fast_process_queue, reference_process_queue))
    for key in ("used", "statuses", "needs_reset", "interrupt", "queue", "reports", "transfers"):
        assert fast[key] == general[key], key
    assert fast["image"] == general["image"]
    assert fast["ram"] == general["ram"]
    # And both are right about IN and OUT.
    expected = expected_in_out(spec)
    for k, (_, used_len) in zip(fast["served"], fast["used"], strict=True):
        if expected[k] is not None:
            assert (fast["statuses"][k], used_len) == expected[k], (k, spec["requests"][k])
    layouts = {req["layout"] for req in spec["requests"]}
    event(f"readv/writev calls: {min(fast['transfers'], 3)}{'+' if fast['transfers'] >= 3 else ''}")
    event("DEVICE_NEEDS_RESET" if fast["needs_reset"] else "no reset")
    names = {VIRTIO_BLK_S_OK: "OK", VIRTIO_BLK_S_IOERR: "IOERR", VIRTIO_BLK_S_UNSUPP: "UNSUPP"}
    event(f"statuses: {sorted({names[s] for s in fast['statuses'] if s in names})}")
    event(f"faults: {spec['fault']}, {'an error was reported' if fast['reports'] else 'none reported'}")
    event("all fast layout" if layouts == {"fast"} else "mixed layouts")

