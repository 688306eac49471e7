"""The StratoVirt 2.x command line: the exact argv of Kata Containers, openEuler's Kata, Kuasar and
hydropper (reference: stratovirt-2x-clients.md §1.3-1.5, §3.2, §4.1, §5.1), the rule that picks the
dialect, every refusal, and every value check."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.config import ConfigError, parse_command_line
from pystratovirt.config.args import tokenize
from pystratovirt.config.dialect import pick_dialect
from pystratovirt.machine.vmconfig import (
    BalloonConfig,
    BlockDeviceConfig,
    BootSource,
    ChardevConfig,
    ConsoleConfig,
    Dialect,
    IncomingConfig,
    IothreadConfig,
    MachineConfig,
    NetDeviceConfig,
    RngConfig,
    SerialConfig,
    VmConfig,
    VsockConfig,
)
from pystratovirt.memory.layout import GiB, MiB
from pystratovirt.virtio.block_backend import DriveConfig
from pystratovirt.virtio.tap import NetdevConfig

SANDBOX = "5f0c3b2d9a8e4c1b8f7a6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"
VM_PATH = f"/run/vc/vm/{SANDBOX}"
UUID = "6e7b0e90-3b2e-4179-bc30-43d2b5b5964f"
KATA_APPEND = (
    "systemd.unit=kata-containers.target systemd.mask=systemd-networkd.service "
    "systemd.mask=systemd-networkd.socket agent.cdh_api_timeout=50 cgroup_no_v1=all "
    "systemd.unified_cgroup_hierarchy=1 root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro "
    "rootfstype=ext4 reboot=k panic=1 net.ifnames=0 ramdom.trust_cpu=on pci=off iommu=off acpi=off quiet "
    "8250.nr_uarts=0 agent.log_vport=1025")
MAC = "02:42:ac:11:00:02"


def parse(argv: list[str]) -> VmConfig:
    inv = parse_command_line(argv)
    assert inv.action == "run"
    return inv.config


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_command_line(argv)
    return str(err.value)


def v2(env, *extra: str) -> list[str]:
    """A minimal 2.x command line (-qmp picks the dialect) plus ``extra``."""
    return ["-kernel", env.kernel, "-qmp", "unix:q.sock,server,nowait", *extra]


# -- Kata Containers upstream (§1.3, §1.5) -------------------------------------------------------------

def kata_argv(env, debug: bool = False, virtio_fs: bool = False, net: str = "fds=4") -> list[str]:
    """createParams' order; devices in device-list order (rng, [console], rootfs, vsock, [fs], net)."""
    argv = ["-name", f"sandbox-{SANDBOX}", "-uuid", UUID, "-smp", "1", "-m", "2048", "-kernel", env.kernel,
            "-append", KATA_APPEND.replace("quiet 8250.nr_uarts=0 agent.log_vport=1025", "debug console=hvc0")
            if debug else KATA_APPEND,
            "-qmp", f"unix:{VM_PATH}/qmp.socket,server,nowait", "-D", "-disable-seccomp",
            "-machine", "type=microvm,dump-guest-core=off,mem-share=on",
            "-object", "rng-random,id=objrng0,filename=/dev/urandom",
            "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0"]
    if debug:
        argv += ["-device", "virtio-serial-device,id=virtio-serial0",
                 "-chardev", f"socket,id=charconsole0,path={VM_PATH}/console.socket,server,nowait",
                 "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0"]
    argv += ["-drive", f"id=rootfs,file={env.rootfs},readonly=on,direct=off",
             "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
             "-device", "vhost-vsock-device,id=vsock-id,guest-cid=3054159683,vhostfd=3"]
    if virtio_fs:
        argv += ["-chardev", f"socket,id=virtio_fs,path={VM_PATH}/virtiofs_kata.socket,server,nowait",
                 "-device", "vhost-user-fs-device,chardev=virtio_fs,tag=kataShared,id=virtio-fs0"]
    argv += ["-netdev", f"tap,id=eth0,{net}", "-device", f"virtio-net-device,netdev=eth0,id=eth0,mac={MAC}"]
    return argv


def kata_config(env, debug: bool = False, netdev: NetdevConfig | None = None) -> VmConfig:
    console = {}
    if debug:
        console = {"chardevs": [ChardevConfig("charconsole0", "socket", f"{VM_PATH}/console.socket")],
                   "consoles": [ConsoleConfig("virtio-console0", "charconsole0", 0)]}
    return VmConfig(
        boot=BootSource(env.kernel, KATA_APPEND.replace("quiet 8250.nr_uarts=0 agent.log_vport=1025",
                                                        "debug console=hvc0") if debug else KATA_APPEND),
        name=f"sandbox-{SANDBOX}",
        machine=MachineConfig(vcpus=1, mem_size=2 * GiB, mem_share=True, dump_guest_core=False),
        drives=[DriveConfig("rootfs", env.rootfs, read_only=True, direct=False)],
        block_devices=[BlockDeviceConfig("virtio-blk0", "rootfs")],
        netdevs=[netdev or NetdevConfig("eth0", fds=("4",))],
        net_devices=[NetDeviceConfig("eth0", "eth0", mac=MAC)],
        **console,
        vsock=VsockConfig("vsock-id", 3054159683, vhost_fd=3),
        rng=RngConfig("/dev/urandom", None, 1000),
        qmp_socket=f"{VM_PATH}/qmp.socket", log_file="", disable_seccomp=True,
        dialect=Dialect.V2, uuid=UUID,
    )


def test_kata_argv(env):
    assert parse(kata_argv(env)) == kata_config(env)


def test_kata_debug_argv_has_the_console(env):
    assert parse(kata_argv(env, debug=True)) == kata_config(env, debug=True)


def test_kata_tap_by_name_and_by_two_queue_fds(env):
    assert parse(kata_argv(env, net="ifname=tap0_kata")) == kata_config(env, netdev=NetdevConfig("eth0", "tap0_kata"))
    # Two queues parse; the machine refuses multi-queue taps with its own sentence when it opens them.
    assert parse(kata_argv(env, net="fds=4:5")).netdevs == [NetdevConfig("eth0", fds=("4", "5"))]


def test_kata_initrd_boot(env):
    argv = kata_argv(env)
    i = argv.index("-drive")
    argv = argv[:i] + argv[i + 4:] + ["-initrd", env.initrd]
    cfg = parse(argv)
    assert cfg.boot.initrd == env.initrd and cfg.drives == [] and cfg.block_devices == []


def test_kata_virtio_fs_is_refused(env):
    assert error(kata_argv(env, virtio_fs=True)) == (
        "-device vhost-user-fs-device is not supported: virtio-fs shared directories are not supported by this "
        "VMM; share files through a disk image (-drive) instead.")


