"""Every command-line option, every error sentence, and the examples from the seed and the reference."""

from __future__ import annotations

import os
import socket

import pytest

from config.early import console, consoles, consoles_of, disks, drive, drives_of, net, nics, nics_of
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


def error(env, command) -> str:
    with pytest.raises(ConfigError) as err:
        env.config(command)
    return str(err.value)


# -- the examples ------------------------------------------------------------------------------

def test_reference_quickstart_example(env):
    """stratovirt -kernel ./vmlinux.bin -append console=ttyS0 pci=off ... -serial stdio (reference §1.5)."""
    sock = env.path("x.sock")
    inv = parse_command_line(
        ["-kernel", "./vmlinux.bin", "-append", "console=ttyS0", "pci=off", "reboot=k", "panic=1", "root=/dev/vda",
         "-drive", "file=./rootfs,id=rootfs,readonly=off", "-api-channel", f"unix:{sock}", "-serial", "stdio"])
    assert inv.action == "run" and inv.text == ""
    assert inv.config == VmConfig(
        boot=BootSource("./vmlinux.bin", "console=ttyS0 pci=off reboot=k panic=1 root=/dev/vda"),
        **disks(drive("rootfs", "./rootfs", read_only=False, direct=True)),
        serial=SerialConfig(stdio=True), qmp_socket=sock)


def test_reference_example_verbatim(env):
    if os.path.lexists("/tmp/x.sock"):
        pytest.skip("/tmp/x.sock exists on this host")
    inv = env.parse("-kernel ./vmlinux.bin -append console=ttyS0 pci=off reboot=k panic=1 root=/dev/vda "
                    "-drive file=./rootfs,id=rootfs,readonly=off -api-channel unix:/tmp/x.sock -serial stdio")
    assert inv.config.qmp_socket == "/tmp/x.sock"
    assert inv.config.boot.cmdline == "console=ttyS0 pci=off reboot=k panic=1 root=/dev/vda"


def test_hydropper_style_argv(env):
    """The argv hydropper's MicroVM builds (reference §6.2), with every optional part switched on."""
    root = "."  # hydropper uses /var/tmp; tmp_path is too long for a UNIX socket path once the uuid is added
    uuid = "3f6a2c1e-0000-4000-8000-123456789abc"
    argv = [
        "-name", "microvm", "-D", "/var/log/stratovirt", "-api-channel", f"unix:{root}/microvm_{uuid}.sock",
        "-pidfile", f"{root}/microvm_pid.file", "-machine", "microvm,dump-guest-core=off,mem-share=on",
        "-chardev", f"id=console_0,path={root}/microvm_{uuid}-console.sock",
        "-netdev", "id=tap0,netdev=tap0,vhost=on,mac=52:54:00:12:34:56",
        "-netdev", "id=tap1,netdev=tap1",
        "-device", "vsock,id=vsock-1234,guest-cid=1234", "-balloon", "deflate-on-oom=true",
        "-rng", "random_file=/dev/random,bytes_per_sec=1000000",
        "-kernel", env.kernel,
        "-append", "rw console=hvc0 lastbus=0 reboot=k panic=1 tsc=reliable ipv6.disable=1 root=/dev/vda",
        "-initrd", env.initrd, "-smp", "4", "-m", "2524971008",
        "-drive", f"id=rootfs,file={env.rootfs},readonly=off", "-disable-seccomp", "-daemonize", "-S",
    ]
    cfg = parse_command_line(argv).config
    assert cfg == VmConfig(
        name="microvm",
        boot=BootSource(env.kernel, "rw console=hvc0 lastbus=0 reboot=k panic=1 tsc=reliable ipv6.disable=1 "
                                    "root=/dev/vda", env.initrd),
        machine=MachineConfig(vcpus=4, max_vcpus=4, mem_size=2408 * MiB, mem_share=True, dump_guest_core=False),
        **disks(drive("rootfs", env.rootfs)),
        **nics(net("tap0", "tap0", mac="52:54:00:12:34:56", vhost=True), net("tap1", "tap1")),
        **console("console_0", f"{root}/microvm_{uuid}-console.sock"),
        vsock=VsockConfig("vsock-1234", 1234), balloon=BalloonConfig(deflate_on_oom=True),
        rng=RngConfig("/dev/random", 1_000_000), qmp_socket=f"{root}/microvm_{uuid}.sock",
        freeze=True, daemonize=True, pidfile=f"{root}/microvm_pid.file", log_file="/var/log/stratovirt",
        disable_seccomp=True,
    )


