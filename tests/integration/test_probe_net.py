"""virtio-net on a tap, driven from inside the probe guest under real KVM.

Each test makes its own network namespace, creates the tap there and runs the VMM inside it;
the test's end of the wire is a packet socket bound to the tap in the same namespace. No address
outside the namespace is ever used.
"""

from __future__ import annotations

import os
import time
import zlib

import pytest

from helpers.netns import NetNs, recv_from_guest
from helpers.vmproc import Qmp, VmProcess, probe_value, wait_for_path

pytestmark = pytest.mark.kvm

GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = bytes.fromhex("020000aabbcc")


def boot(probe_elf, ns: NetNs, sock, *args) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-api-channel", f"unix:{sock}", *args],
                   prefix=["ip", "netns", "exec", ns.name])
    vm.wait_for(r"(?m)^ready\r?$", 60)
    wait_for_path(sock)
    return vm


def test_frames_both_ways_on_a_boot_nic(probe_elf, ns, tmp_path):
    ns.add_tap("tap0")
    peer = ns.packet_socket("tap0")
    with boot(probe_elf, ns, tmp_path / "s", "-netdev", f"id=net0,netdev=tap0,mac={GUEST_MAC}") as vm:
        info = vm.command("net 0 info")
        assert probe_value(info, "mac", sep=": ") == GUEST_MAC and probe_value(info, "link", sep=": ") == "up"
        assert probe_value(vm.command("net 1 info"), "link", sep=": ") == "down"  # the empty slot

        # Guest -> host: exact bytes, MAC and length.
        vm.command(f"net 0 send {PEER_MAC.hex(':')} 88b5 300 a7")
        frame = recv_from_guest(peer, 0x88B5)
        assert frame[:6] == PEER_MAC
        assert frame[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))
        assert len(frame) == 300 and frame[14:] == b"\xa7" * 286

        # Host -> guest.
        vm.command("net 0 drain")
        payload = os.urandom(1000)
        out_frame = bytes.fromhex(GUEST_MAC.replace(":", "")) + PEER_MAC + b"\x88\xb6" + payload
        peer.send(out_frame)
        line = vm.command("net 0 recv 5000")[0]
        assert f"len={len(out_frame)}" in line and "type=0x88b6" in line
        assert f"crc32=0x{zlib.crc32(out_frame):08x}" in line
    peer.close()


def test_nic_hot_plug_traffic_and_unplug(probe_elf, ns, tmp_path):
    ns.add_tap("tap0")
    ns.add_tap("tap1")
    sock = tmp_path / "s"
    with boot(probe_elf, ns, sock, "-netdev", "id=net0,netdev=tap0") as vm, Qmp(sock) as qmp:
        assert probe_value(vm.command("net 1 info"), "link", sep=": ") == "down"
        assert qmp.execute("netdev_add", {"id": "net-1", "ifname": "tap1"})[1] == {"return": {}}
        reply = qmp.execute("device_add", {"id": "net-1", "driver": "virtio-net-mmio", "addr": "0x1"})[1]
        assert reply == {"return": {}}
        deadline = time.monotonic() + 10
        while probe_value(vm.command("net 1 info"), "link", sep=": ") != "up":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        peer = ns.packet_socket("tap1")
        vm.command(f"net 1 send {PEER_MAC.hex(':')} 88b5 64 11")
        assert len(recv_from_guest(peer, 0x88B5)) == 64

        events, reply = qmp.execute("device_del", {"id": "net-1"})
        assert reply == {"return": {}}
        assert [(e["event"], e["data"]) for e in events] == [("DEVICE_DELETED", {"device": "net-1", "path": "net-1"})]
        assert probe_value(vm.command("net 1 info"), "link", sep=": ") == "down"
        peer.close()

        # Errors: each leaves the VM as it was.
        def error(cmd, args):
            events, reply = qmp.execute(cmd, args)
            assert events == [] and "error" in reply, reply
            return reply["error"]["desc"]
        assert "does not exist" in error("netdev_add", {"id": "n-x", "ifname": "nosuchtap"})
        assert "busy" in error("netdev_add", {"id": "n-busy", "ifname": "tap0"})  # the boot NIC has it
        qmp.execute("netdev_add", {"id": "net-2", "ifname": "tap1"})
        assert error("device_add", {"id": "net-2", "driver": "virtio-net-mmio", "addr": "0x2"}) == \
            "Index 2 is out of bounds 2 for net to add replaceable device"
        assert "already used" in error("device_add", {"id": "net-2", "driver": "virtio-net-mmio", "addr": "0x0"})
        assert error("netdev_add", {"id": "net-2", "ifname": "tap1"}) == "Add the id net-2 repeatedly"
        assert probe_value(vm.command("net 0 info"), "link", sep=": ") == "up"