# -- openEuler's Kata 2.x fork (§3.2) ------------------------------------------------------------------

def openeuler_argv(env, vm_path: str, *, debug: bool = False, template: str | None = None) -> list[str]:
    argv = ["-name", "sandbox-abc", "-uuid", UUID, "-machine", "type=microvm,dump-guest-core=off,mem-share=on",
            "-smp", "2", "-m", "1024", "-kernel", env.kernel,
            "-append", "pci=off iommu=off acpi=off console=hvc0 reboot=k panic=1 agent.use_vsock=true "
                       "ramdom.trust_cpu=on rw root=/dev/vda quiet",
            "-qmp", f"unix:{vm_path}/qmp.socket,server,nowait", "-pidfile", f"{vm_path}/pid"]
    if debug:
        argv += ["-D", f"{vm_path}/stratovirt.log"]
    argv += ["-object", "iothread,id=iothread_block",
             "-device", "virtio-serial-device,id=virtio-serial0",
             "-chardev", f"socket,id=charconsole0,path={vm_path}/console.socket,server,nowait",
             "-device", "virtconsole,chardev=charconsole0,id=virtio-console0",
             "-object", "rng-random,id=objrng0,filename=/dev/urandom",
             "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
             "-drive", f"id=rootfs,file={env.rootfs}", "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
             "-device", "vhost-vsock-device,id=vsock-id,guest-cid=3",
             "-netdev", "tap,id=eth0,ifname=tap0_kata", "-device", f"virtio-net-device,netdev=eth0,id=eth0,mac={MAC}"]
    if template is not None:
        argv += ["-incoming", f"file:{template}"]
    return argv + ["-daemonize", "-disable-seccomp"]


def test_openeuler_kata_argv(env):
    vm_path = "/run/vc/vm/abc"
    cfg = parse(openeuler_argv(env, vm_path, debug=True))
    assert cfg == VmConfig(
        boot=BootSource(env.kernel, "pci=off iommu=off acpi=off console=hvc0 reboot=k panic=1 agent.use_vsock=true "
                                    "ramdom.trust_cpu=on rw root=/dev/vda quiet"),
        name="sandbox-abc",
        machine=MachineConfig(vcpus=2, mem_size=1024 * MiB, mem_share=True, dump_guest_core=False),
        drives=[DriveConfig("rootfs", env.rootfs)], block_devices=[BlockDeviceConfig("virtio-blk0", "rootfs")],
        netdevs=[NetdevConfig("eth0", "tap0_kata")], net_devices=[NetDeviceConfig("eth0", "eth0", mac=MAC)],
        chardevs=[ChardevConfig("charconsole0", "socket", f"{vm_path}/console.socket")],
        consoles=[ConsoleConfig("virtio-console0", "charconsole0", 0)],
        vsock=VsockConfig("vsock-id", 3), iothreads=[IothreadConfig("iothread_block")],
        rng=RngConfig("/dev/urandom", None, 1000), qmp_socket=f"{vm_path}/qmp.socket",
        daemonize=True, pidfile=f"{vm_path}/pid", log_file=f"{vm_path}/stratovirt.log", disable_seccomp=True,
        dialect=Dialect.V2, uuid=UUID,
    )


def test_openeuler_kata_template_boot_and_ozone_basenames(env, tmp_path):
    """The VM-template boot adds -incoming file:<dir>; under ozone every path is a basename in the jail."""
    template = tmp_path / "template"
    template.mkdir()
    cfg = parse(openeuler_argv(env, ".", template=str(template)))
    assert cfg.incoming == IncomingConfig(str(template))
    assert (cfg.qmp_socket, cfg.pidfile, cfg.chardevs[0].path) == ("./qmp.socket", "./pid", "./console.socket")


def test_openeuler_kata_other_machine_types_are_refused(env):
    argv = openeuler_argv(env, ".")
    argv[argv.index("type=microvm,dump-guest-core=off,mem-share=on")] = "type=q35,dump-guest-core=off,mem-share=on"
    assert error(argv) == "Unrecognized machine type 'q35'; the only machine type is 'microvm'."
    argv = openeuler_argv(env, ".") + ["-drive", f"file={env.rootfs},if=pflash,unit=0,readonly=true"]
    assert error(argv) == ("-drive if=pflash (firmware flash) is not supported: the micro-VM boots the -kernel "
                           "image directly.")


# -- Kuasar's micro-VM (§5.1) --------------------------------------------------------------------------

def kuasar_argv(env, machine: str = "microvm") -> list[str]:
    return ["-name", "sandbox-1", "-uuid", UUID, "-machine", machine, "-qmp", "unix:kuasar/qmp.sock,server,nowait",
            "-kernel", env.kernel, "-initrd", env.initrd,
            "-append", "console=hvc0 console=hvc1 iommu=off panic=1 pcie_ports=native debug task.debug",
            "-smp", "cpus=1", "-m", "1024M", "-pidfile", "kuasar/pid", "-D", "kuasar/log", "-daemonize",
            "-disable-seccomp", "-mem-prealloc",
            "-netdev", "tap,id=intf-tap0,ifname=tap0",
            "-device", f"virtio-net-device,netdev=intf-tap0,id=virtio-net-intf-tap0,mac={MAC},mq=off",
            "-device", "vhost-vsock-device,id=vsock-1224150961,guest-cid=1224150961,vhostfd=3",
            "-device", "virtio-serial-device",
            "-chardev", "socket,id=charconsole0,path=kuasar/console.sock,server,nowait",
            "-device", "virtconsole,id=virtio-console0,chardev=charconsole0"]


def test_kuasar_microvm_argv(env):
    assert parse(kuasar_argv(env)) == VmConfig(
        boot=BootSource(env.kernel, "console=hvc0 console=hvc1 iommu=off panic=1 pcie_ports=native debug task.debug",
                        env.initrd),
        name="sandbox-1", machine=MachineConfig(vcpus=1, mem_size=1024 * MiB, mem_prealloc=True),
        netdevs=[NetdevConfig("intf-tap0", "tap0")],
        net_devices=[NetDeviceConfig("virtio-net-intf-tap0", "intf-tap0", mac=MAC)],
        chardevs=[ChardevConfig("charconsole0", "socket", "kuasar/console.sock")],
        consoles=[ConsoleConfig("virtio-console0", "charconsole0", 0)],
        vsock=VsockConfig("vsock-1224150961", 1224150961, 3), qmp_socket="kuasar/qmp.sock",
        daemonize=True, pidfile="kuasar/pid", log_file="kuasar/log", disable_seccomp=True,
        dialect=Dialect.V2, uuid=UUID,
    )


