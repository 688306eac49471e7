"""What StratoVirt 2.x clients send over QMP, byte for byte, against a real VMM (probe guest):
Kata's govmm (sorted keys, "arguments" first, decimal addr, romfile ""), openEuler's Kata fork
(virtio-blk-pci on the micro-VM, share-rw "on", host_device), Kuasar's qapi-rs (enable:[]).
Source of every message: ../shared/reference/stratovirt-2x-clients.md §1.6, §3, §5.1."""

from __future__ import annotations

import os
import zlib

import pytest

from helpers.decoders import GO_CPU_INFO, GO_STATUS, go_decode, serde_cpu_infos, serde_status
from helpers.vmproc import Qmp, VmProcess, probe_value, wait_for_path

pytestmark = pytest.mark.kvm

SECTOR = 512


@pytest.fixture
def image():
    # O_DIRECT (Kata sends no cache member, so direct is on) needs a disk, not tmpfs.
    path = f"/var/tmp/pystratovirt-2x-{os.getpid()}.img"
    data = bytes((i * 13) & 0xFF for i in range(2 << 20))
    with open(path, "wb") as f:
        f.write(data)
    yield path, data
    os.unlink(path)


def exchange(qmp: Qmp, line: bytes) -> tuple[list[dict], dict]:
    qmp.send_raw(line)
    events = []
    while True:
        msg = qmp.read()
        if "event" not in msg:
            return events, msg
        events.append(msg)


def test_kata_and_kuasar_transcripts(probe_elf, tmp_path, image):
    path, data = image
    sock = tmp_path / "qmp.socket"
    with VmProcess(["-kernel", str(probe_elf), "-serial", "stdio", "-smp", "2",
                    "-api-channel", f"unix:{sock}"]) as vm:
        vm.wait_for(r"(?m)^ready\r?$", 60)
        wait_for_path(sock)
        # Kata's waitVM: connect, negotiate, close; then qmpSetup keeps a connection.
        with Qmp(sock) as qmp:
            assert exchange(qmp, b'{"execute":"qmp_capabilities"}\n')[1] == {"return": {}}
        with Qmp(sock) as qmp:
            assert exchange(qmp, b'{"execute":"qmp_capabilities"}\n')[1] == {"return": {}}
            cpus = exchange(qmp, b'{"execute":"query-cpus"}\n')[1]["return"]
            go_decode(cpus, [GO_CPU_INFO], "CPUInfo")
            assert sorted(c["CPU"] for c in cpus) == [0, 1] and all(c["thread_id"] > 0 for c in cpus)
            assert all(os.path.exists(f"/proc/{vm.pid}/task/{c['thread_id']}") for c in cpus)

            # Block hot-plug exactly as govmm marshals it (keys sorted, addr decimal).
            add = (b'{"arguments":{"driver":"raw","file":{"aio":"native","driver":"file","filename":"'
                   + path.encode() + b'"},"node-name":"drive-abc","read-only":false},'
                   b'"execute":"blockdev-add"}\n')
            assert exchange(qmp, add)[1] == {"return": {}}
            dev = (b'{"arguments":{"addr":"1","drive":"drive-abc","driver":"virtio-blk-mmio",'
                   b'"id":"drive-abc","romfile":""},"execute":"device_add"}\n')
            assert exchange(qmp, dev)[1] == {"return": {}}
            assert probe_value(vm.command("blk 1 wait-config 10000"), "capacity", sep=": ") == str(len(data) // SECTOR)
            assert probe_value(vm.command("blk 1 read 100 8"), "crc32", sep=": ") == \
                f"0x{zlib.crc32(data[100 * SECTOR:108 * SECTOR]):08x}"
            events, reply = exchange(qmp, b'{"arguments":{"id":"drive-abc"},"execute":"device_del"}\n')
            assert reply == {"return": {}}
            assert [(e["event"], e["data"]["device"]) for e in events] == \
                [("DEVICE_DELETED", "drive-abc")]

            # openEuler's Kata fork: virtio-blk-pci on the micro-VM, share-rw "on", host_device.
            add = (b'{"arguments":{"driver":"raw","file":{"driver":"host_device","filename":"'
                   + path.encode() + b'"},"node-name":"d2","read-only":true},"execute":"blockdev-add"}\n')
            assert exchange(qmp, add)[1] == {"return": {}}
            dev = (b'{"arguments":{"addr":"2","drive":"d2","driver":"virtio-blk-pci","id":"d2",'
                   b'"romfile":"","share-rw":"on"},"execute":"device_add"}\n')
            assert exchange(qmp, dev)[1] == {"return": {}}
            assert probe_value(vm.command("blk 2 wait-config 10000"), "capacity", sep=": ") == str(len(data) // SECTOR)
            # read-only is honoured (the slot's features were fixed at boot, so the guest learns
            # it from the refused write, not from VIRTIO_BLK_F_RO).
            assert probe_value(vm.command("blk 2 write 0 1 ff force"), "status", sep=": ") == "1"
            assert exchange(qmp, b'{"arguments":{"id":"d2"},"execute":"device_del"}\n')[1] == \
                {"return": {}}

        # Kuasar (qapi-rs): arguments always present, enable:[] on negotiation, status as a ping.
        with Qmp(sock) as qmp:
            assert exchange(qmp, b'{"execute":"qmp_capabilities","arguments":{"enable":[]}}\n')[1] \
                == {"return": {}}
            status = exchange(qmp, b'{"execute":"query-status","arguments":{}}\n')[1]
            assert "id" not in status  # qapi-rs without oob refuses a reply with an id
            serde_status(status["return"])
            go_decode(status["return"], GO_STATUS)
            cpus = exchange(qmp, b'{"execute":"query-cpus","arguments":{}}\n')[1]["return"]
            serde_cpu_infos(cpus)
            assert exchange(qmp, b'{"execute":"quit","arguments":{}}\n')[0][0]["event"] == "SHUTDOWN"
        assert vm.wait_exit(30) == 0
    with open(path, "rb") as f:
        assert f.read() == data
