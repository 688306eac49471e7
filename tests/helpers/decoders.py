"""Decode QMP replies the way the real 2.x clients' typed decoders do, and fail where they fail.

Written from the clients' type definitions (../shared/reference/stratovirt-2x-clients.md §2.4,
§5.1, §6 items 7-8): Kata's govmm decodes with Go's ``encoding/json`` into structs, Kuasar with
serde through qapi-rs. Their rules differ, so each has its own checker:

* **Go** (``go_decode``): a missing field is left at its zero value; a present field must have
  the struct field's JSON type exactly (a Go ``int`` takes only an integral number within int64,
  ``bool`` only true/false, ``string`` only a string; ``null`` leaves the zero value); unknown
  fields are ignored. A mismatch fails the whole call (``json: cannot unmarshal ...``).
* **serde** (``serde_decode``): every field without ``#[serde(default)]`` is required; ``i64``
  must be an integral number in range, ``bool`` a boolean, ``String`` a string; an externally
  given enum must be one of its variant names; unknown fields are ignored (the structs do not
  deny them).
"""

from __future__ import annotations

INT64 = (-(1 << 63), (1 << 63) - 1)

# Go types as nested specs: "int", "bool", "string", or a dict of field -> spec.
GO_CPU_PROPERTIES = {"node-id": "int", "socket-id": "int", "die-id": "int", "core-id": "int",
                     "thread-id": "int"}
#: govmm qemu/qmp.go ``CPUInfo`` (Kata's GetThreadIDs decodes query-cpus into []CPUInfo).
GO_CPU_INFO = {"CPU": "int", "current": "bool", "halted": "bool", "qom_path": "string",
               "arch": "string", "pc": "int", "thread_id": "int", "props": GO_CPU_PROPERTIES}
#: openEuler Kata's health check: query-status into {running bool, singlestep bool, status string}.
GO_STATUS = {"running": "bool", "singlestep": "bool", "status": "string"}
#: govmm's greeting: QMP.version.qemu.{major,minor,micro} (capabilities optional, read as []).
GO_GREETING = {"QMP": {"version": {"qemu": {"major": "int", "minor": "int", "micro": "int"}}}}

#: qapi's RunState names, which qapi-rs's StatusInfo.status must be one of.
RUN_STATES = {"debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
              "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
              "suspended", "watchdog", "guest-panicked", "colo"}


class DecodeError(AssertionError):
    pass


def _go_value(value, spec, where: str) -> None:
    if value is None:
        return  # null leaves Go's zero value
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise DecodeError(f"json: cannot unmarshal into Go struct field {where}")
        for key, sub in spec.items():
            if key in value:
                _go_value(value[key], sub, f"{where}.{key}")
        return
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool)
          and INT64[0] <= v <= INT64[1],
          "bool": lambda v: isinstance(v, bool),
          "string": lambda v: isinstance(v, str)}[spec]
    if not ok(value):
        raise DecodeError(f"json: cannot unmarshal {value!r} into Go struct field {where} of "
                          f"type {spec}")


def go_decode(value, spec, name: str = "value") -> None:
    """Raise DecodeError where Go's json.Unmarshal into the struct ``spec`` would fail."""
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise DecodeError(f"json: cannot unmarshal into []{name}")
        for i, item in enumerate(value):
            _go_value(item, spec[0], f"{name}[{i}]")
        return
    _go_value(value, spec, name)


def _serde_field(obj: dict, key: str, kind: str, where: str) -> None:
    if key not in obj:
        raise DecodeError(f"missing field `{key}` in {where}")
    v = obj[key]
    if kind == "i64":
        good = isinstance(v, int) and not isinstance(v, bool) and INT64[0] <= v <= INT64[1]
    elif kind == "bool":
        good = isinstance(v, bool)
    elif kind == "String":
        good = isinstance(v, str)
    elif isinstance(kind, set):
        good = isinstance(v, str) and v in kind
    else:
        raise AssertionError(kind)
    if not good:
        raise DecodeError(f"invalid type for `{key}` in {where}: {v!r}, expected {kind}")


def serde_cpu_infos(value) -> None:
    """Kuasar's ``Vec<CpuInfo>``: an enum tagged by ``arch`` ("x86" or "arm"), each variant the
    flattened CpuInfoBase {CPU: i64, current: bool, halted: bool, qom_path: String,
    thread_id: i64}, all required."""
    if not isinstance(value, list):
        raise DecodeError("invalid type: expected a sequence")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DecodeError(f"invalid type for CpuInfo[{i}]")
        _serde_field(item, "arch", {"x86", "arm"}, f"CpuInfo[{i}]")
        for key, kind in (("CPU", "i64"), ("current", "bool"), ("halted", "bool"),
                          ("qom_path", "String"), ("thread_id", "i64")):
            _serde_field(item, key, kind, f"CpuInfo[{i}]")


def serde_status(value) -> None:
    """qapi-rs ``StatusInfo``: running, singlestep (bool) and status (a RunState), required."""
    if not isinstance(value, dict):
        raise DecodeError("invalid type: expected StatusInfo")
    _serde_field(value, "running", "bool", "StatusInfo")
    _serde_field(value, "singlestep", "bool", "StatusInfo")
    _serde_field(value, "status", RUN_STATES, "StatusInfo")


def serde_greeting(value) -> None:
    """qapi-rs's greeting: {"QMP":{"version":{"qemu":{major,minor,micro},"package":String},
    "capabilities":[...]}}, every member required."""
    try:
        qmp = value["QMP"]
        version, capabilities = qmp["version"], qmp["capabilities"]
        qemu, package = version["qemu"], version["package"]
    except (KeyError, TypeError) as exc:
        raise DecodeError(f"missing field {exc} in the greeting") from None
    for key in ("major", "minor", "micro"):
        _serde_field(qemu, key, "i64", "VersionTriple")
    if not isinstance(package, str) or not isinstance(capabilities, list):
        raise DecodeError("invalid type in the greeting")