def test_kuasar_default_machine_and_global_are_refused(env):
    assert error(kuasar_argv(env, "virt")) == "Unrecognized machine type 'virt'; the only machine type is 'microvm'."
    assert error(kuasar_argv(env) + ["-global", "pcie-root-port.fast-unplug=1"]) == (
        "-global pcie-root-port.fast-unplug=1: global device properties are not supported: they configure PCI "
        "devices (such as pcie-root-port), and the micro-VM has no PCI bus.")


# -- hydropper (§4.1) ----------------------------------------------------------------------------------

def hydropper_argv(env, **opt) -> list[str]:
    root, uuid = ".", "0d5a0c6f-4a3b-4c2d-9e1f-8a7b6c5d4e3f"
    argv = ["-name", "microvm", "-D", "/var/log/stratovirt", "-qmp", f"unix:{root}/microvm_{uuid}.sock,server,nowait",
            "-pidfile", f"{root}/microvm_pid.file", "-machine", "microvm,dump-guest-core=off,mem-share=on",
            "-disable-seccomp", "-daemonize", "-S"]
    if "incoming" in opt:
        argv += ["-incoming", f"file:{opt['incoming']}"]
    argv += ["-device", "virtio-serial-device",
             "-chardev", f"socket,path={root}/microvm_{uuid}-console.sock,id=virtioconsole0,server,nowait",
             "-device", "virtconsole,chardev=virtioconsole0,id=console_0",
             "-netdev", "tap,id=tap0,ifname=tap0,vhost=on",
             "-device", f"virtio-net-device,netdev=tap0,id=tap0,iothread=iothread1,mac={MAC}",
             "-object", "rng-random,id=objrng0,filename=/dev/random",
             "-device", "virtio-rng-device,rng=objrng0,max-bytes=1234,period=1000",
             "-device", "vhost-vsock-device,id=vsock-3,guest-cid=3",
             "-device", f"virtio-balloon-device,deflate-on-oom=true,free-page-reporting={opt.get('fpr', 'false')}",
             "-object", "iothread,id=iothread1",
             "-kernel", env.kernel,
             "-append", "rw console=hvc0 lastbus=0 reboot=k panic=1 tsc=reliable ipv6.disable=1 root=/dev/vda",
             "-smp", "4", "-m", "2048",
             "-drive", f"id=rootfs,file={env.rootfs},readonly=off,direct=on",
             "-device", "virtio-blk-device,drive=rootfs,id=rootfs",
             "-drive", f"id=Ab3dE,file={env.path('disk1')},readonly=on",
             "-device", "virtio-blk-device,drive=Ab3dE,id=Ab3dE"]
    return argv + list(opt.get("extra", ()))


def test_hydropper_argv(env):
    uuid = "0d5a0c6f-4a3b-4c2d-9e1f-8a7b6c5d4e3f"
    assert parse(hydropper_argv(env)) == VmConfig(
        boot=BootSource(env.kernel, "rw console=hvc0 lastbus=0 reboot=k panic=1 tsc=reliable ipv6.disable=1 "
                                    "root=/dev/vda"),
        name="microvm", machine=MachineConfig(vcpus=4, mem_size=2 * GiB, mem_share=True, dump_guest_core=False),
        drives=[DriveConfig("rootfs", env.rootfs, direct=True),
                DriveConfig("Ab3dE", env.path("disk1"), read_only=True)],
        block_devices=[BlockDeviceConfig("rootfs", "rootfs"), BlockDeviceConfig("Ab3dE", "Ab3dE")],
        netdevs=[NetdevConfig("tap0", "tap0", vhost=True)],
        net_devices=[NetDeviceConfig("tap0", "tap0", mac=MAC, iothread="iothread1")],
        chardevs=[ChardevConfig("virtioconsole0", "socket", f"./microvm_{uuid}-console.sock")],
        consoles=[ConsoleConfig("console_0", "virtioconsole0", 0)],
        vsock=VsockConfig("vsock-3", 3), iothreads=[IothreadConfig("iothread1")],
        balloon=BalloonConfig(deflate_on_oom=True), rng=RngConfig("/dev/random", 1234, 1000),
        qmp_socket=f"./microvm_{uuid}.sock", freeze=True, daemonize=True, pidfile="./microvm_pid.file",
        log_file="/var/log/stratovirt", disable_seccomp=True, dialect=Dialect.V2,
    )


def test_hydropper_quickstart_and_extras(env, tmp_path):
    cfg = parse(hydropper_argv(env, incoming=str(tmp_path)))
    assert cfg.incoming == IncomingConfig(str(tmp_path))
    assert parse(hydropper_argv(env, extra=["-mem-path", "/dev/hugepages"])).machine.mem_path == "/dev/hugepages"
    assert error(hydropper_argv(env, fpr="true")) == (
        "free-page-reporting=on (the guest reporting free pages) is not supported by this VMM's balloon.")
    assert error(hydropper_argv(env, extra=["-cpu", "host,+avx"])) == (
        "-cpu is not supported: the guest sees the CPU model and features KVM offers on this host.")


def test_hydropper_initrd_vm(env):
    cfg = parse(["-name", "microvm", "-qmp", "unix:m.sock,server,nowait", "-kernel", env.kernel, "-initrd", env.initrd,
                 "-append", "console=hvc0 reboot=k panic=1 root=/dev/ram", "-smp", "4", "-m", "2048"])
    assert cfg.boot.initrd == env.initrd and cfg.machine.mem_size == 2 * GiB and cfg.dialect is Dialect.V2


# -- the rule that picks the dialect -------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["-qmp", "unix:x.sock"], ["-uuid", UUID], ["-object", "iothread,id=io"],
    ["-global", "a.b=1"], ["-cpu", "host"], ["-device", "virtio-balloon-device"], ["-device", "virtio-blk-pci"],
    ["-device", "vhost-user-fs-device,id=f"], ["-netdev", "tap,id=n,ifname=tap0"],
    ["-drive", "id=d,file=disk1,if=none"], ["-drive", "id=d,file=disk1,throttling.iops-total=10"],
    ["-chardev", "socket,id=c,path=c.sock,server,nowait"], ["-chardev", "pty,id=c,nowait"], ["-serial", "chardev:c"],
    ["-m", "2048", "-smp", "1", "-D", "-qmp", "unix:x.sock"],
])
def test_options_that_pick_2x(argv):
    assert pick_dialect(tokenize(argv)) is Dialect.V2


