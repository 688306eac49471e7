"""The seccomp filters, in real subprocesses: a thread that installed its kind's filter can do
what that kind needs and dies of SIGSYS (the whole process) on anything else.

Each case runs a fresh interpreter: a filter cannot be removed, and pytest's own process must
stay unfiltered.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap

import pytest

from pystratovirt.machine.seccomp_policy import POLICY
from pystratovirt.util import seccomp
from pystratovirt.util.seccomp import Rule, ThreadKind

try:
    seccomp.build_filter([])
except seccomp.SeccompError as exc:  # no libseccomp on this host
    pytest.skip(str(exc), allow_module_level=True)

PRELUDE = """
import ctypes, errno, fcntl, logging, mmap, os, select, socket, sys, termios, threading
from pystratovirt.machine.seccomp_policy import POLICY
from pystratovirt.util import seccomp
from pystratovirt.util.seccomp import ThreadKind
logging.basicConfig(level=logging.INFO, format="%(threadName)s %(message)s")
log = logging.getLogger("t")
seccomp.activate(POLICY)

def in_thread(kind, body, name="worker"):
    # Workers install their filter at their start, as the VMM's threads do; the main thread
    # stays unfiltered (so the interpreter can exit), unless the case is about the main thread.
    def run():
        seccomp.install(kind)
        body()
        print("survived", flush=True)
    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
