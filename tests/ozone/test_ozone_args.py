"""The ozone command line (StratoVirt's options) and the cgroup key table, without launching."""

from __future__ import annotations

import pytest

from pystratovirt.ozone import cgroups
from pystratovirt.ozone.args import OzoneArgError, parse
from pystratovirt.ozone.jailer import jail_dir, vmm_argv

BASE = ["-name", "vm1", "-exec_file", "/usr/bin/stratovirt", "-uid", "100", "-gid", "101"]


def test_full_command_line():
    args = parse(BASE + ["-source", "/k/vmlinux.bin", "/k/rootfs", "-netns", "/var/run/netns/n1",
                         "-capability", "cap_net_admin,CAP_SYS_RESOURCE", "-numa", "0",
                         "-cgroup", "cpuset.cpus=0-1", "memory.limit_in_bytes=1000000",
                         "--", "-kernel", "vmlinux.bin", "-qmp", "unix:qmp.socket,server,nowait"])
    assert (args.name, args.exec_file, args.uid, args.gid) == ("vm1", "/usr/bin/stratovirt", 100, 101)
    assert args.sources == ["/k/vmlinux.bin", "/k/rootfs"] and args.netns == "/var/run/netns/n1"
    assert args.capabilities == ["CAP_NET_ADMIN", "CAP_SYS_RESOURCE"] and args.numa == "0"
    assert args.cgroup == {"cpuset.cpus": "0-1", "memory.limit_in_bytes": "1000000"}
    assert args.vmm_args == ["-kernel", "vmlinux.bin", "-qmp", "unix:qmp.socket,server,nowait"]
    assert not args.clean_resource


def test_kata_spelling_and_clean_resource():
    args = parse(["-exec-file", "/usr/bin/stratovirt", "-name", "x", "-gid", "0", "-uid", "0", "-clean-resource"])
    assert args.exec_file == "/usr/bin/stratovirt" and args.clean_resource


def test_the_vmm_is_told_to_lock_itself_in(monkeypatch, tmp_path):
    monkeypatch.setenv("OZONE_BASE_DIR", str(tmp_path))
    args = parse(BASE + ["-capability", "CAP_NET_ADMIN", "--", "-kernel", "k"])
    jail = jail_dir(args)
    assert jail == str(tmp_path / "stratovirt" / "vm1")
    assert vmm_argv(args, jail) == ["/usr/bin/stratovirt", "-kernel", "k", "-run-with",
                                    f"chroot={jail},user=100:101,caps=CAP_NET_ADMIN"]
    monkeypatch.delenv("OZONE_BASE_DIR")
    assert jail_dir(args) == "/srv/ozone/stratovirt/vm1"  # StratoVirt's place


@pytest.mark.parametrize("argv, message", [
    (["-name", "vm1"], "-exec_file is required"),
    (BASE[:6], "-gid is required"),
    (BASE + ["--"], "No VMM arguments"),
    (BASE + ["-bogus", "--", "x"], "Unexpected argument '-bogus'"),
    (BASE + ["-name", "again", "--", "x"], "-name is given more than once"),
    (["-name", "../../etc", *BASE[2:], "--", "x"], "must not contain '/'"),
    (["-name", "..", *BASE[2:], "--", "x"], "must not contain '/'"),
    (["-name", "a" * 256, *BASE[2:], "--", "x"], "length must be between 1 and 255"),
    (["-name", "v", "-exec_file", "/e", "-uid", "65536", "-gid", "0", "--", "x"], "uid should be a number"),
    (["-name", "v", "-exec_file", "/e", "-uid", "-1", "-gid", "0", "--", "x"], "-uid takes exactly one value"),
    (BASE + ["-capability", "CAP_NOPE", "--", "x"], "Invalid capability argument: CAP_NOPE"),
    (BASE + ["-cgroup", "memory", "--", "x"], "expected -cgroup KEY=VALUE"),
    (BASE + ["-cgroup", "pids.max=1", "pids.max=2", "--", "x"], "pids.max has been set more than once"),
    (BASE + ["-numa", "zero", "--", "x"], "NUMA node number"),
    (BASE + ["-clean-resource", "--", "x"], "-clean-resource takes no VMM arguments"),
])
def test_bad_command_lines_get_one_sentence(argv, message):
    with pytest.raises(OzoneArgError, match=message):
        parse(argv)


def test_unknown_cgroup_keys_are_refused():
    with pytest.raises(cgroups.CgroupError, match="Unknown cgroup argument: cpu.shares"):
        cgroups.check_keys(["cpu.shares"])


def test_a_missing_controller_degrades_with_a_sentence():
    # A host whose cgroup v2 offers only hugetlb and has no v1 memory hierarchy.
    hiers = [cgroups.Hierarchy("/nonexistent/unified", 2, frozenset({"hugetlb"}))]
    warnings = cgroups.apply({"memory.max": "1G"}, "stratovirt", "vm1", 1, hiers)
    assert warnings == ["ozone: this host has no cgroup 'memory' controller (cgroup v2 offers: hugetlb; "
                        "no v1 hierarchy for it): memory.max=1G is not applied."]


def test_this_hosts_hierarchies_are_found():
    hiers = cgroups.hierarchies()
    assert hiers, "no cgroup file system mounted"
    assert all(h.version in (1, 2) and h.mount.startswith("/") for h in hiers)