def test_hydropper_initrd_vm_without_drive(env):
    cfg = env.config(f"-initrd {env.initrd} -append 'console=hvc0 root=/dev/ram' -smp 4 -m 2524971008")
    assert cfg.drives == [] and cfg.boot.initrd == env.initrd


def test_minimal_vm_has_stratovirt_defaults(env):
    cfg = env.config()
    assert cfg == VmConfig(boot=BootSource(env.kernel))
    assert cfg.name == "StratoVirt"
    assert cfg.machine == MachineConfig(vcpus=1, max_vcpus=1, mem_size=256 * MiB, mem_path=None, mem_share=False,
                                        dump_guest_core=True, type="microvm")
    assert cfg.qmp_socket is None  # our choice: the management socket is optional
    assert (cfg.serial, cfg.balloon, cfg.rng, cfg.vsock, cfg.pidfile, cfg.log_file) == (None,) * 6
    assert (cfg.freeze, cfg.daemonize, cfg.disable_seccomp, cfg.extract_payload) == (False, False, False, True)


def test_mem_prealloc_flag(env):
    assert env.config().machine.mem_prealloc is False
    assert env.config("-mem-prealloc").machine.mem_prealloc is True


# -- boot source -------------------------------------------------------------------------------

def test_missing_kernel(env):
    with pytest.raises(ConfigError) as err:
        env.parse("-smp 1")
    assert str(err.value) == ("No kernel image is given: use -kernel, or 'kernel_image_path' in the "
                              "'boot-source' of the -config file.")
    with pytest.raises(ConfigError, match="No kernel image is given"):
        env.parse([])


def test_kernel_does_not_exist(env):
    with pytest.raises(ConfigError) as err:
        env.parse("-kernel ./nope.bin")
    assert str(err.value) == "The kernel image './nope.bin' is not accessible: No such file or directory."


def test_kernel_is_a_directory(env):
    os.mkdir("kdir")
    with pytest.raises(ConfigError) as err:
        env.parse("-kernel kdir")
    assert str(err.value) == "The kernel image 'kdir' is not a regular file."


def test_kernel_symlink_to_file_is_fine(env):
    os.symlink(env.kernel, "link.bin")
    assert env.parse("-kernel link.bin").config.boot.kernel == "link.bin"


def test_kernel_path_limits(env):
    with pytest.raises(ConfigError, match=r"^Input kernel image path string's length must be no more than 4096\.$"):
        env.parse(["-kernel", "k" * 4097])
    with pytest.raises(ConfigError, match="must not be empty"):
        env.parse(["-kernel", ""])


def test_append_joins_words(env):
    assert env.config("-append a b=1 c").boot.cmdline == "a b=1 c"
    assert env.config("-append 'a b=1  c'").boot.cmdline == "a b=1  c"
    assert env.config("-append a -append b c").boot.cmdline == "a b c"  # repeatable in StratoVirt's table
    assert env.config("-append ''").boot.cmdline == ""
    assert env.config("-smp 1").boot.cmdline == ""


def test_append_parameter_length(env):
    env.config(["-append", "root=" + "x" * 255, "y" * 255])
    with pytest.raises(ConfigError) as err:
        env.config(["-append", "console=ttyS0", "root=" + "x" * 256])
    assert str(err.value) == "Input kernel params string's length must be no more than 255."
    with pytest.raises(ConfigError, match="kernel params"):
        env.config(["-append", "z" * 256])


def test_append_total_length(env):
    words = ["p=" + "x" * 200] * 330
    with pytest.raises(ConfigError, match="kernel command line is longer than 65535 bytes"):
        env.config(["-append", *words])


def test_initrd(env):
    assert env.config("-initrd initrd.img").boot.initrd == "initrd.img"
    assert error(env, "-initrd missing.img") == "The initrd 'missing.img' is not accessible: No such file or directory."
    os.mkdir("idir")
    assert error(env, "-initrd idir") == "The initrd 'idir' is not a regular file."


# -- machine -----------------------------------------------------------------------------------

