"""``ozone``, StratoVirt's jailer: prepares a per-VM directory, cgroup limits and namespaces,
then starts the VMM locked into that directory as an unprivileged user.

``args`` parses the command line, ``cgroups`` sets and removes the limits, ``jailer`` builds the
jail, launches the VMM and cleans up (``-clean-resource``). See docs/security.md.
"""