def test_tap_deleted_under_running_vm(probe_elf, ns, tmp_path):
    ns.add_tap("tap0")
    with boot(probe_elf, ns, tmp_path / "s", "-netdev", "id=net0,netdev=tap0") as vm:
        ns.delete_link("tap0")
        vm.command(f"net 0 send {PEER_MAC.hex(':')} 88b5 64 11")
        time.sleep(0.5)
        assert vm.command("echo alive") == ["alive"]
        assert vm.proc.poll() is None


def test_unknown_boot_tap_is_a_clear_error(probe_elf, ns):
    import subprocess

    from helpers.vmproc import STRATOVIRT
    res = subprocess.run(["ip", "netns", "exec", ns.name, *STRATOVIRT, "-kernel", str(probe_elf),
                          "-netdev", "id=n0,netdev=nosuchtap"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "nosuchtap" in res.stderr and "Traceback" not in res.stderr


def test_nic_hot_plug_by_descriptor(probe_elf, ns, tmp_path):
    # issue 9 defect 1: the manager opens the taps (in a namespace the VMM never enters) and hands
    # them over, one inherited at start-up as Kata does, one over QMP with getfd; netdev_add then
    # names the descriptor, device_add plugs it, and frames flow both ways on each.
    ns.add_tap("tap0")
    ns.add_tap("tap1")
    inherited, sent = ns.open_tap("tap0"), ns.open_tap("tap1")
    sock = tmp_path / "s"
    vm = VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-D", "-api-channel", f"unix:{sock}"],
                   pass_fds=(inherited.fd,))
    try:
        with vm, Qmp(sock) as qmp:
            vm.wait_for(r"(?m)^ready\r?$", 60)
            assert qmp.execute("netdev_add", {"id": "net-0", "fds": str(inherited.fd)})[1] == {"return": {}}
            qmp.send_fds(b'{"execute":"getfd","arguments":{"fdname":"tapfd"}}\n', [sent.fd])
            assert qmp.read() == {"return": {}}
            assert qmp.execute("netdev_add", {"id": "net-1", "fds": "tapfd"})[1] == {"return": {}}
            # The store gave the descriptor to the netdev: the name is spent.
            assert "not found" in qmp.execute("closefd", {"fdname": "tapfd"})[1]["error"]["desc"]
            for slot in (0, 1):
                reply = qmp.execute("device_add", {"id": f"net-{slot}", "driver": "virtio-net-mmio",
                                                   "addr": hex(slot)})[1]
                assert reply == {"return": {}}
            deadline = time.monotonic() + 10
            while any(probe_value(vm.command(f"net {slot} info"), "link", sep=": ") != "up" for slot in (0, 1)):
                assert time.monotonic() < deadline
                time.sleep(0.1)

            for slot, ifname in ((0, "tap0"), (1, "tap1")):
                peer = ns.packet_socket(ifname)
                vm.command(f"net {slot} send {PEER_MAC.hex(':')} 88b5 {100 + slot} 5{slot}")
                frame = recv_from_guest(peer, 0x88B5)
                assert len(frame) == 100 + slot and frame[14:] == bytes([0x50 + slot]) * (86 + slot)
                vm.command(f"net {slot} drain")
                mac = bytes.fromhex(probe_value(vm.command(f"net {slot} info"), "mac", sep=": ").replace(":", ""))
                assert frame[6:12] == mac
                out_frame = mac + PEER_MAC + b"\x88\xb6" + os.urandom(200)
                peer.send(out_frame)
                line = vm.command(f"net {slot} recv 5000")[0]
                assert f"crc32=0x{zlib.crc32(out_frame):08x}" in line
                peer.close()

            # Unplugging the first leaves the second working.
            assert qmp.execute("device_del", {"id": "net-0"})[1] == {"return": {}}
            assert probe_value(vm.command("net 0 info"), "link", sep=": ") == "down"
            assert probe_value(vm.command("net 1 info"), "link", sep=": ") == "up"
    finally:
        inherited.close()
        sent.close()