def test_name(env):
    assert env.config("-name vm1").name == "vm1"
    env.config(["-name", "n" * 255])
    assert error(env, ["-name", "n" * 256]) == "Input name string's length must be no more than 255."


@pytest.mark.parametrize("value", ["microvm", "type=microvm", "MicroVm", "type=MICROVM"])
def test_machine_type(env, value):
    assert env.config(["-machine", value]).machine.type == "microvm"


@pytest.mark.parametrize("value", ["pc", "type=q35", "type=microvm-x"])
def test_machine_bad_type(env, value):
    bad = value.split("=")[-1]
    assert error(env, ["-machine", value]) == f"Unrecognized machine type '{bad}'; the only machine type is 'microvm'."


def test_machine_properties(env):
    m = env.config("-machine microvm,dump-guest-core=off,mem-share=on").machine
    assert (m.dump_guest_core, m.mem_share) == (False, True)
    m = env.config("-machine dump-guest-core=yes,mem-share=no").machine
    assert (m.dump_guest_core, m.mem_share) == (True, False)
    assert env.config("-machine microvm,kernel-extract=off").extract_payload is False
    assert env.config("-machine kernel-extract=on").extract_payload is True


def test_machine_errors(env):
    assert error(env, "-machine microvm,dump_guest_core=off") == "Invalid parameter 'dump_guest_core'"
    assert error(env, "-machine mem-share=maybe") == (
        "Unable to parse 'maybe' for 'mem-share'; expected on, off, true, false, yes or no.")


@pytest.mark.parametrize("value, vcpus, maxv", [
    ("1", 1, 1), ("4", 4, 4), ("cpus=4", 4, 4), ("254", 254, 254), ("2,maxcpus=4", 2, 4),
    ("cpus=1,maxcpus=254", 1, 254), ("maxcpus=3", 3, 3), ("4,sockets=2,cores=2", 4, 4),
    ("2,maxcpus=4,sockets=2,cores=2,threads=1", 2, 4), ("sockets=2,cores=2,threads=2", 8, 8),
    ("4,cores=2", 4, 4), ("2,maxcpus=8,threads=2", 2, 8), ("128,sockets=1,cores=128", 128, 128),
])
def test_smp(env, value, vcpus, maxv):
    m = env.config(["-smp", value]).machine
    assert (m.vcpus, m.max_vcpus) == (vcpus, maxv)


@pytest.mark.parametrize("value, message", [
    ("0", "CPU number must >= 1 and <= 254."),
    ("255", "CPU number must >= 1 and <= 254."),
    ("cpus=1000000000000000000000", "CPU number must >= 1 and <= 254."),
    ("4,maxcpus=2", "The max CPU number (2) must not be less than the CPU number (4)."),
    ("4,maxcpus=255", "Max CPU number must >= 1 and <= 254."),
    ("4,sockets=3", "The topology sockets=3,cores=1,threads=1 gives 3 CPUs, but the max CPU number is 4."),
    ("5,cores=2", "The topology sockets=2,cores=2,threads=1 gives 4 CPUs, but the max CPU number is 5."),
    ("4,sockets=0", "The number of sockets must >= 1 and <= 254."),
    ("two", "Unable to parse 'two' for 'cpus'; expected a non-negative integer."),
    ("cpus=-1", "Unable to parse '-1' for 'cpus'; expected a non-negative integer."),
    ("2,cpus=2", "Give the CPU number once: either '-smp <n>' or '-smp cpus=<n>'."),
    ("4,nodes=2", "Invalid parameter 'nodes'"),
])
def test_smp_errors(env, value, message):
    assert error(env, ["-smp", value]) == message


@pytest.mark.parametrize("value, size", [
    ("256M", 256 * MiB), ("256m", 256 * MiB), ("1G", GiB), ("1g", GiB), ("size=2G", 2 * GiB),
    ("268435456", 256 * MiB), ("128M", 128 * MiB), ("512G", 512 * GiB),
])
def test_memory(env, value, size):
    assert env.config(["-m", value]).machine.mem_size == size


