"""The -config JSON file: schema, type errors, and how the command line overrides or adds to it."""

from __future__ import annotations

import json

import pytest

from config.early import console, disks, drive, net, nics
from pystratovirt.config import ConfigError, parse_command_line
from pystratovirt.machine.vmconfig import (
    BalloonConfig,
    BootSource,
    IothreadConfig,
    MachineConfig,
    RngConfig,
    SerialConfig,
    VmConfig,
    VsockConfig,
)
from pystratovirt.memory.layout import GiB, MiB

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off tsc=reliable ipv6.disable=1 root=/dev/vda"


def default_json(env) -> dict:
    """docs/default.json of v0.2.0: kernel, boot args, 1 vCPU, 256 MiB, a rootfs drive, stdio serial, balloon."""
    return {
        "boot-source": {"kernel_image_path": env.kernel, "boot_args": BOOT_ARGS},
        "machine-config": {"vcpu_count": 1, "mem_size": 268435456},
        "drive": [{"drive_id": "rootfs", "path_on_host": env.rootfs, "direct": False, "read_only": False}],
        "serial": {"stdio": True},
        "balloon": {"deflate_on_oom": True},
    }


def run(env, doc, *extra: str, name: str = "vm.json") -> VmConfig:
    env.write_json(doc, name)
    return parse_command_line(["-config", name, *extra]).config


def error(env, doc, *extra: str, name: str = "vm.json") -> str:
    with pytest.raises(ConfigError) as err:
        run(env, doc, *extra, name=name)
    return str(err.value)


def test_default_json(env):
    """The guidebook's `stratovirt -config ./default.json -api-channel unix:/path/to/socket` (and the seed's)."""
    cfg = run(env, default_json(env), "-api-channel", "unix:api.sock")
    assert cfg == VmConfig(
        boot=BootSource(env.kernel, BOOT_ARGS),
        **disks(drive("rootfs", env.rootfs, read_only=False, direct=False)),
        serial=SerialConfig(stdio=True), balloon=BalloonConfig(deflate_on_oom=True), qmp_socket="api.sock")


def test_hydropper_template_with_strings(env):
    """hydropper's micro_vm.json after its ${VCPU}/${MEMSIZE} substitution: the numbers arrive as strings."""
    doc = {"boot-source": {"kernel_image_path": env.kernel, "boot_args": "rw console=hvc0 lastbus=0 root=/dev/vda"},
           "drive": [{"drive_id": "rootfs", "path_on_host": env.rootfs, "direct": True, "read_only": False}],
           "machine-config": {"vcpu_count": "4", "mem_size": "2524971008"}}
    cfg = run(env, doc)
    assert (cfg.machine.vcpus, cfg.machine.mem_size) == (4, 2408 * MiB)


def test_every_section(env):
    doc = {
        "boot-source": {"kernel_image_path": env.kernel, "boot_args": "a b", "initrd_fs_path": env.initrd},
        "machine-config": {"type": "MicroVm", "name": "vm7", "vcpu_count": 2, "max_vcpus": 4, "mem_size": "1G",
                           "mem_path": "/dev/hugepages", "mem_share": True, "dump_guest_core": False,
                           "kernel_extract": False},
        "drive": [{"drive_id": "rootfs", "path_on_host": env.rootfs, "read_only": True, "direct": True,
                   "serial_num": "11111111", "iothread": "io1", "iops": 200},
                  {"drive_id": "d1", "path_on_host": "disk1", "read_only": False, "direct": False,
                   "serial_num": None, "iothread": None, "iops": None}],
        "net": [{"iface_id": "net0", "host_dev_name": "tap0", "mac": "12:34:56:78:9A:BC", "tap_fd": 10,
                 "vhost_type": "vhost-kernel", "vhost_fd": 11, "iothread": "io1"}],
        "console": [{"console_id": "charconsole0", "socket_path": "console.sock"}],
        "vsock": {"vsock_id": "vsock-3", "guest_cid": 3},
        "serial": {"stdio": False},
        "iothread": [{"id": "io1"}],
        "balloon": {"deflate_on_oom": False},
        "rng": {"random_file": "/dev/urandom", "bytes_per_sec": 1000000},
    }
    assert run(env, doc) == VmConfig(
        name="vm7", boot=BootSource(env.kernel, "a b", env.initrd),
        machine=MachineConfig(vcpus=2, max_vcpus=4, mem_size=GiB, mem_path="/dev/hugepages", mem_share=True,
                              dump_guest_core=False),
        **disks(drive("rootfs", env.rootfs, True, True, "11111111", "io1", 200),
                drive("d1", "disk1", False, False)),
        **nics(net("net0", "tap0", "12:34:56:78:9A:BC", True, [10], [11], "io1")),
        **console("charconsole0", "console.sock"), vsock=VsockConfig("vsock-3", 3),
        serial=SerialConfig(stdio=False), iothreads=[IothreadConfig("io1")], balloon=BalloonConfig(False),
        rng=RngConfig("/dev/urandom", 1_000_000), extract_payload=False)


