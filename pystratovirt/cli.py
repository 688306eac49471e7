"""The ``stratovirt`` command: parse the configuration, daemonize if asked, build and run the VM.

Every failure a user can cause (bad options, missing files, no KVM, a socket path in use, a
kernel that cannot be loaded) ends with one sentence on stderr and exit code 1, never a
traceback. A VM that shuts down (QMP ``quit``, guest power-off or reboot, SIGTERM, SIGINT or
SIGHUP: a SHUTDOWN event with reason ``host-signal``) ends with exit code 0; a fatal guest or
VMM error with exit code 1. SIGHUP is a shutdown request like SIGTERM (the terminal or the
session that started the VMM went away), so the QMP socket and the pidfile are still removed.

Descriptors >= 3 the process inherited (Kata passes taps and vhost handles as 3, 4, ...) are
claimed by :func:`~.machine.fds.claim_inherited` before anything else is opened, so the
machine's descriptor store owns exactly those.

Logging, in StratoVirt's line format (:mod:`pystratovirt.util.logformat`) in both dialects:
without ``-D`` warnings and errors go to stderr; ``-D`` alone logs at info level to stderr (as
StratoVirt 2.3); ``-D FILE`` logs at info level to FILE (appended). ``STRATOVIRT_LOG_LEVEL``
(trace, debug, info, warn, error) overrides the level, as in StratoVirt.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TextIO

from .config import parse_command_line
from .errors import PyStratoVirtError
from .machine.fds import claim_inherited
from .machine.microvm import MicroVm
from .machine.requests import ShutdownReason
from .machine.seccomp_policy import POLICY as SECCOMP_POLICY
from .machine.vmconfig import VmConfig
from .qmp.server import QmpServer
from .qmp.wire import wire_of
from .util import seccomp
from .util.eventloop import EventLoop
from .util.logformat import StratoVirtFormatter, install_ns_clock

log = logging.getLogger("pystratovirt")

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
           "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def _setup_logging(log_file: str | None) -> None:
    env = os.environ.get("STRATOVIRT_LOG_LEVEL", "").strip().lower()
    if log_file:
        try:
            handler: logging.FileHandler | logging.StreamHandler[TextIO] = logging.FileHandler(log_file)
        except OSError as exc:
            raise PyStratoVirtError(f"Failed to open log file {log_file}: {exc.strerror or exc}.") from None
        level = logging.INFO
    else:
        handler = logging.StreamHandler(sys.stderr)
        level = logging.INFO if log_file == "" else logging.WARNING
        if sys.stderr.isatty():
            handler.terminator = "\r\n"  # the terminal may be in raw mode for -serial stdio
    level = _LEVELS.get(env, level)
    install_ns_clock()
    handler.setFormatter(StratoVirtFormatter(line_end=handler.terminator))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _daemonize() -> int:
    """Double-fork; returns the write end of a pipe the daemon reports readiness on.

    The original process waits on the pipe and exits 0 once the VM runs, or prints the daemon's
    error and exits 1, so ``stratovirt -daemonize`` still fails visibly on a bad configuration.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        message = b"".join(chunks).decode(errors="replace")
        os.waitpid(pid, 0)
        if message.startswith("ok"):
            os._exit(0)
        sys.stderr.write(message or "stratovirt: the daemon exited before the VM started.\n")
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_fd