@pytest.mark.parametrize("value, message", [
    ("127M", "Size of memory should be less than 512G and more than 128M."),
    ("513G", "Size of memory should be less than 512G and more than 128M."),
    ("256", "Input value 256 is unaligned with 1048576 for memory."),
    ("268435457", "Input value 268435457 is unaligned with 1048576 for memory."),
    ("256K", "Unable to parse memory size '256K'; use bytes or a number with an M or G suffix."),
    ("mem=256M", "Invalid parameter 'mem'"),
    ("256M,size=256M", "Give the memory size once: either '-m <size>' or '-m size=<size>'."),
])
def test_memory_errors(env, value, message):
    assert error(env, ["-m", value]) == message


def test_mem_path(env):
    assert env.config("-mem-path /dev/hugepages").machine.mem_path == "/dev/hugepages"
    assert "must not be empty" in error(env, ["-mem-path", ""])


# -- management socket -------------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["-api-channel", "-qmp"])
@pytest.mark.parametrize("suffix", ["", ",server,nowait", ",nowait,server", ",server"])
def test_socket(env, opt, suffix):
    path = env.path("vm.sock")
    assert env.config([opt, f"unix:{path}{suffix}"]).qmp_socket == path


def test_relative_socket_path(env):
    assert env.config("-qmp unix:vm.sock,server,nowait").qmp_socket == "vm.sock"


@pytest.mark.parametrize("opt", ["-api-channel", "-qmp"])
def test_socket_errors(env, opt):
    assert error(env, [opt, "tcp:127.0.0.1:4444,server,nowait"]) == "tcp type is not support yet!"
    assert error(env, [opt, "/tmp/vm.sock"]) == f"Failed to parse the {opt} socket '/tmp/vm.sock': use unix:PATH."
    assert error(env, [opt, "unix:vm.sock,wait"]) == "Invalid parameter 'wait'"
    assert error(env, [opt, "unix:"]) == "The QMP socket path must not be empty."
    long = "s" * 108
    assert error(env, [opt, f"unix:{long}"]) == (
        f"The QMP socket path '{long}' is longer than 107 bytes, too long for a UNIX socket.")


def test_socket_given_twice(env):
    assert error(env, "-api-channel unix:a.sock -qmp unix:b.sock") == (
        "-api-channel and -qmp both set the management socket; give only one of them.")


@pytest.mark.parametrize("kind", ["socket", "file", "symlink"])
def test_socket_path_exists(env, kind):
    path = env.path("busy.sock")
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
    elif kind == "file":
        open(path, "w").close()
    else:
        os.symlink(env.path("dangling"), path)
    assert error(env, ["-api-channel", f"unix:{path}"]) == (
        f"The QMP socket path '{path}' already exists; StratoVirt does not remove it, so remove it first.")


# -- drives ------------------------------------------------------------------------------------

def test_drive_all_keys(env):
    cfg = env.config("-iothread id=io1 -drive file=rootfs,id=rootfs,readonly=on,direct=off,serial=12345678901234567890,"
                     "iothread=io1,iops=1000000")
    assert drives_of(cfg) == disks(drive("rootfs", "rootfs", read_only=True, direct=False,
                                         serial="12345678901234567890", iothread="io1", iops=1_000_000))


def test_drive_defaults_and_order(env):
    cfg = env.config("-drive id=a,file=disk1 -drive file=disk2,id=b file=disk3,id=c")
    assert drives_of(cfg) == disks(drive("a", "disk1"), drive("b", "disk2"), drive("c", "disk3"))
    assert all(d.direct and not d.read_only for d in cfg.drives)


def test_block_device_is_accepted(env):
    blocks = [f"/dev/{n}" for n in os.listdir("/dev") if n.startswith(("loop", "sd", "vd", "nvme"))]
    blocks = [b for b in blocks if os.path.exists(b) and os.stat(b).st_mode & 0o170000 == 0o060000]
    if not blocks:
        pytest.skip("no block device on this host")
    assert env.config(["-drive", f"file={blocks[0]},id=d"]).drives[0].path == blocks[0]