@pytest.mark.parametrize("argv", [
    [], ["-api-channel", "unix:x.sock"], ["-config", "vm.json"], ["-balloon"], ["-rng", "random_file=/dev/urandom"],
    ["-iothread", "id=io"], ["-device", "vsock,id=v,guest-cid=3"], ["-netdev", "id=n,netdev=tap0"],
    ["-netdev", "tap,id=n,netdev=tap0,ifname=t"], ["-drive", "file=disk1,id=d,iops=5"],
    ["-drive", "file=disk1,id=d,iothread=io"], ["-chardev", "id=c,path=c.sock"],
    ["-chardev", "id=c,path=c.sock,server"],
])
def test_options_that_pick_0x(argv):
    assert pick_dialect(tokenize(argv)) is Dialect.V0


@pytest.mark.parametrize("extra", [
    # Options both dialects have, in forms both accept: the seed's dialect.
    [], ["-m", "268435456"], ["-drive", "file=disk1,id=d"], ["-netdev", "tap,id=n,fds=3"],
    ["-chardev", "socket,id=c,path=c.sock"], ["-device", "virtio-blk"],
    ["-smp", "2", "-m", "1G", "-serial", "stdio", "-D", "-name", "x", "-machine", "microvm", "-S", "-mem-prealloc"],
])
def test_neutral_command_lines_are_0x(env, extra):
    assert pick_dialect(tokenize(["-kernel", env.kernel, *extra])) is Dialect.V0


def test_the_same_size_means_bytes_in_0x_and_mib_in_2x(env):
    assert parse(["-kernel", env.kernel, "-m", "268435456"]).machine.mem_size == 256 * MiB
    assert error(v2(env, "-m", "268435456")) == (
        "Memory size must >= 128MiB and <= 512GiB, default unit: MiB, current memory size: 281474976710656 bytes.")
    assert parse(v2(env, "-m", "256")).machine.mem_size == 256 * MiB
    assert error(["-kernel", env.kernel, "-m", "256"]) == "Input value 256 is unaligned with 1048576 for memory."
    for size in ("256M", "size=1G", "2g"):  # a suffix means the same in both
        old = parse(["-kernel", env.kernel, "-m", size]).machine.mem_size
        assert parse(v2(env, "-m", size)).machine.mem_size == old


@pytest.mark.parametrize("old, new, message", [
    (["-api-channel", "unix:a.sock"], ["-qmp", "unix:b.sock,server,nowait"],
     "-api-channel and -qmp both set the management socket; give only one of them."),
    (["-netdev", "id=n,netdev=tap0"], ["-qmp", "unix:b.sock,server,nowait"],
     "The command line mixes StratoVirt's 0.x option -netdev with netdev= with the 2.x option -qmp; use one "
     "dialect (see docs/compatibility.md)."),
    (["-balloon", "deflate-on-oom=true"], ["-device", "virtio-blk-device,drive=d,id=d"],
     "The command line mixes StratoVirt's 0.x option -balloon with the 2.x option -device virtio-blk-device; use "
     "one dialect (see docs/compatibility.md)."),
    (["-config", "vm.json"], ["-uuid", UUID],
     "The command line mixes StratoVirt's 0.x option -config with the 2.x option -uuid; use one dialect (see "
     "docs/compatibility.md)."),
    (["-device", "vsock,id=v,guest-cid=3"], ["-object", "iothread,id=io"],
     "The command line mixes StratoVirt's 0.x option -device vsock with the 2.x option -object; use one dialect "
     "(see docs/compatibility.md)."),
    (["-drive", "file=disk1,id=d,iothread=io"], ["-drive", "id=e,file=disk2,if=none"],
     "The command line mixes StratoVirt's 0.x option -drive with iothread= with the 2.x option -drive with if=; "
     "use one dialect (see docs/compatibility.md)."),
    (["-chardev", "id=c,path=c.sock"], ["-chardev", "socket,id=d,path=d.sock,server,nowait"],
     "The command line mixes StratoVirt's 0.x option -chardev without a backend type with the 2.x option -chardev "
     "with server; use one dialect (see docs/compatibility.md)."),
])
def test_mixed_dialects_name_the_two_options(env, old, new, message):
    assert error(["-kernel", env.kernel, *old, *new]) == message
    assert error(["-kernel", env.kernel, *new, *old]) == message  # whichever comes first


def test_hydropper_early_argv_with_qmp_is_mixed(env):
    """The 0.x hydropper argv (test_config_cmdline) with -qmp in place of -api-channel must say why it fails."""
    assert "0.x option -device vsock with the 2.x option -qmp" in error(
        ["-kernel", env.kernel, "-qmp", "unix:x.sock", "-device", "vsock,id=v,guest-cid=3"])


# -- refusals: what a 2.x client may send that the micro-VM cannot do -----------------------------------