def _write_pidfile(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PyStratoVirtError("Pidfile path is existed yet.") from None
    except OSError as exc:
        raise PyStratoVirtError(f"Cannot write pidfile {path}: {exc.strerror}.") from exc
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _enter_jail(config: VmConfig, qmp: QmpServer | None, pidfile: str | None) -> str | None:
    """chroot and drop privileges (``-run-with``); returns where the pidfile is seen from inside
    (None: outside the jail, so it stays behind). The QMP socket file is re-pointed the same
    way, so both are still removed at exit."""
    from .util import jail  # only a -run-with VMM needs it

    run_with = config.run_with
    assert run_with is not None  # run_vm checked
    root = os.path.realpath(run_with.chroot) if run_with.chroot else None
    jail.enter(run_with.chroot, run_with.uid, run_with.gid, run_with.keep_caps)
    log.info("running in %s as uid %s gid %s, capabilities kept: %s", root or "/", run_with.uid,
             run_with.gid, ", ".join(run_with.keep_caps) or "none")
    if root is None:
        return pidfile
    if qmp is not None:
        qmp.moved(jail.inside(root, qmp.path) or qmp.path)
    return jail.inside(root, pidfile)


def run_vm(config: VmConfig, on_ready: Callable[[], None] | None = None) -> int:
    """Build and run one VM; ``on_ready()`` is called once its vCPUs have started."""
    loop = EventLoop()
    console = None
    if config.serial is not None and config.serial.stdio:
        from .machine.console import StdioConsole
        console = StdioConsole(loop, on_escape=lambda: machine.shutdown(ShutdownReason.HOST_UI, guest=False))
    machine = MicroVm(config, loop, serial_sink=console.write if console else None)
    qmp = None
    pidfile_written = False
    pidfile_path = os.path.abspath(config.pidfile) if config.pidfile else None
    try:
        try:
            if pidfile_path:
                _write_pidfile(pidfile_path)
                pidfile_written = True
            machine.build()
            if config.qmp_socket:
                qmp = QmpServer(loop, config.qmp_socket, machine, wire=wire_of(config.dialect))
                qmp.start()
                machine.events = qmp
        except OSError as exc:
            raise PyStratoVirtError(f"Failed to create the VM: {exc.strerror or exc}.") from exc
        if console is not None:
            assert machine.serial is not None  # built
            console.attach(machine.serial)
            machine.add_shutdown_hook(console.close)
        if qmp is not None:
            machine.add_shutdown_hook(qmp.close)
        if not config.disable_seccomp:
            seccomp.activate(SECCOMP_POLICY)  # each thread machine.start() makes installs its filter
        if config.run_with is not None:  # everything is open: lock the process in before any thread starts
            pidfile_path = _enter_jail(config, qmp, pidfile_path)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: machine.host_signal())
        loop.wake_on_signals()
        machine.start()
        if on_ready is not None:
            on_ready()
        try:
            seccomp.install(seccomp.ThreadKind.CONTROL)  # last: every other thread exists by now
        except seccomp.SeccompError as exc:
            machine.fatal_error(str(exc))
        code = machine.run()
        if machine.shutdown_reason is not None:
            log.info("exiting with code %d after %s", code, machine.shutdown_reason.value)
        return code
    finally:
        if console is not None:
            console.close()
        if qmp is not None:
            qmp.close()
        if pidfile_written:
            _remove(pidfile_path)


def main(argv: list[str] | None = None) -> int:
    claim_inherited()  # first: everything >= 3 open now was passed by our parent
    argv = sys.argv[1:] if argv is None else argv
    try:
        invocation = parse_command_line(argv)
    except PyStratoVirtError as exc:
        print(f"stratovirt: {exc.desc}", file=sys.stderr)
        return 1
    if invocation.action != "run":
        print(invocation.text)
        return 0
    config = invocation.config
    assert config is not None  # the "run" action carries one
    ready_fd = _daemonize() if config.daemonize else None

    def report_ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
            ready_fd = None

    logging_ready = False
    try:
        _setup_logging(config.log_file)
        logging_ready = True
        return run_vm(config, report_ready)
    except PyStratoVirtError as exc:
        message = f"stratovirt: {exc.desc}"
        if config.log_file and logging_ready:  # stderr gets the sentence below; a log file should have it too
            log.error("%s", exc.desc)
        print(message, file=sys.stderr)
        if ready_fd is not None:
            try:
                os.write(ready_fd, (message + "\n").encode())
            except OSError:
                pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