@pytest.mark.parametrize("value, message", [
    ("id=rootfs", "'file' is missing for 'drive' device."),
    ("file=rootfs", "'id' is missing for 'drive' device."),
    ("file=rootfs,id=r,readonly=2", "Unable to parse '2' for 'readonly'; expected on, off, true, false, yes or no."),
    ("file=rootfs,id=r,direct=x", "Unable to parse 'x' for 'direct'; expected on, off, true, false, yes or no."),
    ("file=rootfs,id=r,serial=123456789012345678901",
     "Input drive serial number string's length must be no more than 20."),
    ("file=rootfs,id=r,iops=1000001", "iops of block device must >= 0 and <= 1000000."),
    ("file=rootfs,id=r,iops=-1", "Unable to parse '-1' for 'iops'; expected a non-negative integer."),
    ("file=rootfs,id=r,format=raw", "Invalid parameter 'format'"),
    ("rootfs,id=r", "Invalid parameter 'rootfs'"),
    ("file=rootfs,id=r,iothread=io9", "The iothread 'io9' of drive 'r' is not defined; add it with -iothread id=io9."),
    ("file=missing,id=r", "The file of drive 'r' 'missing' is not accessible: No such file or directory."),
    ("file=rootfs,id=" + "i" * 256, "Input drive device id string's length must be no more than 255."),
    ("file=rootfs,id=r,id=s", "Input field 'id' in drive is offered more than once."),
])
def test_drive_errors(env, value, message):
    assert error(env, ["-drive", value]) == message


def test_drive_file_is_a_directory(env):
    os.mkdir("ddir")
    assert error(env, "-drive file=ddir,id=d") == (
        "The file of drive 'd' ('ddir') is not a regular file or block device.")


def test_drive_duplicate_id(env):
    assert error(env, "-drive file=disk1,id=d -drive file=disk2,id=d") == (
        "The id 'd' is given to more than one drive or net.")


def test_drive_and_net_ids_share_a_namespace(env):
    assert error(env, "-drive file=disk1,id=x -netdev id=x,netdev=tap0") == (
        "The id 'x' is given to more than one drive or net.")


def test_drive_count(env):
    six = [a for i in range(1, 7) for a in ("-drive", f"file=disk{i},id=d{i}")]
    assert len(env.config(six).drives) == 6
    assert error(env, six + ["-drive", "file=disk7,id=d7"]) == (
        "A maximum of 6 block devices are supported, but 7 are given.")


# -- nets --------------------------------------------------------------------------------------

def test_netdev_all_keys(env):
    cfg = env.config("-iothread id=io1 -netdev tap,id=net0,netdev=tap0,mac=12:34:56:78:9A:BC,fds=7,vhost=on,"
                     "vhostfds=8,iothread=io1")
    assert nics_of(cfg) == nics(net("net0", "tap0", mac="12:34:56:78:9A:BC", vhost=True, tap_fds=[7],
                                    vhost_fds=[8], iothread="io1"))


def test_netdev_minimal(env):
    assert nics_of(env.config("-netdev id=net0,netdev=tap0")) == nics(net("net0", "tap0"))
    assert env.config("-netdev id=n,netdev=t,vhost=off").netdevs[0].vhost is False


@pytest.mark.parametrize("value, message", [
    ("netdev=tap0", "'id' is missing for 'netdev' device."),
    ("id=n", "'netdev' is missing for 'netdev' device."),
    ("user,id=n,netdev=t", "Invalid parameter 'user'"),
    ("id=n,netdev=t,ifname=t", "Invalid parameter 'ifname'"),
    ("id=n,netdev=t,mac=12:34:56", "Mac address '12:34:56' is illegal."),
    ("id=n,netdev=t,fds=a", "Unable to parse 'a' for 'fds'; expected a non-negative integer."),
    ("id=n,netdev=t,fds=3:4", "Unable to parse '3:4' for 'fds'; expected a non-negative integer."),
    ("id=n,netdev=t,vhostfds=4", "-netdev vhostfds= needs vhost=on."),
    ("id=n,netdev=t,vhost=2", "Unable to parse '2' for 'vhost'; expected on, off, true, false, yes or no."),
    ("id=n,netdev=t,iothread=io", "The iothread 'io' of net 'n' is not defined; add it with -iothread id=io."),
    ("id=n,netdev=" + "t" * 256, "Input host tap name string's length must be no more than 255."),
])
def test_netdev_errors(env, value, message):
    assert error(env, ["-netdev", value]) == message


def test_net_count_and_duplicates(env):
    assert error(env, "-netdev id=a,netdev=t0 -netdev id=b,netdev=t1 -netdev id=c,netdev=t2") == (
        "A maximum of 2 net devices are supported, but 3 are given.")
    assert error(env, "-netdev id=a,netdev=t0 -netdev id=a,netdev=t1") == (
        "The id 'a' is given to more than one drive or net.")


