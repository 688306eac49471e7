"""The jail: directory, sources, device node, cgroups, namespaces, and the VMM launched into it.

Steps (``ozone ... -- VMM ARGS``), run as root:

1. the per-VM directory ``<base>/<exec name>/<name>`` (``<base>`` is ``/srv/ozone`` as in
   StratoVirt, or ``$OZONE_BASE_DIR``), owned by the VM's uid/gid, mode 0700; it must not exist;
2. each ``-source`` file is hard-linked into it (copied when it is on another file system;
   directories are copied); their owners do not change: the VMM opens them before it drops
   privileges;
3. ``dev/net/tun`` inside it, for NICs hot-plugged by name after the VMM's chroot (/dev/kvm is
   not needed: the VMM opens it before the chroot);
4. the cgroup limits (``-cgroup``, ``-numa``), this process moved into the cgroups so the VMM
   starts inside them;
5. ``-netns``: join that network namespace; then new mount (private propagation), IPC, UTS
   (host name ``Ozone``) and PID namespaces;
6. a child becomes PID 1 of the new PID namespace: a tiny init that forks the VMM, forwards
   SIGTERM/SIGINT/SIGHUP to everything in the namespace and reaps; the VMM runs with its
   working directory in the jail and ``-run-with chroot=<jail>,user=<uid>:<gid>[,caps=...]``
   appended, so it locks itself in once built (see ``pystratovirt/util/jail.py``).

``ozone`` itself waits for the VMM's first process and exits with its status (a ``-daemonize``d
VMM lives on under the namespace's init). ``-clean-resource`` removes the directory and the
cgroups, and nothing else.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import stat
import sys

from ..errors import PyStratoVirtError
from ..util.libc import LIBC
from . import cgroups
from .args import OzoneArgError, OzoneArgs, exec_name, parse

DEFAULT_BASE = "/srv/ozone"
BASE_ENV = "OZONE_BASE_DIR"
TUN_DEVICE = (10, 200)
HOSTNAME = b"Ozone"

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)



class OzoneError(PyStratoVirtError):
    """The jail could not be set up or removed; the message is one sentence."""


def jail_dir(args: OzoneArgs) -> str:
    base = os.environ.get(BASE_ENV) or DEFAULT_BASE
    return os.path.join(os.path.abspath(base), exec_name(args.exec_file), args.name)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OzoneError(f"Cannot {what}: {os.strerror(err)}.")


# -- preparing the directory ---------------------------------------------------------------------
def prepare_dir(args: OzoneArgs, jail: str) -> None:
    if os.path.lexists(jail):
        raise OzoneError(f"Process name for {exec_name(args.exec_file)} in path {jail} has already existed.")
    os.makedirs(os.path.dirname(jail), mode=0o755, exist_ok=True)
    os.mkdir(jail, 0o700)
    os.chown(jail, args.uid, args.gid)
    for source in args.sources:
        src = os.path.realpath(source)
        dst = os.path.join(jail, os.path.basename(src))
        if os.path.lexists(dst):
            raise OzoneError(f"Two -source files are named {os.path.basename(src)}.")
        try:
            if os.path.isdir(src):
                shutil.copytree(src, dst, symlinks=True)
            else:
                try:
                    os.link(src, dst)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    shutil.copy2(src, dst)
        except OSError as exc:
            raise OzoneError(f"Cannot put source {source} into the jail: {exc.strerror}.") from None
    dev_net = os.path.join(jail, "dev", "net")
    os.makedirs(dev_net, mode=0o755)
    try:
        os.mknod(os.path.join(dev_net, "tun"), stat.S_IFCHR | 0o666, os.makedev(*TUN_DEVICE))
        os.chmod(os.path.join(dev_net, "tun"), 0o666)  # mknod's mode is filtered by the umask
    except OSError as exc:
        print(f"ozone: cannot create dev/net/tun in the jail ({exc.strerror}): NIC hot-plug by "
              "name will not work.", file=sys.stderr)


def clean(args: OzoneArgs) -> None:
    jail = jail_dir(args)
    if os.path.isdir(jail) and not os.path.islink(jail):
        shutil.rmtree(jail)
        try:
            os.rmdir(os.path.dirname(jail))  # the per-VMM directory, once no other VM uses it
        except OSError:
            pass
    try:
        cgroups.remove(exec_name(args.exec_file), args.name)
    except cgroups.CgroupError as exc:
        raise OzoneError(str(exc)) from None


# -- namespaces ----------------------------------------------------------------------------------
def enter_namespaces(args: OzoneArgs) -> None:
    if args.netns is not None:
        try:
            fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OzoneError(f"Cannot open network namespace {args.netns}: {exc.strerror}.") from None
        try:
            _check(LIBC.setns(fd, CLONE_NEWNET), f"join network namespace {args.netns}")
        finally:
            os.close(fd)
    _check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID),
           "create the mount, IPC, UTS and PID namespaces")
    # Nothing mounted in here leaks out, and nothing mounted outside later leaks in.
    _check(LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make the mounts private")
    _check(LIBC.sethostname(HOSTNAME, len(HOSTNAME)), "set the host name")


def vmm_argv(args: OzoneArgs, jail: str) -> list[str]:
    run_with = f"chroot={jail},user={args.uid}:{args.gid}"
    if args.capabilities:
        run_with += ",caps=" + ":".join(args.capabilities)
    return [args.exec_file, *args.vmm_args, "-run-with", run_with]


def _init(argv: list[str], jail: str, report_fd: int) -> None:
    """PID 1 of the new PID namespace: start the VMM, forward signals, reap, report.

    While ozone waits, the init dies with it (PR_SET_PDEATHSIG), and with the init the kernel
    ends every process of the namespace: killing ozone never leaves a VM behind. Once the VMM's
    first process has exited and others live on (it daemonized), the init lets ozone go.
    """
    _check(LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "tie the namespace to ozone")
    pid = os.fork()
    if pid == 0:
        try:
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            os.close(report_fd)
            os.chdir(jail)
            os.execv(argv[0], argv)
        except OSError as exc:
            print(f"ozone: cannot run {argv[0]}: {exc.strerror}.", file=sys.stderr)
        os._exit(127)
    # kill(-1) from a namespace's init reaches every other process of the namespace: the VMM,
    # or the daemon it became.
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(-1, signum))
    status = None
    while True:
        try:
            child, raw = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if child == pid:
            status = os.waitstatus_to_exitcode(raw)
            LIBC.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)  # a daemonized VMM outlives ozone
            os.write(report_fd, f"{status}\n".encode())
            os.close(report_fd)
    os._exit(status if status is not None and status >= 0 else 1)


def launch(args: OzoneArgs) -> int:
    exec_file = os.path.abspath(args.exec_file)
    if not os.path.isfile(exec_file) or not os.access(exec_file, os.X_OK):
        raise OzoneError(f"The exec file {args.exec_file} is not an executable file.")
    args.exec_file = exec_file
    try:
        cgroups.check_keys(args.cgroup)
    except cgroups.CgroupError as exc:
        raise OzoneError(str(exc)) from None
    jail = jail_dir(args)
    prepare_dir(args, jail)
    limits = dict(args.cgroup)
    if args.numa is not None:
        limits["cpuset.mems"] = args.numa
    try:
        for warning in cgroups.apply(limits, exec_name(exec_file), args.name, os.getpid()):
            print(warning, file=sys.stderr)
    except cgroups.CgroupError as exc:
        raise OzoneError(str(exc)) from None
    enter_namespaces(args)
    read_fd, write_fd = os.pipe()
    init = os.fork()
    if init == 0:
        os.close(read_fd)
        try:
            _init(vmm_argv(args, jail), jail, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: os.kill(init, signum))
    report = b""
    while True:
        try:
            chunk = os.read(read_fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
        report += chunk
    os.close(read_fd)
    if report.strip():
        os.waitpid(init, os.WNOHANG)
        return _exit_code(int(report))
    _, raw = os.waitpid(init, 0)
    return _exit_code(os.waitstatus_to_exitcode(raw))


def _exit_code(status: int) -> int:
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell does


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        if os.geteuid() != 0:
            raise OzoneError("ozone must run as root (it creates namespaces, cgroups and device nodes).")
        if args.clean_resource:
            clean(args)
            return 0
        return launch(args)
    except (OzoneArgError, OzoneError) as exc:
        print(f"ozone: {exc}", file=sys.stderr)
        return 1