@pytest.mark.parametrize("extra, message", [
    (["-device", "virtio-blk-pci,id=d,drive=d,bus=pcie.0,addr=0x3"],
     "-device virtio-blk-pci is a PCI device, and the micro-VM has no PCI bus; use -device virtio-blk-device."),
    (["-device", "virtio-net-pci,id=n,netdev=n"],
     "-device virtio-net-pci is a PCI device, and the micro-VM has no PCI bus; use -device virtio-net-device."),
    (["-device", "vhost-vsock-pci,id=v,guest-cid=3"],
     "-device vhost-vsock-pci is a PCI device, and the micro-VM has no PCI bus; use -device vhost-vsock-device."),
    (["-device", "vfio-pci,host=0000:1a:00.3"], "-device vfio-pci needs a PCI bus, which the micro-VM does not have."),
    (["-device", "pcie-root-port,id=pcie.1"],
     "-device pcie-root-port needs a PCI bus, which the micro-VM does not have."),
    (["-device", "vhost-user-fs-device,chardev=c,tag=t,id=f"],
     "-device vhost-user-fs-device is not supported: virtio-fs shared directories are not supported by this VMM; "
     "share files through a disk image (-drive) instead."),
    (["-device", "vhost-user-blk-pci,id=b,chardev=c"],
     "-device vhost-user-blk-pci is not supported: vhost-user block devices are not supported by this VMM, and the "
     "micro-VM has no PCI bus."),
    (["-device", "virtserialport,chardev=c,id=p,nr=1"],
     "-device virtserialport is not supported: only console ports are supported on the virtio-serial device; use "
     "virtconsole."),
    (["-device", "usb-kbd,id=kbd"], "-device usb-kbd is not supported by the micro-VM."),
    (["-device", "virtio-gpu-device"], "Unknown device type 'virtio-gpu-device': the micro-VM's devices are "
     "virtio-blk-device, virtio-net-device, virtio-balloon-device, virtio-rng-device, virtio-serial-device, "
     "virtconsole, vhost-vsock-device."),
    (["-device", "id=x"], "-device needs a driver name first, e.g. -device virtio-blk-device,drive=<id>,id=<id>."),
    (["-device", "virtio-balloon-device,free-page-reporting=on"],
     "free-page-reporting=on (the guest reporting free pages) is not supported by this VMM's balloon."),
    (["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n,mq=on"],
     "mq=on on net device 'n' (multi-queue) is not supported: each NIC has one queue pair."),
    (["-drive", "id=d,file=disk1", "-device", "virtio-blk-device,drive=d,id=d,bootindex=1"],
     "bootindex= on 'd' sets a firmware boot order, and the micro-VM has no firmware: it boots -kernel directly "
     "(use root= in -append to pick the root disk)."),
    (["-drive", "id=d,file=disk1,format=qcow2"],
     "-drive format=qcow2 is not supported: disk images are raw files or block devices."),
    (["-drive", "id=d,file=disk1,if=scsi"],
     "Unknown 'if' value 'scsi' for -drive: only 'none' (a backend for -device) is supported."),
    (["-object", "memory-backend-ram,id=m,size=1G"],
     "-object memory-backend-ram is not supported: the micro-VM's RAM is one region sized by -m (and backed by "
     "-mem-path)."),
    (["-object", "tls-creds-x509,id=t,dir=/etc/pki"],
     "Unknown object type 'tls-creds-x509': the micro-VM supports iothread and rng-random."),
    (["-object", "id=x"], "-object needs a type first: -object iothread,id=<id> or -object rng-random,id=<id>,"
     "filename=<path>."),
    (["-netdev", "vhost-user,id=n,chardev=c"], "-netdev vhost-user is not supported by this VMM; use a tap."),
    (["-netdev", "user,id=n,ifname=t"], "Unsupported netdev type 'user': only 'tap' is supported."),
    (["-global", "pcie-root-port.fast-unplug=1"],
     "-global pcie-root-port.fast-unplug=1: global device properties are not supported: they configure PCI devices "
     "(such as pcie-root-port), and the micro-VM has no PCI bus."),
    (["-cpu", "host"], "-cpu is not supported: the guest sees the CPU model and features KVM offers on this host."),
    (["-incoming", "tcp:127.0.0.1:4446"],
     "-incoming tcp: (live migration) is not supported; only file:<dir> (a snapshot) is."),
    (["-incoming", "unix:/tmp/mig.sock"],
     "-incoming unix: (live migration) is not supported; only file:<dir> (a snapshot) is."),
    (["-incoming", "/tmp/snap"], "Invalid incoming uri /tmp/snap: use file:<snapshot directory>."),
    (["-serial", "pty"], "-serial pty: the serial port can only be connected to stdio (-serial stdio, or "
     "-serial chardev:<id> of a stdio chardev)."),
    (["-serial", "chardev:c", "-chardev", "pty,id=c"],
     "-serial chardev:c: the serial port can only be connected to stdio, and chardev 'c' is a pty chardev."),
    (["-chardev", "socket,id=c,path=c.sock,server", "-device", "virtio-serial-device",
      "-device", "virtconsole,chardev=c,id=con"],
     "Chardev 'c': a socket chardev needs 'server' and 'nowait': this VMM listens on the socket and never waits "
     "for a client."),
])
def test_refusals(env, extra, message):
    assert error(v2(env, *extra)) == message


def test_refusals_stop_a_vm_without_side_effects(env):
    """A refused command line creates nothing: the socket paths stay absent."""
    error(v2(env, "-device", "vhost-user-fs-device,chardev=c,tag=t,id=f"))
    assert not os.path.lexists("q.sock")