# -- chardev, device, serial -------------------------------------------------------------------

def test_chardev(env):
    cfg = env.config("-chardev id=console_0,path=c.sock -chardev socket,id=c1,path=d.sock")
    assert consoles_of(cfg) == consoles(("console_0", "c.sock"), ("c1", "d.sock"))


@pytest.mark.parametrize("value, message", [
    ("path=c.sock", "'id' is missing for 'chardev' device."),
    ("id=c", "'path' is missing for 'chardev' device."),
    ("pty,id=c,path=c.sock", "Invalid parameter 'pty'"),
    ("id=c,path=c.sock,server", "Invalid parameter 'server'"),
    ("id=c,path=" + "p" * 108,
     f"The console socket path '{'p' * 108}' is longer than 107 bytes, too long for a UNIX socket."),
])
def test_chardev_errors(env, value, message):
    assert error(env, ["-chardev", value]) == message


def test_chardev_duplicates_and_existing_socket(env):
    assert error(env, "-chardev id=c,path=a.sock -chardev id=c,path=b.sock") == (
        "The chardev id 'c' is used more than once.")
    assert error(env, "-chardev id=c,path=a.sock -chardev id=d,path=a.sock") == (
        "The console socket path 'a.sock' is used more than once.")
    open("old.sock", "w").close()
    assert error(env, "-chardev id=c,path=old.sock") == (
        "The console socket path 'old.sock' already exists; remove it first.")


def test_vsock(env):
    assert env.config("-device vsock,id=vsock-3,guest-cid=3").vsock == VsockConfig("vsock-3", 3)
    assert env.config("-device vsock,id=v,guest-cid=4294967294,vhostfd=9").vsock == VsockConfig("v", 4294967294, 9)


@pytest.mark.parametrize("value, message", [
    ("vsock,id=v,guest-cid=2", "Vsock guest-cid must >= 3 and < 4294967295."),
    ("vsock,id=v,guest-cid=4294967295", "Vsock guest-cid must >= 3 and < 4294967295."),
    ("vsock,guest-cid=3", "'id' is missing for 'vsock' device."),
    ("vsock,id=v", "'guest-cid' is missing for 'vsock' device."),
    ("id=v,guest-cid=3", "-device needs a device type first; the only type is 'vsock'."),
    # (a 2.x driver such as virtio-blk-device picks the 2.x dialect: test_config_dialect2x.py)
    ("virtio-blk,id=v", "Unknown device type 'virtio-blk'; the only -device type is 'vsock'."),
    ("vsock,id=v,guest-cid=3,bus=x", "Invalid parameter 'bus'"),
])
def test_vsock_errors(env, value, message):
    assert error(env, ["-device", value]) == message


def test_only_one_vsock(env):
    assert error(env, "-device vsock,id=a,guest-cid=3 -device vsock,id=b,guest-cid=4") == (
        "Device vsock can only be set one for one StratoVirt VM.")


def test_serial(env):
    assert env.config("-serial stdio").serial == SerialConfig(stdio=True)
    assert error(env, "-serial pty") == "Invalid parameter 'pty' for -serial: only 'stdio' is supported."
    assert error(env, "-serial stdio,mux=on") == "Invalid parameter 'mux'"


# -- process options ---------------------------------------------------------------------------

def test_log_file(env):
    assert env.config("").log_file is None
    assert env.config("-D").log_file == ""
    assert env.config("-D -smp 1").log_file == ""
    assert env.config("-D /var/log/stratovirt").log_file == "/var/log/stratovirt"


def test_daemonize_pidfile_and_flags(env):
    cfg = env.config("-daemonize -pidfile vm.pid -disable-seccomp -freeze")
    assert (cfg.daemonize, cfg.pidfile, cfg.disable_seccomp, cfg.freeze) == (True, "vm.pid", True, True)
    assert env.config("-S").freeze is True


def test_pidfile_needs_daemonize(env):
    assert error(env, "-pidfile vm.pid") == "-pidfile must be used with -daemonize together."


def test_existing_pidfile(env):
    open("vm.pid", "w").close()
    assert error(env, "-daemonize -pidfile vm.pid") == "Pidfile path is existed yet."


