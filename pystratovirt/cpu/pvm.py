"""Compatibility with hosts whose KVM emulates guest ring 0 (PVM-style nested KVM).

On such a host (the kvm_pvm module is loaded) guest user mode runs natively but guest kernel mode
is run by KVM's instruction emulator, which lacks some instructions. A missing instruction comes
back as KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION. This module holds everything the
VMM does about that, so that on ordinary hardware none of it runs:

* :func:`detect` says whether we are on such a host;
* :func:`guest_cmdline_options` are kernel options that keep a stock Linux guest away from the
  instructions the emulator lacks;
* :func:`handle_emulation_failure` finishes the few instructions a guest cannot be talked out of
  (``int3``, ``fwait``, ``ldmxcsr``/``stmxcsr``) and explains any other failure.

Why these options (the clearcpuid numbers are Linux X86_FEATURE_* bits, word * 32 + bit):

=========  =======================================================================
noxsave    XSAVE family (xsave/xrstor on context switch); CPUID cannot hide it here
308        SMAP: stac/clac around user copies; CPUID cannot hide it here either
515        PKU: rdpkru/wrpkru
288        FSGSBASE: rdfsbase/wrfsbase and friends on context switch
151        POPCNT (the kernel's hweight helpers are patched to use it)
158, 306   RDRAND, RDSEED (random-number init)
298, 145   INVPCID, PCID (TLB flushing)
311, 312   CLFLUSHOPT, CLWB (cache flushing)
291, 296   BMI1, BMI2 (alternatives patched into kernel code)
137, 147,  SSSE3, SSE4.1, SSE4.2, AES-NI, AVX: kernel code that picks SIMD versions of
148, 153,  its crypto helpers by these bits (Debian's BLAKE2s for the RNG ran SSSE3 code at
156        boot, which the emulator cannot run); the generic C versions are used instead
=========  =======================================================================

``mitigations=off`` keeps out verw/lfence sequences and the retpoline/IBRS plumbing, which cost
a lot under emulation. cmpxchg16b is hidden through CPUID instead (see ``cpuid.CpuModel``).
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from ..kvm.exits import InternalError, InternalSuberror
from ..memory import GuestMemoryError

if typing.TYPE_CHECKING:
    from pystratovirt.kvm.vcpu import Vcpu
    from pystratovirt.memory import GuestMemory

PVM_SYSFS_PATH = "/sys/module/kvm_pvm"
PVM_ENV = "PYSTRATOVIRT_PVM"

GUEST_CMDLINE_OPTIONS: tuple[str, ...] = (
    "noxsave",
    "clearcpuid=308,515,288,151,158,306,298,145,311,312,291,296,137,147,148,153,156",
    "mitigations=off",
)

OPCODE_INT3 = 0xCC
OPCODE_FWAIT = 0x9B
BP_VECTOR = 3
MAX_INSN_LEN = 15
PAGE_SIZE = 4096
EFER_LMA = 1 << 10


def detect(environ: typing.Mapping[str, str] | None = None, sysfs_path: str = PVM_SYSFS_PATH) -> bool:
    """True on a ring-0-emulating host; ``PYSTRATOVIRT_PVM=0/1`` overrides the sysfs check."""
    environ = os.environ if environ is None else environ
    override = environ.get(PVM_ENV)
    if override is not None and override.strip() != "":
        value = override.strip().lower()
        if value in ("1", "yes", "true", "on"):
            return True
        if value in ("0", "no", "false", "off"):
            return False
        raise ValueError(f"{PVM_ENV}={override!r}: expected 0 or 1")
    return os.path.exists(sysfs_path)


def guest_cmdline_options() -> str:
    """Kernel command-line options to append for a guest on a ring-0-emulating host."""
    return " ".join(GUEST_CMDLINE_OPTIONS)


class UnhandledEmulationFailure(PyStratoVirtError):
    """An emulation failure this module cannot finish; str() says where and what."""

    def __init__(self, message: str, rip: int, insn_bytes: bytes | None):
        super().__init__(message)
        self.rip = rip
        self.insn_bytes = insn_bytes


@dataclass(frozen=True)
class _Where:
    rip: int
    linear: int


def _where(vcpu: Vcpu) -> tuple[_Where, typing.Any]:
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    if sregs.efer & EFER_LMA and sregs.cs.l:
        linear = regs.rip  # 64-bit code: CS base is ignored
    else:
        linear = (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
    return _Where(regs.rip, linear), regs


def read_insn_bytes(vcpu: Vcpu, memory: GuestMemory, linear: int,
                    length: int = MAX_INSN_LEN) -> bytes:
    """Up to ``length`` bytes of guest code at ``linear``, via KVM_TRANSLATE and guest RAM.

    Stops early at an unmapped page or at the end of RAM (every read is bounds-checked by
    GuestMemory); returns b"" when not even the first byte is readable.
    """
    out = b""
    addr = linear
    while len(out) < length:
        chunk = min(length - len(out), PAGE_SIZE - (addr % PAGE_SIZE))
        tr = vcpu.translate(addr)
        if not tr.valid:
            break
        try:
            out += memory.read(tr.physical_address, chunk)
        except GuestMemoryError:
            break
        addr += chunk
    return out


def handle_emulation_failure(vcpu: Vcpu, exit: InternalError,
                             memory: GuestMemory) -> str | None:
    """Finish an instruction KVM's emulator could not run, and return a line for the log.

    * ``int3`` (0xCC): inject #BP with RIP already past the int3, so the guest's handler sees
      the frame a real int3 trap leaves;
    * ``fwait`` (0x9B): nothing to wait for with x87 exceptions masked; step over it.

    Returns None when ``exit`` is not an emulation failure at all (not this module's business).
    Raises :class:`UnhandledEmulationFailure` with RIP and the instruction bytes otherwise.
    """
    if not isinstance(exit, InternalError) or exit.suberror != InternalSuberror.EMULATION:
        return None
    where, regs = _where(vcpu)
    insn = exit.insn_bytes
    source = "exit"
    if not insn:
        insn = read_insn_bytes(vcpu, memory, where.linear)
        source = "guest memory"
    if not insn:
        raise UnhandledEmulationFailure(
            f"vCPU {vcpu.index}: KVM could not emulate the instruction at rip {where.rip:#x}, "
            f"and its bytes are not readable (linear {where.linear:#x} is unmapped or not RAM)",
            where.rip, None)
    opcode = insn[0]
    if opcode == OPCODE_INT3:
        regs.rip = where.rip + 1
        vcpu.set_regs(regs)
        events = vcpu.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = BP_VECTOR
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        events.exception.pending = 0
        vcpu.set_vcpu_events(events)
        return f"pvm: vCPU {vcpu.index} int3 at rip {where.rip:#x}: injected #BP"
    if opcode == OPCODE_FWAIT:
        regs.rip = where.rip + 1
        vcpu.set_regs(regs)
        return f"pvm: vCPU {vcpu.index} fwait at rip {where.rip:#x}: stepped over"
    mx = _decode_mxcsr_insn(insn, regs)
    if mx is not None:
        op, gva, length = mx
        return _finish_mxcsr(vcpu, memory, regs, where, op, gva, length)
    raise UnhandledEmulationFailure(
        f"vCPU {vcpu.index}: KVM could not emulate the instruction at rip {where.rip:#x} "
        f"(bytes from {source}: {insn.hex(' ')})", where.rip, bytes(insn))


# -- ldmxcsr / stmxcsr (0F AE /2, 0F AE /3 with a memory operand) ---------------------------------
# Seen with Debian's 6.1 kernel (kernel_fpu_begin loads the default MXCSR): the emulator has no
# SSE state instructions. We decode the ModRM memory operand ourselves, move the 32-bit value
# between guest memory (translated and bounds-checked) and MXCSR (through the XSAVE area), and
# step over the instruction.

_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _decode_mxcsr_insn(insn: bytes, regs) -> tuple[str, int, int] | None:
    """("ld"|"st", guest virtual address, instruction length), or None if not such an insn."""
    i = 0
    rex = 0
    if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        rex = insn[i]
        i += 1
    if insn[i:i + 2] != b"\x0f\xae" or len(insn) < i + 3:
        return None
    modrm = insn[i + 2]
    i += 3
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3 or reg not in (2, 3):
        return None
    reg_value = lambda n: getattr(regs, _GPR_ORDER[n])  # noqa: E731
    addr: int | None  # None: RIP-relative, known once the instruction's length is
    addr = 0
    if rm == 4:  # SIB
        if len(insn) <= i:
            return None
        sib = insn[i]
        i += 1
        scale, index, base = sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), (sib & 7) | ((rex & 1) << 3)
        if index != 4:
            addr += reg_value(index) << scale
        if (sib & 7) == 5 and mod == 0:
            disp_len = 4
        else:
            addr += reg_value(base)
            disp_len = {0: 0, 1: 1, 2: 4}[mod]
    elif rm == 5 and mod == 0:  # RIP-relative: relative to the end of the instruction
        disp_len = 4
        addr = None
    else:
        addr += reg_value(rm | ((rex & 1) << 3))
        disp_len = {0: 0, 1: 1, 2: 4}[mod]
    if len(insn) < i + disp_len:
        return None
    disp = int.from_bytes(insn[i:i + disp_len], "little", signed=True) if disp_len else 0
    i += disp_len
    if addr is None:
        addr = regs.rip + i
    return ("ld" if reg == 2 else "st"), (addr + disp) & 0xFFFF_FFFF_FFFF_FFFF, i


def _finish_mxcsr(vcpu, memory, regs, where, op: str, gva: int, length: int) -> str:
    tr = vcpu.translate(gva)
    if not tr.valid or (gva & 0xFFF) > PAGE_SIZE - 4:
        raise UnhandledEmulationFailure(
            f"vCPU {vcpu.index}: {op}mxcsr at rip {where.rip:#x}: operand {gva:#x} is unmapped or "
            "crosses a page", where.rip, None)
    try:
        if op == "ld":
            vcpu.set_mxcsr(memory.read_u32(tr.physical_address))
        else:
            memory.write_u32(tr.physical_address, vcpu.get_mxcsr())
    except (GuestMemoryError, OSError) as exc:
        raise UnhandledEmulationFailure(
            f"vCPU {vcpu.index}: {op}mxcsr at rip {where.rip:#x} failed: {exc}", where.rip, None) from None
    regs.rip = where.rip + length
    vcpu.set_regs(regs)
    return f"pvm: vCPU {vcpu.index} {op}mxcsr at rip {where.rip:#x}: done by the VMM"