# -- values: checked as the 0.x parser checks them -------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    # drives and blk devices
    (["-drive", "file=disk1"], "'id' is missing for 'blk' device."),
    (["-drive", "id=d"], "'file' is missing for 'blk' device."),
    (["-drive", "id=d,file=disk1,readonly=2"], "Unable to parse '2' for 'readonly'; expected on, off, true, false, "
     "yes or no."),
    (["-drive", "id=d,file=disk1,serial=123456789012345678901"],
     "Input drive serial number string's length must be no more than 20."),
    (["-drive", "id=d,file=disk1,throttling.iops-total=1000001"], "iops of block device must >= 0 and <= 1000000."),
    (["-drive", "id=d,file=disk1,aio=native"], "Invalid parameter 'aio'"),
    (["-drive", "id=d,file=missing"], "The file of drive 'd' 'missing' is not accessible: No such file or directory."),
    (["-drive", "id=" + "i" * 256 + ",file=disk1"], "Input drive device id string's length must be no more than 255."),
    (["-drive", "id=d,file=disk1\0"], "The drive device path must not contain a NUL character."),
    (["-drive", "id=d,file="], "Invalid parameter 'file='"),
    (["-drive", "id=d,file=disk1", "-drive", "id=d,file=disk2"], "The id 'd' is given to more than one drive or net."),
    (["-device", "virtio-blk-device,id=b"], "'drive' is missing for 'blk' device."),
    (["-drive", "id=d,file=disk1", "-device", "virtio-blk-device,drive=d"], "'id' is missing for 'blk' device."),
    (["-device", "virtio-blk-device,drive=nod,id=b"],
     "Drive 'nod' of blk device 'b' is not defined; add -drive id=nod,file=<path>."),
    (["-drive", "id=d,file=disk1", "-device", "virtio-blk-device,drive=d,id=a",
      "-device", "virtio-blk-device,drive=d,id=b"],
     "Drive 'd' is already used by device 'a'; each backend serves one device."),
    (["-drive", "id=d,file=disk1", "-drive", "id=e,file=disk2", "-device", "virtio-blk-device,drive=d,id=a",
      "-device", "virtio-blk-device,drive=e,id=a"], "The device id 'a' is used more than once."),
    (["-drive", "id=d,file=disk1,serial=A", "-device", "virtio-blk-device,drive=d,id=b,serial=B"],
     "The serial of blk device 'b' ('B') differs from its drive's ('A'); give it once."),
    (["-drive", "id=d,file=disk1", "-device", "virtio-blk-device,drive=d,id=b,iothread=io9"],
     "The iothread 'io9' of drive 'b' is not defined; add it with -object iothread,id=io9."),
    (["-drive", "id=d,file=disk1", "-device", "virtio-blk-device,drive=d,id=b,num-queues=2"],
     "Invalid parameter 'num-queues'"),
    # netdevs and NICs
    (["-netdev", "id=n,ifname=t"], "-netdev needs a type first: -netdev tap,id=<id>,ifname=<tap> or fds=<fd>."),
    (["-netdev", "tap,ifname=t"], "'id' is missing for 'netdev' device."),
    (["-netdev", "tap,id=n"], "Tap device is missing, use 'ifname' or 'fds' to configure a tap device"),
    (["-netdev", "tap,id=n,ifname=t,fds=4"], "-netdev n: give ifname= or fds=, not both."),
    (["-netdev", "tap,id=n,fd=4,fds=5"], "-netdev n: give fd= or fds=, not both."),
    (["-netdev", "tap,id=n,fds=4:x"], "Unable to parse 'x' for 'fds'; expected a non-negative integer."),
    (["-netdev", "tap,id=n,fds=4:"], "Unable to parse '' for 'fds'; expected a non-negative integer."),
    (["-netdev", "tap,id=n,fds=-1"], "Unable to parse '-1' for 'fds'; expected a non-negative integer."),
    (["-netdev", "tap,id=n,fds=2147483648"],
     "Unable to parse '2147483648' for 'fds'; a file descriptor must be below 2147483648."),
    (["-netdev", "tap,id=n,ifname=t,vhostfd=5"], "-netdev vhostfds= needs vhost=on."),
    (["-netdev", "tap,id=n,ifname=t,vhost=on,vhostfd=5,vhostfds=6"],
     "-netdev n: give vhostfd= or vhostfds=, not both."),
    (["-netdev", "tap,id=n,ifname=" + "t" * 256], "Input host tap name string's length must be no more than 255."),
    (["-netdev", "tap,id=n,fds=4", "-netdev", "tap,id=m,fds=4"],
     "File descriptor 4 is given twice (fds= of netdev 'n' and fds= of netdev 'm'); pass each descriptor to one user."),
    (["-netdev", "tap,id=n,fds=3", "-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=3"],
     "File descriptor 3 is given twice (fds= of netdev 'n' and vhostfd= of vsock 'v'); pass each descriptor to one "
     "user."),
    (["-device", "virtio-net-device,id=x"], "'netdev' is missing for 'net' device."),
    (["-device", "virtio-net-device,netdev=non"],
     "Netdev 'non' of net device 'non' is not defined; add -netdev tap,id=non,ifname=<tap>."),
    (["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n,mac=12:34:56"],
     "Mac address '12:34:56' is illegal."),
    (["-netdev", "tap,id=n,ifname=t", "-device", "virtio-net-device,netdev=n", "-device",
      "virtio-net-device,netdev=n,id=b"],
     "Netdev 'n' is already used by device 'n'; each backend serves one device."),
    (["-netdev", "tap,id=x,ifname=t", "-drive", "id=x,file=disk1"],
     "The id 'x' is given to more than one drive or net."),
    # rng
    (["-object", "rng-random,id=r"], "'filename' is missing for 'rng-object' device."),
    (["-object", "rng-random,filename=/dev/urandom"], "'id' is missing for 'rng-object' device."),
    (["-object", "rng-random,id=r,filename=/nonexistent", "-device", "virtio-rng-device,rng=r"],
     "The rng random file '/nonexistent' is not accessible: No such file or directory."),
    (["-device", "virtio-rng-device,id=x"], "'rng' is missing for 'rng' device."),
    (["-device", "virtio-rng-device,rng=nor"],
     "The rng-random object 'nor' is not defined; add -object rng-random,id=nor,filename=/dev/urandom."),
    (["-object", "rng-random,id=r,filename=/dev/urandom"],
     "The rng-random object 'r' is not used by any device; add -device virtio-rng-device,rng=r or remove it."),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r,max-bytes=100"],
     "Argument 'period' is missing"),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r,period=100"],
     "Argument 'max-bytes' is missing"),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-device", "virtio-rng-device,rng=r,max-bytes=1,period=0"],
     "Illegal period arguments: 0"),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-device",
      "virtio-rng-device,rng=r,max-bytes=63,period=1000"],
     "The bytes per second of rng device must >= 64 and <= 1000000000."),
    (["-object", "rng-random,id=r,filename=/dev/urandom",
      "-device", "virtio-rng-device,rng=r,max-bytes=1000000001,period=1000"],
     "The bytes per second of rng device must >= 64 and <= 1000000000."),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-object", "rng-random,id=r,filename=/dev/random"],
     "The object id 'r' is used more than once."),
    (["-object", "rng-random,id=r,filename=/dev/urandom", "-object", "rng-random,id=s,filename=/dev/urandom",
      "-device", "virtio-rng-device,rng=r", "-device", "virtio-rng-device,rng=s"],
     "Only one rng device is supported for each vm."),
    # iothreads
    (["-object", "iothread"], "'id' is missing for 'iothread' device."),
    (["-object", "iothread,id=a", "-object", "iothread,id=a"], "The object id 'a' is used more than once."),
    ([a for i in range(9) for a in ("-object", f"iothread,id=t{i}")], "Iothread number must >= 0 and <= 8."),
    # chardevs, consoles, serial
    (["-chardev", "socket,id=c,server,nowait"], "'path' is missing for 'socket-type chardev' device."),
    (["-chardev", "file,id=c"], "'path' is missing for 'file-type chardev' device."),
    (["-chardev", "socket,path=c.sock,server,nowait"], "'id' is missing for 'chardev' device."),
    (["-chardev", "vc,id=c,server"], "Invalid parameter 'vc' for 'chardev'"),
    (["-chardev", "pty,id=c,path=p,server"], "Chardev of pty-type does not support 'server' argument"),
    (["-chardev", "stdio,id=c,path=p", "-serial", "chardev:c"],
     "Chardev of stdio-type does not support 'path' argument"),
    (["-chardev", "socket,id=c,path=c.sock,server=on,nowait"], "No parameter needed for server"),
    (["-chardev", "socket,id=c,path=" + "p" * 108 + ",server,nowait"],
     f"The console socket path '{'p' * 108}' is longer than 107 bytes, too long for a UNIX socket."),
    (["-chardev", "socket,id=c,path=c.sock,server,nowait"],
     "Chardev 'c' is not used by any device; connect it with -device virtconsole,chardev=c,id=<id> or remove it."),
    (["-chardev", "socket,id=c,path=a.sock,server,nowait", "-chardev", "socket,id=c,path=b.sock,server,nowait"],
     "The chardev id 'c' is used more than once."),
    (["-device", "virtio-serial-device", "-device", "virtconsole,id=con"],
     "'chardev' is missing for 'virtserialport' device."),
    (["-device", "virtio-serial-device", "-device", "virtconsole,chardev=c"],
     "'id' is missing for 'virtserialport' device."),
    (["-device", "virtio-serial-device", "-device", "virtconsole,chardev=c,id=con"],
     "Chardev 'c' of 'con' is not defined; add -chardev socket,id=c,path=<path>,server,nowait."),
    (["-chardev", "pty,id=c", "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c,id=con,nr=1"],
     "virtio serial port nr 1 should be less than virtio serial's max_nr_ports 1"),
    (["-chardev", "pty,id=c", "-chardev", "pty,id=d", "-device", "virtio-serial-device",
      "-device", "virtconsole,chardev=c,id=a", "-device", "virtconsole,chardev=d,id=b"],
     "Repetitive virtio serial port nr 0."),
    (["-chardev", "pty,id=c", "-device", "virtconsole,chardev=c,id=con"],
     "virtconsole 'con' needs its bus: add -device virtio-serial-device."),
    (["-device", "virtio-serial-device"], "-device virtio-serial-device has no port: add -device virtconsole,"
     "chardev=<id>,id=<id>."),
    (["-device", "virtio-serial-device", "-device", "virtio-serial-device"],
     "Only one virtio serial device is supported"),
    (["-chardev", "pty,id=c", "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c,id=a",
      "-serial", "chardev:c"], "Chardev 'c' is already used by device 'a'; each backend serves one device."),
    (["-serial", "chardev:nope"], "Chardev 'nope' of 'serial' is not defined; add -chardev socket,id=nope,"
     "path=<path>,server,nowait."),
    (["-chardev", "stdio,id=c", "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c,id=a",
      "-serial", "stdio"], "Can't set multiple devices redirected to stdio"),
    (["-chardev", "stdio,id=c", "-device", "virtio-serial-device", "-device", "virtconsole,chardev=c,id=a",
      "-daemonize"], "Device redirected to stdio and daemonize can't be set together"),
    (["-serial", "stdio", "-daemonize"], "Device redirected to stdio and daemonize can't be set together"),
    # balloon, vsock
    (["-device", "virtio-balloon-device", "-device", "virtio-balloon-device"],
     "Only one balloon device is supported for each vm."),
    (["-device", "virtio-balloon-device,deflate-on-oom=maybe"],
     "Unable to parse 'maybe' for 'deflate-on-oom'; expected on, off, true, false, yes or no."),
    (["-device", "virtio-balloon-device,auto-balloon=on"], "Invalid parameter 'auto-balloon'"),
    (["-device", "vhost-vsock-device,id=v,guest-cid=2"], "Vsock guest-cid must >= 3 and < 4294967295."),
    (["-device", "vhost-vsock-device,guest-cid=3"], "'id' is missing for 'vsock' device."),
    (["-device", "vhost-vsock-device,id=v"], "'guest-cid' is missing for 'vsock' device."),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3,vhostfd=x"],
     "Unable to parse 'x' for 'vhostfd'; expected a non-negative integer."),
    (["-device", "vhost-vsock-device,id=v,guest-cid=3", "-device", "vhost-vsock-device,id=w,guest-cid=4"],
     "Device vsock can only be set one for one StratoVirt VM."),
    # everything else
    (["-uuid", "6e7b0e90-3b2e-4179-bc30-43d2b5b5964"], "Invalid UUID '6e7b0e90-3b2e-4179-bc30-43d2b5b5964': use the "
     "form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hexadecimal digits)."),
    (["-uuid", "{6e7b0e90-3b2e-4179-bc30-43d2b5b5964f}"], "Invalid UUID '{6e7b0e90-3b2e-4179-bc30-43d2b5b5964f}': use "
     "the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hexadecimal digits)."),
    (["-incoming", "file:"], "The snapshot directory must not be empty."),
    (["-incoming", "file:nowhere"], "The snapshot directory 'nowhere' is not accessible: No such file or directory."),
    (["-incoming", "file:disk1"], "The snapshot directory 'disk1' is not a directory."),
    (["-qmp", "unix:y.sock,server,nowait"], "The argument 'qmp' was provided more than once. Use '-h' or '-help' to "
     "get usage."),
    (["-m", "127"], "Memory size must >= 128MiB and <= 512GiB, default unit: MiB, current memory size: 133169152 "
     "bytes."),
    (["-m", "256K"], "Unable to parse memory size '256K'; use MiB or a number with an M or G suffix."),
    (["-smp", "cpus=0"], "CPU number must >= 1 and <= 254."),
    (["-pidfile", "vm.pid"], "-pidfile must be used with -daemonize together."),
])
def test_value_checks(env, extra, message):
    assert error(v2(env, *extra)) == message


