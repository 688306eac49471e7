"""The boot GDT: the descriptors the loader writes to guest memory and the vCPU set-up loads.

Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18 with flat segments.
Entry 4 is a TSS so that TR holds a valid busy-TSS descriptor on VM entry.
"""

from __future__ import annotations

from dataclasses import dataclass


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor; ``flags`` is the access byte plus the G/D/L/AVL nibble (0xa09b...)."""
    return (((base & 0xFF00_0000) << (56 - 24)) | ((flags & 0xF0FF) << 40) | ((limit & 0xF_0000) << (48 - 16))
            | ((base & 0x00FF_FFFF) << 16) | (limit & 0xFFFF))


CODE_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20

GDT_TABLE: tuple[int, ...] = (
    0,                                 # null
    0,                                 # unused (Linux's boot GDT also starts at 0x10)
    gdt_entry(0xA09B, 0, 0xFFFFF),     # 64-bit code, present, DPL 0
    gdt_entry(0xC093, 0, 0xFFFFF),     # data, present, writable
    gdt_entry(0x808B, 0, 0xFFFFF),     # busy 32/64-bit TSS
)


@dataclass(frozen=True)
class Segment:
    """The fields of a descriptor as KVM's kvm_segment wants them."""

    selector: int
    base: int
    limit: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 (KVM's field name)
    g: int
    avl: int


def segment(selector: int) -> Segment:
    """Decode GDT_TABLE[selector >> 3] into the fields of a loaded segment register."""
    entry = GDT_TABLE[selector >> 3]
    base = ((entry >> 16) & 0xFF_FFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    g = (entry >> 55) & 1
    return Segment(
        selector=selector,
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
    )


def gdt_bytes() -> bytes:
    return b"".join(e.to_bytes(8, "little") for e in GDT_TABLE)
