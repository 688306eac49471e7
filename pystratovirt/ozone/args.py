"""The ``ozone`` command line, StratoVirt's (ozone/src/args.rs): one-dash options, values are
the following words that do not start with '-', and everything after ``--`` is the VMM's.

    ozone -name NAME -exec_file PATH -uid N -gid N [-source FILE...] [-netns PATH]
          [-capability CAP_X,CAP_Y] [-numa NODE] [-cgroup KEY=VALUE...] [-clean-resource]
          -- VMM ARGS...

``-exec-file`` (Kata's spelling) is the same as ``-exec_file``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import PyStratoVirtError
from ..util.jail import capability_number

MAX_NAME_LEN = 255
MAX_ID = 65535


class OzoneArgError(PyStratoVirtError):
    """Bad command line; the message is one sentence."""


@dataclass
class OzoneArgs:
    name: str
    exec_file: str
    uid: int
    gid: int
    sources: list[str] = field(default_factory=list)
    netns: str | None = None
    capabilities: list[str] = field(default_factory=list)
    numa: str | None = None
    cgroup: dict[str, str] = field(default_factory=dict)
    clean_resource: bool = False
    vmm_args: list[str] = field(default_factory=list)


_VALUE, _VALUES, _FLAG = "value", "values", "flag"
_OPTIONS = {"name": _VALUE, "exec_file": _VALUE, "uid": _VALUE, "gid": _VALUE, "source": _VALUES,
            "netns": _VALUE, "capability": _VALUE, "numa": _VALUE, "cgroup": _VALUES,
            "clean-resource": _FLAG}
_ALIASES = {"exec-file": "exec_file"}
USAGE = ("usage: ozone -name NAME -exec_file PATH -uid N -gid N [-source FILE...] [-netns PATH] "
         "[-capability CAP_X,...] [-numa NODE] [-cgroup KEY=VALUE...] [-clean-resource] -- VMM ARGS")


def parse(argv: list[str]) -> OzoneArgs:
    if "--" in argv:
        split = argv.index("--")
        own, vmm = argv[:split], argv[split + 1:]
    else:
        own, vmm = argv, []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(own):
        token = own[i]
        key = _ALIASES.get(token[1:], token[1:]) if token.startswith("-") else None
        if key not in _OPTIONS:
            raise OzoneArgError(f"Unexpected argument '{token}'. {USAGE}")
        if key in values:
            raise OzoneArgError(f"-{key} is given more than once.")
        i += 1
        got = []
        while i < len(own) and not own[i].startswith("-"):
            got.append(own[i])
            i += 1
        kind = _OPTIONS[key]
        if kind == _FLAG and got:
            raise OzoneArgError(f"-{key} takes no value, but got '{got[0]}'.")
        if kind == _VALUE and len(got) != 1:
            raise OzoneArgError(f"-{key} takes exactly one value.")
        if kind == _VALUES and not got:
            raise OzoneArgError(f"-{key} needs at least one value.")
        values[key] = got
    for required in ("name", "exec_file", "uid", "gid"):
        if required not in values:
            raise OzoneArgError(f"-{required} is required. {USAGE}")
    args = OzoneArgs(name=_name(values["name"][0]), exec_file=values["exec_file"][0],
                     uid=_id(values["uid"][0], "uid"), gid=_id(values["gid"][0], "gid"),
                     clean_resource="clean-resource" in values, vmm_args=vmm)
    args.sources = values.get("source", [])
    args.netns = values.get("netns", [None])[0]
    if "capability" in values:
        for cap in values["capability"][0].upper().split(","):
            if capability_number(cap) is None or not cap.startswith("CAP_"):
                raise OzoneArgError(f"Invalid capability argument: {cap}.")
            args.capabilities.append(cap)
    if "numa" in values:
        node = values["numa"][0]
        if not node.isdigit():
            raise OzoneArgError(f"Failed to parse {node} to numa: a NUMA node number is expected.")
        args.numa = node
    for item in values.get("cgroup", []):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise OzoneArgError(f"Invalid parameter: {item} (expected -cgroup KEY=VALUE).")
        if key in args.cgroup:
            raise OzoneArgError(f"{key} has been set more than once.")
        args.cgroup[key] = value
    if args.clean_resource and vmm:
        raise OzoneArgError("-clean-resource takes no VMM arguments.")
    if not args.clean_resource and not vmm:
        raise OzoneArgError("No VMM arguments: give them after '--'.")
    return args


def _name(name: str) -> str:
    # The name becomes a directory under the jail base and a cgroup: nothing that could climb out.
    if not name or len(name) > MAX_NAME_LEN:
        raise OzoneArgError(f"Input name's length must be between 1 and {MAX_NAME_LEN}.")
    if "/" in name or name in (".", "..") or "\0" in name:
        raise OzoneArgError(f"Invalid name '{name}': it must not contain '/' or be '.' or '..'.")
    return name


def _id(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > MAX_ID:
        raise OzoneArgError(f"Input {what} should be a number no more than {MAX_ID}, got '{text}'.")
    return int(text)


def exec_name(exec_file: str) -> str:
    return os.path.basename(exec_file.rstrip("/"))