def test_missing_kernel_names_no_json_in_2x(env):
    assert error(["-qmp", "unix:q.sock,server,nowait"]) == "No kernel image is given: use -kernel."


def test_qmp_socket_forms_and_errors(env):
    for suffix in (",server,nowait", ",nowait,server", ",server", ""):
        assert parse(["-kernel", env.kernel, "-qmp", f"unix:vm.sock{suffix}"]).qmp_socket == "vm.sock"
    assert error(["-kernel", env.kernel, "-qmp", "tcp:127.0.0.1:4444,server,nowait"]) == "tcp type is not support yet!"
    open("busy.sock", "w").close()
    assert error(v2(env)[:2] + ["-qmp", "unix:busy.sock,server,nowait"]) == (
        "The QMP socket path 'busy.sock' already exists; StratoVirt does not remove it, so remove it first.")


# -- what the 2.x parts mean ------------------------------------------------------------------------------

def test_backends_without_devices_are_registered_for_hot_plug(env):
    cfg = parse(v2(env, "-drive", "id=spare,file=disk1", "-netdev", "tap,id=n1,ifname=tap1"))
    assert cfg.drives == [DriveConfig("spare", "disk1")] and cfg.block_devices == []
    assert cfg.netdevs == [NetdevConfig("n1", "tap1")] and cfg.net_devices == []


def test_devices_fill_slots_in_device_order_not_drive_order(env):
    cfg = parse(v2(env, "-device", "virtio-blk-device,drive=b,id=first", "-drive", "id=a,file=disk1",
                   "-drive", "id=b,file=disk2", "-device", "virtio-blk-device,drive=a,id=second"))
    assert cfg.block_devices == [BlockDeviceConfig("first", "b"), BlockDeviceConfig("second", "a")]


def test_drive_defaults_and_serial_from_either_side(env):
    cfg = parse(v2(env, "-drive", "id=a,file=disk1,serial=SN1,if=none,format=raw,throttling.iops-total=200",
                   "-device", "virtio-blk-device,drive=a,id=va",
                   "-drive", "id=b,file=disk2", "-device", "virtio-blk-device,drive=b,id=vb,serial=SN2"))
    assert cfg.drives == [DriveConfig("a", "disk1", direct=True, iops=200), DriveConfig("b", "disk2")]
    assert [d.serial for d in cfg.block_devices] == ["SN1", "SN2"]