def test_machine_config_string_booleans(env):
    doc = default_json(env)
    doc["machine-config"] = {"mem_share": "true", "dump_guest_core": "false"}
    m = run(env, doc).machine
    assert (m.mem_share, m.dump_guest_core) == (True, False)


# -- file-level errors -------------------------------------------------------------------------

def test_file_name_must_contain_json(env):
    assert error(env, default_json(env), name="vm.conf") == "Only support 'json' format config-file"


def test_file_missing(env):
    with pytest.raises(ConfigError) as err:
        parse_command_line(["-config", "nope.json"])
    assert str(err.value) == "Failed to open config file by: No such file or directory."


def test_file_is_a_directory(env):
    (env.root / "dir.json").mkdir()
    with pytest.raises(ConfigError, match="Failed to open config file by: Is a directory."):
        parse_command_line(["-config", "dir.json"])


def test_malformed_json_has_line_and_column(env):
    text = '{\n  "machine-config": {"vcpu_count": 1,}\n}'
    assert error(env, text) == (
        "Failed to parse config file 'vm.json': Expecting property name enclosed in double quotes at line 2 "
        "column 38.")
    assert error(env, "") == "Failed to parse config file 'vm.json': Expecting value at line 1 column 1."


def test_not_utf8(env):
    (env.root / "bad.json").write_bytes(b'{"boot-source": {"boot_args": "\xff"}}')
    with pytest.raises(ConfigError, match=r"^The config file 'bad.json' is not valid UTF-8 \(byte 31\)\.$"):
        parse_command_line(["-config", "bad.json"])


@pytest.mark.parametrize("doc, kind", [([], "an array"), ("3", "an integer"), ('"x"', "a string"), ("null", "null")])
def test_top_level_must_be_an_object(env, doc, kind):
    assert error(env, doc if isinstance(doc, str) else json.dumps(doc)) == (
        f"The config file must hold a JSON object, not {kind}.")


def test_unknown_top_level_key(env):
    doc = default_json(env)
    doc["drives"] = []
    assert error(env, doc) == "Invalid json field 'drives'"


@pytest.mark.parametrize("section, key", [
    ("boot-source", "kernel"), ("machine-config", "omit_vm_memory"), ("serial", "pty"), ("balloon", "stats"),
    ("vsock", "cid"), ("rng", "filename"),
])
def test_unknown_nested_key(env, section, key):
    doc = default_json(env)
    value = {"vsock": {"vsock_id": "v", "guest_cid": 3}, "rng": {"random_file": "/dev/urandom"}}.get(section, {})
    doc[section] = {**doc.get(section, value), key: 1}
    assert error(env, doc) == f"Invalid json field '{section}.{key}'"


def test_unknown_drive_key(env):
    doc = default_json(env)
    doc["drive"][0]["is_read_only"] = False
    assert error(env, doc) == "Invalid json field 'drive[0].is_read_only'"


