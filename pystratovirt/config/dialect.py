"""Which StratoVirt command line an argv speaks: early 0.x or 2.x (the one Kata Containers sends).

Owns the rule, and the sentence for a command line that mixes the two. The rule:

* Each option occurrence may *pick* a dialect because only that dialect has it, or has it in that
  form. 0.x: ``-api-channel``, ``-config``, ``-balloon``, ``-rng``, ``-iothread``,
  ``-device vsock``, ``-netdev`` with ``netdev=`` (the tap's name), ``-drive`` with ``iops=`` or
  ``iothread=``, and ``-chardev`` without a backend word (``-chardev id=,path=``). 2.x: ``-qmp``,
  ``-uuid``, ``-object``, ``-global``, ``-cpu``, ``-device`` with a 2.x driver
  (every driver but ``vsock`` that either pystratovirt or StratoVirt 2.x knows), ``-netdev`` with
  ``ifname=``, ``-drive`` with ``if=`` or ``throttling.iops-total=``, ``-chardev`` with
  ``server``/``nowait``, and ``-serial chardev:<id>``.
* Every other option means the same in both, or is read by the dialect the others picked (a bare
  ``-m 2048`` is bytes in 0.x and MiB in 2.x). ``-incoming file:DIR`` (StratoVirt 2.x's) is one
  of them: a VM of either dialect can be saved and started again from its snapshot.
* Options that pick different dialects are an error naming the first of each. A command line
  where nothing picks a dialect is 0.x, so every command line the seed accepted means what it did.

``-qmp`` used to be an alias of ``-api-channel`` in the 0.x dialect; it now picks 2.x, as
StratoVirt renamed ``-api-channel`` to ``-qmp`` in 2.0. A 0.x command line that said ``-qmp``
still works unless it also uses a 0.x-only option (then: say ``-api-channel``) or a bare ``-m`` in
bytes (then: a size with a suffix, ``-m 256M``, means the same in both).
"""

from __future__ import annotations

from ..machine.vmconfig import Dialect
from .args import Occurrence, Parsed
from .errors import ConfigError

V0_OPTIONS = frozenset({"api-channel", "config", "balloon", "rng", "iothread"})
V2_OPTIONS = frozenset({"qmp", "uuid", "object", "global", "cpu"})

# -device drivers that mark a 2.x command line: the ones the micro-VM builds and the ones
# StratoVirt 2.x (or a client of it) knows that it refuses with a sentence (see cmdline2x).
V2_DRIVERS = frozenset({
    "virtio-blk-device", "virtio-net-device", "virtio-balloon-device", "virtio-rng-device",
    "virtio-serial-device", "virtconsole", "vhost-vsock-device",
    "virtio-blk-pci", "virtio-net-pci", "virtio-balloon-pci", "virtio-rng-pci", "virtio-serial-pci",
    "vhost-vsock-pci", "vhost-user-fs-device", "vhost-user-fs-pci", "vhost-user-blk-pci",
    "vhost-user-blk-device", "virtserialport", "vfio-pci", "pcie-root-port", "virtio-scsi-pci",
    "scsi-hd", "scsi-cd", "nec-usb-xhci", "usb-kbd", "usb-tablet", "usb-storage", "ramfb",
    "virtio-gpu-pci", "pvpanic",
})


def _items(value: str) -> tuple[str | None, set[str]]:
    """The bare first word of ``a,k=v,...`` (or None) and the keys/flags of every item."""
    items = value.split(",")
    first = items[0] if items and "=" not in items[0] else None
    return first, {item.partition("=")[0] for item in items}


def _vote(occ: Occurrence) -> tuple[Dialect, str] | None:
    """The dialect this occurrence picks and how to name it in an error, or None for either."""
    name = occ.option.name
    spelled = occ.spelling
    if name in V0_OPTIONS:
        return Dialect.V0, spelled
    if name in V2_OPTIONS:
        return Dialect.V2, spelled
    for value in occ.values:
        first, keys = _items(value)
        if name == "device" and first is not None:
            if first == "vsock":
                return Dialect.V0, f"{spelled} vsock"
            if first in V2_DRIVERS:
                return Dialect.V2, f"{spelled} {first}"
        elif name == "netdev":
            if "netdev" in keys:
                return Dialect.V0, f"{spelled} with netdev="
            if "ifname" in keys:
                return Dialect.V2, f"{spelled} with ifname="
        elif name == "drive":
            for key in ("iops", "iothread"):
                if key in keys:
                    return Dialect.V0, f"{spelled} with {key}="
            for key in ("if", "throttling.iops-total"):
                if key in keys:
                    return Dialect.V2, f"{spelled} with {key}="
        elif name == "chardev":
            if first is None:
                return Dialect.V0, f"{spelled} without a backend type"
            for flag in ("server", "nowait"):
                if flag in keys:
                    return Dialect.V2, f"{spelled} with {flag}"
        elif name == "serial" and value.startswith("chardev:"):
            return Dialect.V2, f"{spelled} chardev:"
    return None


def pick_dialect(parsed: Parsed) -> Dialect:
    """The dialect of a tokenized command line; ConfigError if two options disagree."""
    first: dict[Dialect, str] = {}
    for occ in parsed.occurrences:
        vote = _vote(occ)
        if vote is not None:
            first.setdefault(*vote)
    if len(first) < 2:
        return next(iter(first), Dialect.V0)
    old, new = first[Dialect.V0], first[Dialect.V2]
    if (old, new) == ("-api-channel", "-qmp"):
        raise ConfigError("-api-channel and -qmp both set the management socket; give only one of them.")
    raise ConfigError(f"The command line mixes StratoVirt's 0.x option {old} with the 2.x option {new}; "
                      "use one dialect (see docs/compatibility.md).")
