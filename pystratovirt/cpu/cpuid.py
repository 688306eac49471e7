"""The guest CPU model: CPUID tables derived from KVM_GET_SUPPORTED_CPUID, one per vCPU.

Two topologies are in play and they differ on purpose, as in StratoVirt:

* The *management* topology (:class:`Topology`) is what QMP reports. StratoVirt's micro-VM puts
  every vCPU in a socket of its own (sockets = max_cpus, cores = threads = 1), so query-cpus
  shows socket-id = N for CPU N.
* The *guest-visible* topology (CPUID) is one package holding ``max_cpus`` single-threaded
  cores, the x2APIC/APIC id of vCPU N being N. It is sized by ``max_cpus``, not by the number of
  vCPUs online at boot, so the slots a guest may see later (offline or hot-added CPUs) already
  have their place in the package and every CPU agrees on the package's shape.

Everything else follows the host: KVM's supported values are kept unless a rule below changes
them (:meth:`CpuModel.entries_for` lists the rules).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from ..kvm.ioctl import Cap
from ..kvm.structs import KVM_CPUID_FLAG_SIGNIFICANT_INDEX, CpuidEntry

if typing.TYPE_CHECKING:
    from pystratovirt.kvm.system import Kvm

# APIC ids are 8 bits in xAPIC mode and 0xff is the broadcast id; StratoVirt caps vCPUs at 254.
MAX_VCPUS = 254

# CPUID bits this module sets or clears.
LEAF1_ECX_CX16 = 1 << 13
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
LEAF6_ECX_EPB = 1 << 3

LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2

BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)


@dataclass(frozen=True)
class Topology:
    """vCPU counts and the management (QMP) topology; ``sockets * cores * threads == max_cpus``."""

    cpus: int
    max_cpus: int
    sockets: int
    cores: int
    threads: int

    def __post_init__(self):
        if not 1 <= self.cpus <= self.max_cpus:
            raise ValueError(f"cpus={self.cpus} must be between 1 and max_cpus={self.max_cpus}")
        if self.max_cpus > MAX_VCPUS:
            raise ValueError(f"max_cpus={self.max_cpus} exceeds the limit of {MAX_VCPUS}")
        if min(self.sockets, self.cores, self.threads) < 1:
            raise ValueError("sockets, cores and threads must be at least 1")
        if self.sockets * self.cores * self.threads != self.max_cpus:
            raise ValueError(f"sockets={self.sockets} * cores={self.cores} * threads={self.threads}"
                             f" does not equal max_cpus={self.max_cpus}")

    @classmethod
    def for_cpus(cls, cpus: int, max_cpus: int | None = None) -> Topology:
        """StratoVirt's default: one socket per possible vCPU."""
        max_cpus = cpus if max_cpus is None else max_cpus
        return cls(cpus=cpus, max_cpus=max_cpus, sockets=max_cpus, cores=1, threads=1)

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.max_cpus:
            raise ValueError(f"vCPU index {index} is outside 0..{self.max_cpus - 1}")

    def apic_id(self, index: int) -> int:
        """The (x2)APIC id of vCPU ``index``; ids are dense, 0..max_cpus-1."""
        self.check_index(index)
        return index

    def qmp_ids(self, index: int) -> tuple[int, int, int]:
        """(socket-id, core-id, thread-id) of vCPU ``index`` as QMP reports them."""
        self.check_index(index)
        return (index // (self.cores * self.threads), (index // self.threads) % self.cores,
                index % self.threads)

    @property
    def package_cpus(self) -> int:
        """Logical processors in the one guest-visible package."""
        return self.max_cpus

    @property
    def core_id_bits(self) -> int:
        """Width of the core-id field of an APIC id: log2 of package_cpus, rounded up."""
        return (self.package_cpus - 1).bit_length()


def _brand_regs(brand: str) -> list[tuple[int, int, int, int]]:
    """The 48-byte NUL-padded brand string as (eax, ebx, ecx, edx) for leaves 0x8000000[234]."""
    raw = brand.encode("ascii", "replace")[:47].ljust(48, b"\0")
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 48, 4)]
    return [(words[i], words[i + 1], words[i + 2], words[i + 3]) for i in range(0, 12, 4)]


