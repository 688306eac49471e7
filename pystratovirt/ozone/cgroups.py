"""cgroup limits for a jailed VMM: ``<mount>/<exec name>/<name>`` in each hierarchy, as StratoVirt
lays them out.

cgroup v2 is used for a controller the unified hierarchy offers (its root's
``cgroup.controllers``). A host in hybrid mode (v2 mounted with few or no controllers, the
others in v1 hierarchies, as this project's CI host) gets the v1 hierarchy of that controller
instead; a host with neither gets one warning sentence per limit, which is then not applied.

Keys: StratoVirt's ``cpuset.cpus`` and ``memory.limit_in_bytes``, the v2 names ``memory.max``,
``pids.max``, ``cpu.max`` (``QUOTA PERIOD`` or ``max PERIOD``) and ``cpuset.mems`` (``-numa``).
Each is written under its own name in the hierarchy that serves it (``memory.max`` and
``memory.limit_in_bytes`` are the same limit; so are ``cpu.max`` and v1's CFS quota/period).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PyStratoVirtError

MOUNTS = "/proc/self/mounts"

# key -> (controller, v2 file, v1 file(s))
_KEYS = {
    "cpuset.cpus": ("cpuset", "cpuset.cpus", "cpuset.cpus"),
    "cpuset.mems": ("cpuset", "cpuset.mems", "cpuset.mems"),
    "memory.limit_in_bytes": ("memory", "memory.max", "memory.limit_in_bytes"),
    "memory.max": ("memory", "memory.max", "memory.limit_in_bytes"),
    "pids.max": ("pids", "pids.max", "pids.max"),
    "cpu.max": ("cpu", "cpu.max", "cpu.cfs_quota_us"),
}


class CgroupError(PyStratoVirtError):
    """A limit could not be set or removed; the message is one sentence."""


@dataclass(frozen=True)
class Hierarchy:
    mount: str
    version: int            # 1 or 2
    controllers: frozenset  # what it serves

    def leaf(self, exec_name: str, name: str) -> str:
        return os.path.join(self.mount, exec_name, name)


def hierarchies(mounts_file: str = MOUNTS) -> list[Hierarchy]:
    """Every cgroup hierarchy mounted here (v2 first)."""
    found = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            fstype, mount, options = fields[2], fields[1], fields[3].split(",")
            if fstype == "cgroup2":
                try:
                    with open(os.path.join(mount, "cgroup.controllers")) as c:
                        controllers = frozenset(c.read().split())
                except OSError:
                    controllers = frozenset()
                found.append(Hierarchy(mount, 2, controllers))
            elif fstype == "cgroup":
                found.append(Hierarchy(mount, 1, frozenset(o for o in options if o in {k[0] for k in _KEYS.values()})))
    return sorted(found, key=lambda h: -h.version)


def check_keys(keys) -> None:
    for key in keys:
        if key not in _KEYS:
            raise CgroupError(f"Unknown cgroup argument: {key} (known: {', '.join(sorted(_KEYS))}).")


def apply(limits: dict[str, str], exec_name: str, name: str, pid: int,
          hiers: list[Hierarchy] | None = None) -> list[str]:
    """Create the cgroups, write ``limits``, move ``pid`` in; returns warning sentences for
    limits this host cannot enforce."""
    check_keys(limits)
    hiers = hierarchies() if hiers is None else hiers
    warnings = []
    joined: set[str] = set()
    for key, value in limits.items():
        controller, v2_file, v1_file = _KEYS[key]
        hier = next((h for h in hiers if controller in h.controllers), None)
        if hier is None:
            v2 = [", ".join(sorted(h.controllers)) or "none" for h in hiers if h.version == 2]
            warnings.append(f"ozone: this host has no cgroup '{controller}' controller (cgroup v2 offers: "
                            f"{v2[0] if v2 else 'not mounted'}; no v1 hierarchy for it): {key}={value} is not applied.")
            continue
        leaf = hier.leaf(exec_name, name)
        _make(hier, exec_name, name, controller)
        if hier.version == 2:
            _write(leaf, v2_file, value)
        elif key == "cpu.max":
            quota, _, period = value.partition(" ")
            if period:
                _write(leaf, "cpu.cfs_period_us", period)
            _write(leaf, "cpu.cfs_quota_us", "-1" if quota == "max" else quota)
        else:
            _write(leaf, v1_file, value)
        if leaf not in joined:
            _write(leaf, "cgroup.procs", str(pid))
            joined.add(leaf)
    return warnings


def _make(hier: Hierarchy, exec_name: str, name: str, controller: str) -> None:
    parent = os.path.join(hier.mount, exec_name)
    leaf = os.path.join(parent, name)
    for path, above in ((parent, hier.mount), (leaf, parent)):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise CgroupError(f"Cannot create cgroup {path}: {exc.strerror}.") from None
        if hier.version == 2:
            # A v2 controller is usable in a child only if its parent delegates it.
            try:
                _write(above, "cgroup.subtree_control", f"+{controller}")
            except CgroupError:
                pass  # already enabled or not delegable: the value write below says which
        elif controller == "cpuset":
            # A v1 cpuset starts empty and takes no task until it has CPUs and memory nodes.
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not _read(path, f):
                    _write(path, f, _read(above, f))


def _read(path: str, name: str) -> str:
    try:
        with open(os.path.join(path, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _write(path: str, name: str, value: str) -> None:
    target = os.path.join(path, name)
    try:
        with open(target, "w") as f:
            f.write(value)
    except OSError as exc:
        raise CgroupError(f"Cannot write '{value}' to {target}: {exc.strerror}.") from None


def remove(exec_name: str, name: str, hiers: list[Hierarchy] | None = None) -> list[str]:
    """Remove this VM's cgroup in every hierarchy (and the per-VMM parent once empty); returns
    what it removed. A cgroup that still has processes is an error."""
    removed = []
    for hier in (hierarchies() if hiers is None else hiers):
        parent = os.path.join(hier.mount, exec_name)
        leaf = os.path.join(parent, name)
        if os.path.isdir(leaf):
            try:
                os.rmdir(leaf)
            except OSError as exc:
                raise CgroupError(f"Cannot remove cgroup {leaf}: {exc.strerror} "
                                  "(is the VM still running?).") from None
            removed.append(leaf)
        try:
            os.rmdir(parent)  # only succeeds when no other VM of this VMM has a cgroup there
            removed.append(parent)
        except OSError:
            pass
    return removed