def test_duplicate_key(env):
    text = '{"machine-config": {"vcpu_count": 1, "vcpu_count": 2}}'
    assert error(env, text) == "Duplicate json field 'vcpu_count' in the config file."


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_numbers(env, literal):
    assert error(env, '{"machine-config": {"vcpu_count": ' + literal + '}}') == (
        f"Failed to parse config file: {literal} is not a valid JSON number.")


def test_numbers_too_large_for_a_double_are_refused_as_qmp_refuses_them(env):
    assert error(env, '{"machine-config": {"vcpu_count": 1e999}}') == (
        "Failed to parse config file: number 1e999 is out of range.")


def test_deep_nesting_and_huge_numbers(env):
    assert "nested too deeply" in error(env, "[" * 100000 + "]" * 100000)
    assert error(env, '{"machine-config": {"vcpu_count": %s}}' % ("9" * 5000)) == (
        "Failed to parse config file 'vm.json': a number in it has too many digits.")


# -- type errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, value, message", [
    ("boot-source", [], "Json field 'boot-source' must be an object, not an array."),
    ("boot-source", {"kernel_image_path": 5},
     "Json field 'boot-source.kernel_image_path' must be a string, not an integer."),
    ("boot-source", {"boot_args": ["a"]}, "Json field 'boot-source.boot_args' must be a string, not an array."),
    ("machine-config", {"vcpu_count": 1.0},
     "Json field 'machine-config.vcpu_count' must be a non-negative integer, not a number."),
    ("machine-config", {"vcpu_count": True},
     "Json field 'machine-config.vcpu_count' must be a non-negative integer, not a boolean."),
    ("machine-config", {"vcpu_count": "${VCPU}"},
     "Unable to parse '${VCPU}' for 'vcpu_count'; expected a non-negative integer."),
    ("machine-config", {"vcpu_count": 0}, "CPU number must >= 1 and <= 254."),
    ("machine-config", {"vcpu_count": -1},
     "Json field 'machine-config.vcpu_count' must be a non-negative integer, not -1."),
    ("machine-config", {"max_vcpus": 255}, "Max CPU number must >= 1 and <= 254."),
    ("machine-config", {"vcpu_count": 4, "max_vcpus": 2},
     "The max CPU number (2) must not be less than the CPU number (4)."),
    ("machine-config", {"max_vcpus": 2, "vcpu_count": 4},
     "The max CPU number (2) must not be less than the CPU number (4)."),
    ("machine-config", {"mem_size": 1.5},
     "Json field 'machine-config.mem_size' must be an integer or a string such as \"256M\", not a number."),
    ("machine-config", {"mem_size": False},
     "Json field 'machine-config.mem_size' must be an integer or a string such as \"256M\", not a boolean."),
    ("machine-config", {"mem_size": 268435457}, "Input value 268435457 is unaligned with 1048576 for memory."),
    ("machine-config", {"mem_size": "64M"}, "Size of memory should be less than 512G and more than 128M."),
    ("machine-config", {"mem_size": 1 << 50}, "Size of memory should be less than 512G and more than 128M."),
    ("machine-config", {"mem_share": 1}, "Json field 'machine-config.mem_share' must be a boolean, not an integer."),
    ("machine-config", {"dump_guest_core": "maybe"},
     "Unable to parse 'maybe' for 'dump_guest_core'; expected on, off, true, false, yes or no."),
    ("machine-config", {"type": "pc"}, "Unrecognized machine type 'pc'; the only machine type is 'microvm'."),
    ("machine-config", {"type": 1}, "Json field 'machine-config.type' must be a string, not an integer."),
    ("machine-config", {"name": "n" * 256}, "Input name string's length must be no more than 255."),
    ("drive", {}, "Json field 'drive' must be an array, not an object."),
    ("drive", [[]], "Json field 'drive[0]' must be an object, not an array."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "direct": True}],
     "Json field 'drive[0].read_only' is required."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": False}],
     "Json field 'drive[0].direct' is required."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": None, "direct": True}],
     "Json field 'drive[0].read_only' is required."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": "off", "direct": True}],
     "Json field 'drive[0].read_only' must be a boolean, not a string."),
    ("drive", [{"path_on_host": "rootfs", "read_only": False, "direct": True}],
     "Json field 'drive[0].drive_id' is required."),
    ("drive", [{"drive_id": "", "path_on_host": "rootfs", "read_only": False, "direct": True}],
     "The drive device id must not be empty."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": False, "direct": True,
                "serial_num": "x" * 21}],
     "Input drive serial number string's length must be no more than 20."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": False, "direct": True,
     "iops": 1000001}], "iops of block device must >= 0 and <= 1000000."),
    ("drive", [{"drive_id": "r", "path_on_host": "rootfs", "read_only": False, "direct": True,
     "iops": "5"}], "Json field 'drive[0].iops' must be a non-negative integer, not a string."),
    ("net", [{"iface_id": "n"}], "Json field 'net[0].host_dev_name' is required."),
    ("net", [{"iface_id": "n", "host_dev_name": "t", "vhost_type": "vhost-user"}],
     "Unknown vhost type 'vhost-user' in 'net[0]'; the only type is 'vhost-kernel'."),
    ("net", [{"iface_id": "n", "host_dev_name": "t", "vhost_fd": 3}],
     "Json field 'net[0].vhost_fd' needs \"vhost_type\": \"vhost-kernel\"."),
    ("net", [{"iface_id": "n", "host_dev_name": "t", "tap_fd": 1 << 31}],
     "Json field 'net[0].tap_fd' must be at most 2147483647, not 2147483648."),
    ("net", [{"iface_id": "n", "host_dev_name": "t", "mac": "xx"}], "Mac address 'xx' is illegal."),
    ("console", [{"console_id": "c"}], "Json field 'console[0].socket_path' is required."),
    ("vsock", [], "Json field 'vsock' must be an object, not an array."),
    ("vsock", {"vsock_id": "v", "guest_cid": 2}, "Vsock guest-cid must >= 3 and < 4294967295."),
    ("vsock", {"vsock_id": "v"}, "Json field 'vsock.guest_cid' is required."),
    ("serial", {}, "Json field 'serial.stdio' is required."),
    ("serial", {"stdio": "yes"}, "Json field 'serial.stdio' must be a boolean, not a string."),
    ("iothread", [{"id": 1}], "Json field 'iothread[0].id' must be a string, not an integer."),
    ("iothread", [{"id": "a"}, {"id": "a"}], "The iothread id 'a' is used more than once."),
    ("balloon", {}, "Json field 'balloon.deflate_on_oom' is required."),
    ("balloon", True, "Json field 'balloon' must be an object, not a boolean."),
    ("rng", {"random_file": "/dev/urandom", "bytes_per_sec": 10},
     "The bytes per second of rng device must >= 64 and <= 1000000000."),
    ("rng", {"bytes_per_sec": 100}, "Json field 'rng.random_file' is required."),
])
def test_type_and_value_errors(env, section, value, message):
    doc = default_json(env)
    doc[section] = value
    assert error(env, doc) == message