"""


def run_case(body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout)


def killed_by_sigsys(res: subprocess.CompletedProcess) -> bool:
    return res.returncode == -signal.SIGSYS


# -- forbidden calls kill the whole process ------------------------------------------------------------
FORBIDDEN = {
    # A vCPU thread opens nothing, creates no socket and issues no ioctl outside its list.
    "vcpu-open": ("VCPU", "os.open('/etc/hostname', os.O_RDONLY)"),
    "vcpu-socket": ("VCPU", "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"),
    "vcpu-ioctl": ("VCPU", "fcntl.ioctl(r, termios.FIONREAD, b'0000')"),
    # A device I/O thread: no open, no fork, no tun attach.
    "io-open": ("IO", "os.open('/etc/hostname', os.O_RDONLY)"),
    "io-fork": ("IO", "os.fork()"),
    "io-ioctl": ("IO", "fcntl.ioctl(r, 0x400454CA, bytes(40))"),  # TUNSETIFF
    # Nobody maps executable memory, changes identity or starts programs once filtered.
    "vcpu-exec-mmap": ("VCPU", "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)"),
    "io-setuid": ("IO", "os.setuid(0)"),
    "io-execve": ("IO", "os.execv('/bin/true', ['true'])"),
}


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_a_forbidden_call_kills_the_process_with_sigsys(case):
    kind, call = FORBIDDEN[case]
    res = run_case(f"""
        r, w = os.pipe()
        def body():
            {call}
        in_thread(ThreadKind.{kind}, body)
        print("the process lived on", flush=True)
    """)
    assert killed_by_sigsys(res), (res.returncode, res.stdout, res.stderr)
    assert "survived" not in res.stdout and "lived on" not in res.stdout


def test_the_control_loop_cannot_fork_or_exec():
    for call in ("os.fork()", "os.execv('/bin/true', ['true'])", "os.setuid(0)", "os.chroot('/')"):
        res = run_case(f"""
            seccomp.install(ThreadKind.CONTROL)
            {call}
            print("the process lived on", flush=True)
        """)
        assert killed_by_sigsys(res), (call, res.returncode, res.stderr)


# -- allowed calls work ----------------------------------------------------------------------------
def test_a_vcpu_thread_does_what_exit_handling_needs():
    res = run_case("""
        r, w = os.pipe2(os.O_NONBLOCK)
        efd = os.eventfd(0)
        def body():
            os.write(w, b"serial output")              # the UART's output
            os.eventfd_write(efd, 1)                    # an interrupt or a queue kick
            lock = threading.Lock(); lock.acquire(); lock.release()
            threading.get_native_id(); os.getpid()
            big = bytearray(64 << 20); del big          # the interpreter allocates and frees
            m = mmap.mmap(-1, 1 << 20); m[0] = 1; m.close()
            try:  # a failure deep in the VMM's own code, logged with its traceback
                seccomp.build_filter([seccomp.Rule("no_such_call")])
            except seccomp.SeccompError:
                log.exception("formatted without opening a file")  # linecache is guarded
            import warnings
            warnings.warn("a warning looks up its source line too")
        in_thread(ThreadKind.VCPU, body, "vcpu0")
        assert os.read(r, 100) == b"serial output" and os.eventfd_read(efd) == 1
        # The main thread (unfiltered, like the control loop) still gets source lines.
        try:
            seccomp.build_filter([seccomp.Rule("no_such_call")])
        except seccomp.SeccompError:
            log.exception("main thread")
        print("done", flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert "survived" in res.stdout and "done" in res.stdout
    vcpu_part, main_part = res.stderr.split("main thread")
    # The vCPU thread's traceback names file, line and function, without the source text.
    assert re.search(r'File ".*seccomp.py", line \d+, in build_filter\n(?!\s+raise)', vcpu_part), vcpu_part
    assert "a warning looks up its source line too" in vcpu_part
    assert "raise SeccompError(" in main_part


def test_a_traceback_from_an_uncached_file_costs_its_source_lines_not_the_process(tmp_path):
    """A filtered thread's traceback through a file linecache has not read (only a -run-with jail
    caches sources) shows the frame without its line instead of dying of SIGSYS on linecache's
    stat() and open()."""
    helper = tmp_path / "failing_helper.py"
    helper.write_text("def fail():\n    raise ValueError('deep down')\n")
    res = run_case(f"""
        import linecache, runpy
        fail = runpy.run_path({str(helper)!r})["fail"]
        linecache.clearcache()
        def body():
            try:
                fail()
            except ValueError:
                log.exception("formatted without source lines")
        in_thread(ThreadKind.VCPU, body, "vcpu0")
        print("done", flush=True)
    """)
    assert res.returncode == 0, res.stderr
    assert "survived" in res.stdout and "done" in res.stdout
    assert 'failing_helper.py", line 2, in fail' in res.stderr and "raise ValueError" not in res.stderr


def test_an_io_thread_does_disk_and_epoll_work(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(8192))
    res = run_case(f"""
        fd = os.open({str(img)!r}, os.O_RDWR)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        ep = select.epoll(); ep.register(efd, select.EPOLLIN)
        def body():
            os.eventfd_write(efd, 1)
            assert ep.poll(1) and os.eventfd_read(efd) == 1
            os.pwritev(fd, [b"x" * 512], 512)
            buf = bytearray(512); os.preadv(fd, [buf], 512); assert buf == b"x" * 512
            os.fdatasync(fd)
            m = mmap.mmap(-1, 1 << 20); m[:] = b"y" * (1 << 20)
            m.madvise(mmap.MADV_DONTNEED)              # the balloon's way of returning pages
            m.close()
        in_thread(ThreadKind.IO, body, "virtio-blk0")
    """)
    assert res.returncode == 0, res.stderr
    assert "survived" in res.stdout
    assert img.read_bytes()[512:1024] == b"x" * 512


def test_the_control_loop_runs_and_exits_cleanly_under_its_filter(tmp_path):
    sock_path = tmp_path / "s"
    res = run_case(f"""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind({str(sock_path)!r}); srv.listen()
        cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); cli.connect({str(sock_path)!r})
        r, w = os.pipe()
        seccomp.install(ThreadKind.CONTROL)
        conn, _ = srv.accept()
        cli.sendall(b'{{"execute":"qmp_capabilities"}}')
        assert conn.recv(100).startswith(b'{{"execute"')
        # Descriptor passing (SCM_RIGHTS) works both ways.
        socket.send_fds(cli, [b"fd"], [w])
        msg, fds, _, _ = socket.recv_fds(conn, 10, 1)
        os.write(fds[0], b"via passed fd"); assert os.read(r, 100) == b"via passed fd"
        os.close(fds[0])
        # Hot-plug: open a disk image and stat it; the socket file goes at shutdown.
        fd = os.open({str(tmp_path)!r} + "/img", os.O_RDWR | os.O_CREAT, 0o600); os.fstat(fd); os.close(fd)
        os.unlink({str(sock_path)!r})
        print("control ok", flush=True)
        sys.exit(0)  # the interpreter's normal finalization runs under the filter
    """)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert "control ok" in res.stdout


def test_filters_are_per_thread_and_the_process_reports_them():
    res = run_case("""
        ready, go = threading.Event(), threading.Event()
        tid = []
        def worker():
            seccomp.install(ThreadKind.IO)
            tid.append(threading.get_native_id()); ready.set(); go.wait()
        t = threading.Thread(target=worker, name="virtio-x"); t.start(); ready.wait()
        print(seccomp.filter_mode(os.getpid()), seccomp.filter_mode(os.getpid(), tid[0]))
        print(open(f"/proc/{os.getpid()}/task/{tid[0]}/comm").read().strip())
        go.set(); t.join()
    """)
    assert res.returncode == 0, res.stderr
    modes, comm = res.stdout.split("\n")[:2]
    assert modes == "0 2"  # the main thread is unfiltered, the worker filtered
    assert comm == "virtio-x"


def test_without_a_policy_install_only_names_the_thread():
    res = run_case("""
        seccomp.deactivate()
        def body():
            os.close(os.open('/etc/hostname', os.O_RDONLY))
            print(seccomp.filter_mode("self", threading.get_native_id()), flush=True)
        in_thread(ThreadKind.VCPU, body, "vcpu7")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "survived"]


# -- the policy itself --------------------------------------------------------------------------
def test_every_rule_resolves_and_the_filters_build():
    for kind in ThreadKind:
        seccomp.build_filter(POLICY[kind])


def test_an_unknown_system_call_is_a_clear_error():
    with pytest.raises(seccomp.SeccompError, match="unknown system call: no_such_call"):
        seccomp.build_filter([Rule("no_such_call")])
    with pytest.raises(seccomp.SeccompError, match="no allow-list for vcpu"):
        seccomp.activate({ThreadKind.IO: [], ThreadKind.CONTROL: []})
    assert not seccomp.active()


def test_allow_lists_stay_small_and_never_allow_dangerous_calls():
    sizes = {kind: len(seccomp.syscall_names(POLICY[kind])) for kind in ThreadKind}
    # The control thread's list is the longest: snapshots too.
    assert sizes[ThreadKind.VCPU] < sizes[ThreadKind.IO] < sizes[ThreadKind.CONTROL] <= 50, sizes
    dangerous = {"execve", "execveat", "fork", "vfork", "clone", "clone3", "ptrace", "setuid",
                 "setresuid", "setgid", "chroot", "mount", "umount2", "pivot_root", "init_module",
                 "finit_module", "kexec_load", "bpf", "perf_event_open", "process_vm_writev",
                 "unshare", "setns", "seccomp", "prctl", "capset", "mknodat", "symlinkat", "linkat"}
    for kind in ThreadKind:
        assert not seccomp.syscall_names(POLICY[kind]) & dangerous, kind
    # ioctl is always filtered by request number, mmap/mprotect never executable.
    for kind in ThreadKind:
        for rule in POLICY[kind]:
            if rule.syscall in ("ioctl", "mmap", "mprotect"):
                assert rule.args, (kind, rule)
    # Neither a vCPU nor a device thread opens anything; a device thread may accept on the one
    # socket it was given (a virtio console's socket chardev, bound before the filter came).
    openers = {"open", "openat", "openat2", "socket", "socketpair", "connect", "bind", "listen"}
    assert not seccomp.syscall_names(POLICY[ThreadKind.VCPU]) & (openers | {"accept4"})
    assert not seccomp.syscall_names(POLICY[ThreadKind.IO]) & openers
