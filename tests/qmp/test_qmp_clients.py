"""Stock QMP clients talk to the server unchanged: qemu.qmp's asyncio QMPClient, its legacy
synchronous QEMUMonitorProtocol, and the qmp-shell tool. The machine behind it is a fake."""

import asyncio
import subprocess
import sys

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from pystratovirt.qmp.schema import command_names


def test_asyncio_qmp_client(qmp):
    async def session():
        client = QMPClient("pystratovirt-test")
        await client.connect(qmp.path)  # awaits the greeting, then negotiates capabilities
        try:
            assert client.greeting.QMP.version["qemu"] == {"micro": 1, "minor": 0, "major": 4}
            status = await client.execute("query-status")
            assert status == {"running": True, "singlestep": False, "status": "running"}
            assert await client.execute("stop") == {}
            stop = await asyncio.wait_for(client.events.get(), 5)
            assert (stop["event"], stop["data"]) == ("STOP", {})
            assert (await client.execute("query-status"))["status"] == "paused"
            with pytest.raises(ExecuteError) as info:
                await client.execute("balloon", {"value": "lots"})
            assert info.value.error_class == "GenericError"
            assert info.value.error.error.desc == "Parameter 'value' expects an integer"
            with pytest.raises(ExecuteError) as info:
                await client.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            cpus = await client.execute("query-cpus")
            assert [c["CPU"] for c in cpus] == [0, 1]
        finally:
            await client.disconnect()
    asyncio.run(session())


def test_legacy_sync_client(qmp):
    monitor = QEMUMonitorProtocol(qmp.path)
    try:
        greeting = monitor.connect()
        assert greeting["QMP"]["capabilities"] == []
        assert monitor.cmd("query-status") == {"running": True, "singlestep": False,
                                               "status": "running"}
        # cmd_obj sends the command without an id, as hydropper-style scripts do.
        assert monitor.cmd_obj({"execute": "query-status"}) == \
            {"return": {"running": True, "singlestep": False, "status": "running"}}
        assert monitor.cmd("device_del", id="drive-0") == {}
        event = monitor.pull_event(wait=5.0)
        assert event["event"] == "DEVICE_DELETED"
        assert event["data"] == {"device": "drive-0", "path": "drive-0"}
        names = [c["name"] for c in monitor.cmd("query-commands")]  # what qmp-shell asks first
        assert names == command_names()
        assert monitor.cmd("quit") == {}
        assert monitor.pull_event(wait=5.0)["data"] == {"guest": False,
                                                       "reason": "host-qmp-quit"}
    finally:
        monitor.close()


def test_qmp_shell_tool(qmp, tmp_path):
    script = "query-status\nstop\nquery-status\nballoon value=2147483648\nquery-balloon\n"
    result = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", qmp.path],
                            input=script, capture_output=True, text=True, timeout=60,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "Connected to QEMU 4.0.1" in result.stdout
    replies = [line.removeprefix("(QEMU) ") for line in result.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies == [
        '{"return": {"running": true, "singlestep": false, "status": "running"}}',
        '{"return": {}}',
        '{"return": {"running": false, "singlestep": false, "status": "paused"}}',
        '{"return": {}}',
        '{"return": {"actual": 2147483648}}',
    ]