def test_json_drive_file_must_exist(env):
    doc = default_json(env)
    doc["drive"][0]["path_on_host"] = "/nonexistent/rootfs"
    assert error(env, doc) == (
        "The file of drive 'rootfs' '/nonexistent/rootfs' is not accessible: No such file or directory.")


def test_json_kernel_must_exist(env):
    doc = default_json(env)
    doc["boot-source"]["kernel_image_path"] = "nokernel"
    assert error(env, doc) == "The kernel image 'nokernel' is not accessible: No such file or directory."


def test_json_without_kernel(env):
    doc = default_json(env)
    del doc["boot-source"]
    assert error(env, doc).startswith("No kernel image is given")


def test_json_duplicate_ids(env):
    doc = default_json(env)
    doc["drive"].append(dict(doc["drive"][0]))
    assert error(env, doc) == "The id 'rootfs' is given to more than one drive or net."
    doc = default_json(env)
    doc["net"] = [{"iface_id": "rootfs", "host_dev_name": "tap0"}]
    assert error(env, doc) == "The id 'rootfs' is given to more than one drive or net."


# -- command line over JSON --------------------------------------------------------------------

def test_scalars_override(env):
    doc = default_json(env)
    doc["machine-config"] = {"vcpu_count": 2, "max_vcpus": 8, "mem_size": "1G", "mem_share": True,
                             "dump_guest_core": False, "name": "json-name"}
    doc["boot-source"]["initrd_fs_path"] = env.initrd
    del doc["serial"]
    env.write_json(doc)
    (env.root / "other.bin").write_bytes(b"k")
    cfg = parse_command_line(["-config", "vm.json", "-smp", "4", "-m", "512M", "-kernel", "other.bin",
                              "-append", "console=hvc0", "-initrd", "initrd.img", "-name", "cli-name",
                              "-machine", "microvm,dump-guest-core=on", "-daemonize"]).config
    assert cfg.name == "cli-name"
    assert cfg.boot == BootSource("other.bin", "console=hvc0", "initrd.img")
    # -smp replaces both counts; -machine only touches the keys it names
    assert cfg.machine == MachineConfig(vcpus=4, max_vcpus=4, mem_size=512 * MiB, mem_share=True,
                                        dump_guest_core=True)