def test_slot_limits(env):
    six = [a for i in range(1, 7) for a in ("-drive", f"id=d{i},file=disk{i}",
                                             "-device", f"virtio-blk-device,drive=d{i},id=v{i}")]
    assert len(parse(v2(env, *six)).block_devices) == 6
    assert error(v2(env, *six, "-drive", "id=d7,file=disk7", "-device", "virtio-blk-device,drive=d7,id=v7")) == (
        "A maximum of 6 block devices are supported, but 7 are given.")
    nets = [a for i in range(3) for a in ("-netdev", f"tap,id=n{i},ifname=t{i}",
                                          "-device", f"virtio-net-device,netdev=n{i}")]
    assert error(v2(env, *nets)) == "A maximum of 2 net devices are supported, but 3 are given."
    spare = [a for i in range(1, 8) for a in ("-drive", f"id=d{i},file=disk{i}")]
    assert error(v2(env, *spare, "-netdev", "tap,id=n,ifname=t", "-netdev", "tap,id=m,ifname=u")) == (
        "A maximum of 8 drives and netdevs together are supported (one per replaceable slot), but 9 are given.")


def test_net_device_id_defaults_to_its_netdev_and_tap_fds(env):
    cfg = parse(v2(env, "-netdev", "tap,id=n,fd=7,vhost=off", "-device", "virtio-net-device,netdev=n,mq=off"))
    assert cfg.netdevs == [NetdevConfig("n", fds=("7",))] and cfg.net_devices == [NetDeviceConfig("n", "n")]
    cfg = parse(v2(env, "-netdev", "tap,id=n,ifname=t,vhost=on,vhostfds=8:9"))
    assert cfg.netdevs == [NetdevConfig("n", "t", vhost=True, vhostfds=("8", "9"))]


def test_chardev_backends_console_and_serial(env):
    cfg = parse(v2(env, "-chardev", "file,id=f,path=console.log", "-device", "virtio-serial-device,id=vs",
                   "-device", "virtconsole,chardev=f,id=con"))
    assert cfg.chardevs == [ChardevConfig("f", "file", "console.log")]
    assert cfg.consoles == [ConsoleConfig("con", "f", 0)]
    cfg = parse(v2(env, "-chardev", "pty,id=p", "-device", "virtio-serial-device",
                   "-device", "virtconsole,chardev=p,id=c",
                   "-chardev", "stdio,id=s", "-serial", "chardev:s"))
    assert cfg.chardevs == [ChardevConfig("p", "pty")] and cfg.serial == SerialConfig(stdio=True)
    assert parse(v2(env, "-serial", "stdio")).serial == SerialConfig(stdio=True)


def test_balloon_rng_vsock_uuid(env):
    cfg = parse(v2(env, "-device", "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=off",
                   "-object", "rng-random,id=r,filename=/dev/urandom",
                   "-device", "virtio-rng-device,rng=r,id=rng0,max-bytes=64,period=1000",
                   "-device", "vhost-vsock-device,id=v,guest-cid=4294967294", "-uuid", UUID.upper()))
    assert cfg.balloon == BalloonConfig(deflate_on_oom=True, id="balloon0")
    assert cfg.rng == RngConfig("/dev/urandom", 64, 1000)
    assert cfg.vsock == VsockConfig("v", 4294967294)
    assert cfg.uuid == UUID  # canonical lower case
    assert parse(v2(env, "-device", "virtio-balloon-device")).balloon == BalloonConfig()


def test_rng_rate_is_max_bytes_per_period(env):
    rng = ["-object", "rng-random,id=r,filename=/dev/urandom"]
    assert parse(v2(env, *rng, "-device", "virtio-rng-device,rng=r,max-bytes=1,period=10")).rng == (
        RngConfig("/dev/urandom", 1, 10))  # 100 bytes/s: inside StratoVirt's bounds


def test_help_lists_both_dialects(env):
    text = parse_command_line(["-help"]).text
    for option in ("-qmp", "-api-channel", "-object", "-uuid", "-incoming", "-config", "-balloon"):
        assert option in text


# -- fuzzing: any 2.x-looking argv gives a VmConfig or one ConfigError sentence ---------------------------

_DRIVERS = ["virtio-blk-device", "virtio-net-device", "virtio-balloon-device", "virtio-rng-device",
            "virtio-serial-device", "virtconsole", "vhost-vsock-device", "virtio-blk-pci", "vhost-user-fs-device",
            "virtserialport", "x"]
_KEYS = ["id", "drive", "netdev", "rng", "chardev", "file", "filename", "ifname", "fds", "fd", "vhost", "vhostfd",
         "vhostfds", "mac", "iothread", "serial", "nr", "max-bytes", "period", "guest-cid", "deflate-on-oom",
         "free-page-reporting", "mq", "bootindex", "if", "format", "readonly", "direct", "throttling.iops-total",
         "path", ""]
_ATOMS = ["a", "b", "disk1", "rootfs", "/dev/urandom", "3", "4", "4:5", "0", "on", "off", "none", "raw", "pflash",
          "12:34:56:78:9A:BC", "server", "nowait", "socket", "pty", "stdio", "file", "tap", "iothread", "rng-random",
          "", "\0", "é", "x" * 300]


def _kv(first):
    pair = st.tuples(st.sampled_from(_KEYS), st.sampled_from(_ATOMS))
    return st.tuples(first, st.lists(pair, max_size=5)).map(
        lambda t: ",".join([t[0], *(f"{k}={v}" if k else v for k, v in t[1])]))


_OPTION = st.one_of(
    st.tuples(st.just("-device"), _kv(st.sampled_from(_DRIVERS))),
    st.tuples(st.just("-drive"), _kv(st.just("id=a"))),
    st.tuples(st.just("-netdev"), _kv(st.sampled_from(["tap", "user", "id=a"]))),
    st.tuples(st.just("-object"), _kv(st.sampled_from(["iothread", "rng-random", "memory-backend-ram"]))),
    st.tuples(st.just("-chardev"), _kv(st.sampled_from(["socket", "pty", "stdio", "file"]))),
    st.tuples(st.sampled_from(["-serial", "-uuid", "-incoming", "-m", "-machine", "-smp"]), st.sampled_from(_ATOMS)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(_OPTION, max_size=8))
def test_fuzz_2x_command_lines(env, options):
    argv = ["-kernel", env.kernel, "-qmp", "unix:fz.sock,server,nowait"] + [a for pair in options for a in pair]
    try:
        cfg = parse_command_line(argv).config
    except ConfigError as err:
        assert str(err) and str(err).isprintable()
        return
    assert cfg.dialect is Dialect.V2
