"""Fuzzing: any argv and any JSON document gives an Invocation or a ConfigError, never another exception."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.config import ConfigError, Invocation, parse_command_line
from pystratovirt.config.args import OPTIONS
from pystratovirt.config.draft import Draft
from pystratovirt.config.json_config import apply_json, apply_json_text
from pystratovirt.machine.vmconfig import VmConfig

SPELLINGS = [f"-{o.name}" for o in OPTIONS] + ["-S", "-h", "-V", "--unknown", "-", "-x"]
KEYS = ["", "id", "file", "readonly", "direct", "serial", "iothread", "iops", "netdev", "mac", "fds", "vhost",
        "vhostfds", "path", "guest-cid", "vhostfd", "cpus", "maxcpus", "sockets", "cores", "threads", "size", "type",
        "dump-guest-core", "mem-share", "kernel-extract", "deflate-on-oom", "random_file", "bytes_per_sec"]
ATOMS = ["on", "off", "yes", "maybe", "0", "1", "3", "4", "254", "255", "256M", "1G", "268435456", "-1", "",
         "microvm", "tap", "vsock", "stdio", "socket", "12:34:56:78:9A:BC", "unix:x.sock", "tcp:1:2",
         "/dev/urandom", "vmlinux.bin", "rootfs", "disk1", "io1", "é", "\0", "a" * 300, "x,y", "=", ","]


def kv_lists():
    pair = st.tuples(st.sampled_from(KEYS), st.one_of(st.sampled_from(ATOMS), st.text(max_size=8)))
    return st.lists(pair, max_size=5).map(lambda ps: ",".join(f"{k}={v}" if k else v for k, v in ps))


ARG = st.one_of(st.sampled_from(SPELLINGS), st.sampled_from(ATOMS), kv_lists(), st.text(max_size=12))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("vmlinux.bin", "rootfs", "disk1"):
        (root / name).write_bytes(b"\0" * 64)
    old = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(old)


def check_argv(argv: list[str]) -> None:
    try:
        result = parse_command_line(argv)
    except ConfigError as err:
        text = str(err)
        assert text and text.isprintable(), text
        return
    assert isinstance(result, Invocation)
    assert result.action in ("run", "help", "version")
    assert (result.config is not None) == (result.action == "run")
    if result.config is not None:
        assert isinstance(result.config, VmConfig)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ARG, max_size=14))
def test_random_argv(workdir, argv):
    check_argv(argv)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([s for s in SPELLINGS if s not in ("-h", "-V")]),
                          st.lists(st.one_of(st.sampled_from(ATOMS), kv_lists()), max_size=2)), max_size=8))
def test_structured_argv_with_kernel(workdir, pairs):
    argv = ["-kernel", "vmlinux.bin"]
    for option, values in pairs:
        argv += [option, *values]
    check_argv(argv)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=10), st.sampled_from(ATOMS))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=12)

SECTION_KEYS = {
    "boot-source": ["kernel_image_path", "boot_args", "initrd_fs_path"],
    "machine-config": ["type", "name", "vcpu_count", "max_vcpus", "mem_size", "mem_path", "mem_share",
                       "dump_guest_core", "kernel_extract"],
    "drive": ["drive_id", "path_on_host", "read_only", "direct", "serial_num", "iothread", "iops"],
    "net": ["iface_id", "host_dev_name", "mac", "tap_fd", "vhost_type", "vhost_fd", "iothread"],
    "console": ["console_id", "socket_path"],
    "vsock": ["vsock_id", "guest_cid", "vhost_fd"],
    "serial": ["stdio"],
    "iothread": ["id"],
    "balloon": ["deflate_on_oom"],
    "rng": ["random_file", "bytes_per_sec"],
}
FIELD_VALUES = st.one_of(JSON_SCALARS, st.sampled_from([True, False, 1, 3, 4, 268435456, "256M", "1G", "4",
                                                        "vmlinux.bin", "rootfs", "vhost-kernel", "/dev/urandom"]))


@st.composite
def schema_like_docs(draw):
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTION_KEYS, "bogus"]), unique=True, max_size=6)):
        keys = SECTION_KEYS.get(section, ["x"])
        body = draw(st.dictionaries(st.sampled_from(keys + ["extra"]), FIELD_VALUES, max_size=len(keys)))
        if section in ("drive", "net", "console", "iothread") and draw(st.booleans()):
            doc[section] = [body, *draw(st.lists(st.dictionaries(st.sampled_from(keys), FIELD_VALUES), max_size=2))]
        else:
            doc[section] = body
    return doc


def check_doc(doc) -> None:
    draft = Draft()
    try:
        apply_json(draft, doc)
        assert isinstance(draft.finish(), VmConfig)
    except ConfigError as err:
        assert str(err) and str(err).isprintable()


@settings(max_examples=600, deadline=None)
@given(JSON_VALUES)
def test_random_json_values(workdir, doc):
    check_doc(doc)


@settings(max_examples=600, deadline=None)
@given(schema_like_docs())
def test_schema_like_json(workdir, doc):
    check_doc(doc)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_random_json_text(text):
    try:
        apply_json_text(Draft(), text)
    except ConfigError as err:
        assert str(err) and str(err).isprintable()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_like_docs(), st.lists(ARG, max_size=6))
def test_json_file_plus_argv(workdir, doc, argv):
    (workdir / "vm.json").write_text(json.dumps(doc))
    check_argv(["-config", "vm.json", *argv])
