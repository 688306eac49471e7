"""QMP against a real VM (the probe guest under KVM): the seed's transcripts, lifecycle, events."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import time

import pytest

from helpers.vmproc import Qmp, VmProcess, wait_for_path

pytestmark = pytest.mark.kvm

GREETING = b'{"QMP":{"version":{"qemu":{"micro":1,"minor":0,"major":4},"package":""},"capabilities":[]}}'


@pytest.fixture
def sock(tmp_path):
    return tmp_path / "vm.sock"


def start(probe_elf, sock, *extra, ready=True) -> VmProcess:
    vm = VmProcess(["-kernel", str(probe_elf), "-append", "console=ttyS0", "-serial", "stdio", "-D",
                    "-api-channel", f"unix:{sock}", *extra])
    if ready:
        vm.wait_for(r"(?m)^ready\r?$", 60)
    wait_for_path(sock)
    return vm


def timer_count(vm: VmProcess) -> int:
    for line in vm.command("irqs"):
        m = re.search(r"name=timer count=(\d+)", line)
        if m:
            return int(m.group(1))
    raise AssertionError("no timer line")


def test_seed_transcripts_and_exact_bytes(probe_elf, sock):
    with start(probe_elf, sock, "-smp", "2") as vm, Qmp(sock) as qmp:
        assert qmp.greeting_line == GREETING
        qmp.send_raw(b'{ "execute": "query-status" }')
        assert qmp.read_line() == b'{"return":{"running":true,"singlestep":false,"status":"running"}}'

        _, reply = qmp.execute("query-cpus")
        cpus = reply["return"]
        assert [c["CPU"] for c in cpus] == [0, 1]
        for i, c in enumerate(cpus):
            assert list(c) == ["CPU", "arch", "current", "halted", "props", "qom_path", "thread_id"]
            assert c["arch"] == "x86" and c["current"] is True and c["halted"] is False
            assert c["props"] == {"core-id": 0, "socket-id": i, "thread-id": 0}
            assert c["qom_path"] == f"/machine/unattached/device[{i}]"
        tids = [c["thread_id"] for c in cpus]
        assert len(set(tids)) == 2
        tasks = set(map(int, os.listdir(f"/proc/{vm.pid}/task")))
        assert set(tids) <= tasks and vm.pid not in tids

        _, reply = qmp.execute("query-hotpluggable-cpus")
        assert reply == {"return": [
            {"props": {"core-id": 0, "socket-id": 0, "thread-id": 0},
             "qom-path": "/machine/unattached/device[0]", "type": "host-x86-cpu", "vcpus-count": 1},
            {"props": {"core-id": 0, "socket-id": 1, "thread-id": 0},
             "qom-path": "/machine/unattached/device[1]", "type": "host-x86-cpu", "vcpus-count": 1}]}


def test_offline_vcpu_slots(probe_elf, sock):
    with start(probe_elf, sock, "-smp", "cpus=1,maxcpus=3") as vm, Qmp(sock) as qmp:
        _, reply = qmp.execute("query-hotpluggable-cpus")
        entries = reply["return"]
        assert len(entries) == 3
        assert "qom-path" in entries[0]
        assert all("qom-path" not in e for e in entries[1:])
        assert [e["props"]["socket-id"] for e in entries] == [0, 1, 2]
        _, reply = qmp.execute("query-cpus")
        assert len(reply["return"]) == 1
        # The guest is told the same: three processor slots, two of them disabled.
        text = vm.serial()
        assert "cpus: 1 in MP table (2 disabled)" in text
        assert re.search(r"(?m)^cpus online: 1\r?$", text)


def test_stop_freezes_the_guest_and_cont_resumes(probe_elf, sock):
    with start(probe_elf, sock) as vm, Qmp(sock) as qmp:
        t0 = timer_count(vm)
        time.sleep(1.0)
        t1 = timer_count(vm)
        assert t1 - t0 >= 20  # the probe's 50 Hz tick runs while the VM runs

        events, reply = qmp.execute("stop")
        assert reply == {"return": {}}
        assert [e["event"] for e in events] == ["STOP"] and events[0]["data"] == {}
        assert set(events[0]["timestamp"]) == {"seconds", "microseconds"}
        assert abs(events[0]["timestamp"]["seconds"] - time.time()) < 5
        assert qmp.execute("query-status")[1] == {
            "return": {"running": False, "singlestep": False, "status": "paused"}}

        # While paused the guest makes no progress: it answers nothing on its console.
        start_pos = len(vm.out.data)
        vm.send("echo frozen\n")
        time.sleep(2.0)
        assert b"frozen" not in vm.out.data[start_pos:]

        events, reply = qmp.execute("stop")
        assert reply["error"]["class"] == "GenericError" and events == []

        events, reply = qmp.execute("cont")
        assert reply == {"return": {}} and [e["event"] for e in events] == ["RESUME"]
        vm.wait_for(r"(?m)^frozen\r?\nok\r?\n", 10)
        t2 = timer_count(vm)
        # 2+ s paused: a running guest would have taken 100+ ticks; a frozen one a handful.
        assert t2 - t1 < 40

        events, reply = qmp.execute("cont")
        assert reply["error"]["class"] == "GenericError" and events == []
        assert qmp.execute("query-status")[1]["return"]["status"] == "running"


def test_freeze_option_starts_paused(probe_elf, sock):
    with start(probe_elf, sock, "-S", ready=False) as vm, Qmp(sock) as qmp:
        assert qmp.execute("query-status")[1]["return"] == {
            "running": False, "singlestep": False, "status": "paused"}
        time.sleep(0.5)
        assert vm.serial() == ""  # not a single guest instruction has run
        events, reply = qmp.execute("cont")
        assert reply == {"return": {}} and events[0]["event"] == "RESUME"
        vm.wait_for(r"(?m)^ready\r?$", 60)


def test_quit(probe_elf, sock):
    with start(probe_elf, sock) as vm, Qmp(sock) as qmp:
        events, reply = qmp.execute("quit")
        assert reply == {"return": {}}
        assert [(e["event"], e["data"]) for e in events] == [
            ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        assert vm.wait_exit(30) == 0
        assert not sock.exists()


def test_guest_reboot_emits_shutdown(probe_elf, sock):
    with start(probe_elf, sock) as vm, Qmp(sock) as qmp:
        vm.send("reboot\n")
        event = qmp.read()
        assert event["event"] == "SHUTDOWN"
        assert event["data"] == {"guest": True, "reason": "guest-reset"}
        assert vm.wait_exit(30) == 0
        assert not sock.exists()


def test_sigterm_emits_shutdown(probe_elf, sock):
    with start(probe_elf, sock) as vm, Qmp(sock) as qmp:
        vm.signal(signal.SIGTERM)
        event = qmp.read()
        assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        assert vm.wait_exit(30) == 0


def test_one_client_at_a_time_and_reconnect(probe_elf, sock):
    with start(probe_elf, sock):
        first = Qmp(sock)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(str(sock))
        second.settimeout(0.5)
        with pytest.raises(socket.timeout):
            second.recv(100)  # no greeting while the first client is connected
        first.execute("stop")
        first.close()
        second.settimeout(10)
        greeting = b""
        while not greeting.endswith(b"\n"):
            greeting += second.recv(4096)
        assert greeting == GREETING + b"\n"
        second.close()
        for _ in range(3):
            with Qmp(sock) as again:
                assert again.greeting_line == GREETING
                assert again.execute("query-status")[1]["return"]["status"] == "paused"


def test_id_is_echoed(probe_elf, sock):
    with start(probe_elf, sock), Qmp(sock) as qmp:
        assert qmp.execute("query-status", id=7)[1]["id"] == 7
        assert qmp.execute("query-status", id="abc")[1]["id"] == "abc"
        _, reply = qmp.execute("no-such-command", id=9)
        assert reply["id"] == 9 and reply["error"]["class"] == "CommandNotFound"


def test_qemu_qmp_clients(probe_elf, sock):
    from qemu.qmp import QMPClient
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with start(probe_elf, sock):
        async def go():
            client = QMPClient("test")
            await client.connect(str(sock))
            status = await client.execute("query-status")
            cpus = await client.execute("query-cpus")
            await client.disconnect()
            return status, cpus
        status, cpus = asyncio.run(go())
        assert status["status"] == "running" and len(cpus) == 1

        legacy = QEMUMonitorProtocol(str(sock))
        legacy.connect()
        assert legacy.cmd("query-status")["status"] == "running"
        assert legacy.cmd_raw("query-status")["return"]["status"] == "running"
        legacy.close()


def test_hostile_input_does_not_hurt_the_vm(probe_elf, sock):
    rng = random.Random(1234)
    pieces = [b"{", b"}", b"[", b"]", b'"execute"', b":", b",", b'"query-status"', b"null",
              b"\x00", b"\xff\xfe", b"\n", b'"arguments"', b"1e999", b"-1", b'"id"', b"true"]
    with start(probe_elf, sock) as vm:
        s = None
        for case in range(3000):
            if case % 500 == 0:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(sock))
                s.settimeout(10)
            kind = case % 4
            if kind == 0:
                msg = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
            elif kind == 1:
                msg = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
            elif kind == 2:
                msg = json.dumps({"execute": rng.choice(["stop", "cont", "query-cpus", "x", 5, None]),
                                  "arguments": rng.choice([{}, [], {"value": "x"}, 3])}).encode()
            else:
                msg = json.dumps([rng.random() for _ in range(3)]).encode()
            s.sendall(msg)
            if case % 500 == 499:
                s.close()
        with Qmp(sock) as qmp:
            status = qmp.execute("query-status")[1]["return"]["status"]
            if status == "paused":
                qmp.execute("cont")
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
            # Oversized message: refused, connection or not, and the VM goes on.
            try:
                qmp.send_raw(b'{"execute":"' + b"a" * 70000 + b'"}')
                qmp.read()
            except (EOFError, OSError):
                pass
        with Qmp(sock) as qmp:
            assert qmp.execute("query-status")[1]["return"]["status"] == "running"
        assert vm.command("echo alive") == ["alive"]


def test_qmp_shell(probe_elf, sock):
    import shutil
    import subprocess
    shell = shutil.which("qmp-shell")
    if shell is None:
        pytest.skip("qmp-shell (from qemu.qmp) is not on PATH")
    with start(probe_elf, sock):
        res = subprocess.run([shell, str(sock)], input="query-status\nstop\nquery-status\n",
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert '"status": "running"' in res.stdout
        assert '"status": "paused"' in res.stdout


def test_acpi_poweroff_emits_guest_shutdown(probe_elf, sock):
    with start(probe_elf, sock) as vm, Qmp(sock) as qmp:
        # The RSDP is where a guest's legacy scan finds it.
        assert vm.command("peek f0000 8") == [f"value: 0x{int.from_bytes(b'RSD PTR ', 'little'):016x}"]
        # SLEEP_CONTROL_REG (FADT): SLP_TYP = 5 (the \_S5_ value) | SLP_EN.
        vm.send("outb 600 34\n")
        event = qmp.read()
        assert (event["event"], event["data"]) == ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        assert vm.wait_exit(30) == 0