def host_brand_string(cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """The host's 'model name', for hosts whose KVM reports empty brand leaves."""
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip() or None
    except OSError:
        return None
    return None


class CpuModel:
    """Per-vCPU CPUID tables for one VM; build once, ask :meth:`entries_for` per vCPU."""

    def __init__(self, supported: typing.Sequence[CpuidEntry], topology: Topology, *,
                 tsc_deadline: bool, mask_cx16: bool = True, brand: str | None = None):
        self.supported = tuple(supported)
        self.topology = topology
        self.tsc_deadline = tsc_deadline
        self.mask_cx16 = mask_cx16
        self.brand = brand

    @classmethod
    def from_kvm(cls, kvm: Kvm, topology: Topology, *, mask_cx16: bool = True,
                 brand: str | None = None) -> CpuModel:
        supported = kvm.get_supported_cpuid()
        if brand is None and not _has_brand(supported):
            brand = host_brand_string()
        return cls(supported, topology, mask_cx16=mask_cx16, brand=brand,
                   tsc_deadline=bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER)))

    @property
    def vendor(self) -> str:
        for e in self.supported:
            if e.function == 0:
                return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
                    "ascii", "replace")
        return ""

    def entries_for(self, index: int) -> list[CpuidEntry]:
        """The CPUID table of vCPU ``index``. Changes made to KVM's supported values:

        * leaf 1: hypervisor bit set; CX16 cleared (``mask_cx16``; emulating hosts cannot run
          cmpxchg16b in ring 0, and Linux does fine without it); TSC-deadline set exactly when
          KVM can emulate it; EBX[31:24] = APIC id, EBX[23:16] = logical processors per package,
          and EDX.HTT set when that is more than one;
        * leaf 4: host cache geometry, with EAX[31:26] = cores per package - 1 and EAX[25:14] =
          threads sharing the cache - 1 (1 for L1/L2, the whole package for L3 and up);
        * leaves 0xB and 0x1F (if the host has them): SMT level of one thread, core level of
          ``package_cpus`` logical processors, EDX = x2APIC id on every sub-leaf;
        * leaf 6: the energy-performance-bias bit cleared (its MSR is not emulated);
        * leaf 0xA: kept only for an architectural PMU of version 2 with general counters,
          otherwise zeroed so the guest does not drive a PMU it half-has;
        * brand leaves: ``brand`` when given (or when KVM's are empty), otherwise KVM's;
        * AMD leaf 0x80000008 ECX: core count and APIC-id size of the package.

        KVM's paravirtual leaves 0x40000000/0x40000001 are passed on as supported.
        """
        topo = self.topology
        apic_id = topo.apic_id(index)
        package = topo.package_cpus
        out: list[CpuidEntry] = []
        topology_leaves_done: set[int] = set()
        for e in self.supported:
            fn = e.function
            if fn == 1:
                ecx = e.ecx | LEAF1_ECX_HYPERVISOR
                if self.mask_cx16:
                    ecx &= ~LEAF1_ECX_CX16
                ecx = (ecx | LEAF1_ECX_TSC_DEADLINE) if self.tsc_deadline else (ecx & ~LEAF1_ECX_TSC_DEADLINE)
                ebx = (e.ebx & 0xFFFF) | (min(package, 0xFF) << 16) | ((apic_id & 0xFF) << 24)
                edx = (e.edx | LEAF1_EDX_HTT) if package > 1 else (e.edx & ~LEAF1_EDX_HTT)
                out.append(e.with_regs(ebx=ebx, ecx=ecx, edx=edx))
            elif fn == 4:
                if e.eax & 0x1F == 0:  # cache type "null": the end of the list, leave it zero
                    out.append(e)
                    continue
                level = (e.eax >> 5) & 0x7
                sharing = 1 if level <= 2 else package
                eax = (e.eax & 0x3FFF) | ((min(sharing, 4096) - 1) << 14) | ((min(package, 64) - 1) << 26)
                out.append(e.with_regs(eax=eax))
            elif fn == 6:
                out.append(e.with_regs(ecx=e.ecx & ~LEAF6_ECX_EPB))
            elif fn == 0xA:
                version, counters = e.eax & 0xFF, (e.eax >> 8) & 0xFF
                if version == 2 and counters > 0:
                    out.append(e)
                else:
                    out.append(e.with_regs(eax=0, ebx=0, ecx=0, edx=0))
            elif fn in (0xB, 0x1F):
                if fn not in topology_leaves_done:
                    topology_leaves_done.add(fn)
                    out.extend(self._topology_leaf(fn, apic_id))
            elif fn in BRAND_LEAVES and self.brand is not None:
                eax, ebx, ecx, edx = _brand_regs(self.brand)[fn - BRAND_LEAVES[0]]
                out.append(e.with_regs(eax=eax, ebx=ebx, ecx=ecx, edx=edx))
            elif fn == 0x8000_0008 and self.vendor == "AuthenticAMD":
                ecx = (e.ecx & ~0xF0FF) | (topo.core_id_bits << 12) | ((package - 1) & 0xFF)
                out.append(e.with_regs(ecx=ecx))
            else:
                out.append(e)
        return out

    def _topology_leaf(self, fn: int, apic_id: int) -> list[CpuidEntry]:
        """Leaf 0xB / 0x1F: SMT level, core level, then the terminating invalid level."""
        topo = self.topology
        flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
        return [
            # SMT: one thread per core, so no APIC-id bits below the core id.
            CpuidEntry(fn, 0, flags, eax=0, ebx=1, ecx=(LEVEL_TYPE_SMT << 8) | 0, edx=apic_id),
            # Core: shifting the APIC id right by core_id_bits yields the package id (0).
            CpuidEntry(fn, 1, flags, eax=topo.core_id_bits, ebx=topo.package_cpus,
                       ecx=(LEVEL_TYPE_CORE << 8) | 1, edx=apic_id),
            CpuidEntry(fn, 2, flags, eax=0, ebx=0, ecx=(LEVEL_TYPE_INVALID << 8) | 2, edx=apic_id),
        ]


def _has_brand(entries: typing.Iterable[CpuidEntry]) -> bool:
    return any(e.function in BRAND_LEAVES and (e.eax or e.ebx or e.ecx or e.edx) for e in entries)


def find(entries: typing.Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for ``function``/``index`` in a table, or None."""
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None