def test_serial_stdio_and_daemonize(env):
    assert error(env, "-serial stdio -daemonize") == "Serial with stdio and daemonize can't be set together"


def test_daemonize_without_stdio_serial_is_fine(env):
    assert env.config("-daemonize").daemonize is True


# -- iothread, balloon, rng --------------------------------------------------------------------

def test_iothreads(env):
    cfg = env.config("-iothread id=io1 -iothread id=io2 -drive file=rootfs,id=r,iothread=io2")
    assert cfg.iothreads == [IothreadConfig("io1"), IothreadConfig("io2")]
    eight = [a for i in range(8) for a in ("-iothread", f"id=t{i}")]
    assert len(env.config(eight).iothreads) == 8
    assert error(env, eight + ["-iothread", "id=t8"]) == "Iothread number must >= 0 and <= 8."
    assert error(env, "-iothread id=a -iothread id=a") == "The iothread id 'a' is used more than once."
    assert error(env, "-iothread name=a") == "Invalid parameter 'name'"
    assert error(env, "-iothread io1") == "Invalid parameter 'io1'"


def test_balloon(env):
    assert env.config("-balloon").balloon == BalloonConfig(deflate_on_oom=False)
    assert env.config("-balloon deflate-on-oom=true").balloon == BalloonConfig(deflate_on_oom=True)
    assert env.config("-balloon deflate-on-oom=off").balloon == BalloonConfig(deflate_on_oom=False)
    assert error(env, "-balloon virtio") == "Invalid parameter 'virtio'"
    assert error(env, "-balloon deflate_on_oom=true") == "Invalid parameter 'deflate_on_oom'"


def test_rng(env):
    assert env.config("-rng random_file=/dev/urandom").rng == RngConfig("/dev/urandom")
    assert env.config("-rng random_file=/dev/random,bytes_per_sec=64").rng == RngConfig("/dev/random", 64)
    assert env.config("-rng random_file=/dev/random,bytes_per_sec=1000000000").rng.max_bytes == 1_000_000_000


@pytest.mark.parametrize("value, message", [
    ("random_file=/dev/urandom,bytes_per_sec=63", "The bytes per second of rng device must >= 64 and <= 1000000000."),
    ("random_file=/dev/urandom,bytes_per_sec=1000000001",
     "The bytes per second of rng device must >= 64 and <= 1000000000."),
    ("bytes_per_sec=64", "'random_file' is missing for 'rng' device."),
    ("random_file=./nope", "The rng random file './nope' is not accessible: No such file or directory."),
    ("filename=/dev/urandom", "Invalid parameter 'filename'"),
])
def test_rng_errors(env, value, message):
    assert error(env, ["-rng", value]) == message


def test_config_is_frozen(env):
    cfg = env.config("")
    with pytest.raises(AttributeError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.machine.vcpus = 2  # type: ignore[misc]


# -- odd paths ---------------------------------------------------------------------------------

def test_undecodable_and_nul_paths(env):
    assert error(env, ["-drive", "file=\udcff,id=d"]) == (
        "The file of drive 'd' '\\udcff' is not accessible: No such file or directory.")
    assert error(env, ["-drive", "file=\ud800,id=d"]).startswith("The file of drive 'd' '\\ud800' is not a valid path")
    with pytest.raises(ConfigError, match=r"^The kernel image path must not contain a NUL character\.$"):
        parse_command_line(["-kernel", "vmlinux.bin\0"])


def test_socket_path_keeps_colons(env):
    assert env.config("-api-channel unix:a:b.sock,server,nowait").qmp_socket == "a:b.sock"


# -- -incoming (a minimal form until the 2.x command line lands) -------------------------------------


def test_incoming_belongs_to_both_dialects(env, tmp_path):
    """A VM of either dialect can be saved and started again from its snapshot: -incoming picks
    no dialect, so an early command line may restore too."""
    from pystratovirt.machine.vmconfig import Dialect, IncomingConfig
    cfg = env.config(["-incoming", f"file:{tmp_path}", "-api-channel", "unix:x.sock"])
    assert (cfg.dialect, cfg.incoming) == (Dialect.V0, IncomingConfig(str(tmp_path)))
    assert error(env, ["-incoming", "tcp:192.168.0.1:4446"]) == (
        "-incoming tcp: (live migration) is not supported; only file:<dir> (a snapshot) is.")