def test_serial_from_json_conflicts_with_daemonize(env):
    assert error(env, default_json(env), "-daemonize") == "Serial with stdio and daemonize can't be set together"


def test_cli_serial_overrides_json(env):
    doc = default_json(env)
    doc["serial"] = {"stdio": False}
    assert run(env, doc, "-serial", "stdio").serial == SerialConfig(stdio=True)


def test_cli_balloon_and_rng_override(env):
    doc = default_json(env)
    doc["rng"] = {"random_file": "/dev/random", "bytes_per_sec": 100}
    cfg = run(env, doc, "-balloon", "deflate-on-oom=off", "-rng", "random_file=/dev/urandom")
    assert (cfg.balloon, cfg.rng) == (BalloonConfig(False), RngConfig("/dev/urandom"))


def test_drives_and_nets_add_to_json(env):
    doc = default_json(env)
    doc["net"] = [{"iface_id": "net0", "host_dev_name": "tap0"}]
    doc["iothread"] = [{"id": "io1"}]
    doc["console"] = [{"console_id": "c0", "socket_path": "c0.sock"}]
    cfg = run(env, doc, "-drive", "file=disk1,id=d1,iothread=io2", "-netdev", "id=net1,netdev=tap1",
              "-iothread", "id=io2", "-chardev", "id=c1,path=c1.sock")
    assert [d.id for d in cfg.drives] == ["rootfs", "d1"]
    assert [n.id for n in cfg.netdevs] == ["net0", "net1"]
    assert [t.id for t in cfg.iothreads] == ["io1", "io2"]
    assert [c.id for c in cfg.consoles] == ["c0", "c1"]


def test_cli_drive_id_clashes_with_json(env):
    assert error(env, default_json(env), "-drive", "file=disk1,id=rootfs") == (
        "The id 'rootfs' is given to more than one drive or net.")


def test_cli_vsock_with_json_vsock(env):
    doc = default_json(env)
    doc["vsock"] = {"vsock_id": "v", "guest_cid": 3}
    assert error(env, doc, "-device", "vsock,id=w,guest-cid=4") == (
        "Device vsock can only be set one for one StratoVirt VM.")


def test_json_max_vcpus_kept_when_smp_absent(env):
    doc = default_json(env)
    doc["machine-config"] = {"vcpu_count": 2, "max_vcpus": 4}
    m = run(env, doc, "-m", "1G").machine
    assert (m.vcpus, m.max_vcpus, m.mem_size) == (2, 4, GiB)


def test_config_file_given_twice(env):
    env.write_json(default_json(env))
    with pytest.raises(ConfigError, match="The argument 'config' was provided more than once."):
        parse_command_line(["-config", "vm.json", "-config", "vm.json"])
