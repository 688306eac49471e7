"""The argv tokenizer: unknown options, value counts, repetition, -help and -version."""

from __future__ import annotations

import pytest

from pystratovirt import __version__
from pystratovirt.config import ConfigError, parse_command_line
from pystratovirt.config.args import OPTIONS, tokenize

HINT = "Use '-h' or '-help' to get usage."


def unexpected(arg: str) -> str:
    return f"Found argument '{arg}' which wasn't expected, or isn't valid in the context. {HINT}"


def error_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_command_line(argv)
    return str(err.value)


# -uuid, -cpu and -object were v0.1.0's hidden Kata options, unknown to v0.2; they are options of
# the 2.x dialect now (tests/config/test_config_dialect2x.py).
@pytest.mark.parametrize("arg", ["--unsupport", "-kernelx", "--kernel", "-", "-omit_vm_memory", "-numa", "-fsdev",
                                 "-nographic", "-s", "-v", "-H"])
def test_unknown_option(arg):
    assert error_of([arg]) == unexpected(arg)


def test_value_before_any_option():
    assert error_of(["vmlinux.bin", "-kernel", "x"]) == unexpected("vmlinux.bin")


def test_unknown_option_beats_help():
    assert error_of(["-h", "--unsupport"]) == unexpected("--unsupport")


@pytest.mark.parametrize("argv", [["-h"], ["-help"], ["-h", "-V"], ["-V", "-help"], ["-kernel", "-h"],
                                  ["-smp", "999", "-m", "1", "-help"], ["-kernel", "a", "-kernel", "b", "-h"]])
def test_help_wins_over_everything_but_unknown_options(argv):
    inv = parse_command_line(argv)
    assert inv.action == "help" and inv.config is None
    assert inv.text.startswith(f"StratoVirt {__version__}\n")
    assert "USAGE:" in inv.text and "FLAGS:" in inv.text and "OPTIONS:" in inv.text
    assert not inv.text.endswith("\n")  # the CLI print()s it
    for opt in OPTIONS:
        assert f"-{opt.name}" in inv.text


@pytest.mark.parametrize("argv", [["-V"], ["-version"], ["-V", "-smp", "0"]])
def test_version(argv):
    inv = parse_command_line(argv)
    assert inv == type(inv)(None, "version", f"StratoVirt {__version__}")


@pytest.mark.parametrize("opt", ["name", "machine", "smp", "m", "mem-path", "config", "kernel", "initrd",
                                 "api-channel", "qmp", "serial", "pidfile", "rng", "D", "balloon", "daemonize",
                                 "disable-seccomp", "freeze"])
def test_non_repeatable_option_twice(opt):
    spec = {o.name: o for o in OPTIONS}[opt]
    value = [] if spec.kind == "flag" else ["x"]
    argv = [f"-{opt}", *value, f"-{opt}", *value]
    assert error_of(argv) == f"The argument '{opt}' was provided more than once. {HINT}"


def test_freeze_and_s_are_one_option():
    assert error_of(["-S", "-freeze"]) == f"The argument 'freeze' was provided more than once. {HINT}"
    assert error_of(["-freeze", "-S"]) == f"The argument 'S' was provided more than once. {HINT}"


@pytest.mark.parametrize("opt", ["drive", "netdev", "chardev", "device", "iothread", "append"])
def test_repeatable_options(opt):
    parsed = tokenize([f"-{opt}", "a", f"-{opt}", "b", "c"])
    assert [occ.values for occ in parsed.occurrences] == [("a",), ("b", "c")]


@pytest.mark.parametrize("opt", ["daemonize", "disable-seccomp", "S", "freeze"])
def test_flag_with_value(opt):
    assert error_of([f"-{opt}", "yes"]) == f"The value 'yes' is illegal for argument '{opt}'. {HINT}"


@pytest.mark.parametrize("opt", ["name", "machine", "smp", "m", "mem-path", "config", "kernel", "initrd",
                                 "api-channel", "qmp", "serial", "pidfile", "rng", "append", "drive", "netdev",
                                 "chardev", "device", "iothread"])
def test_missing_value(opt):
    assert error_of([f"-{opt}", "-daemonize"]) == (
        f"The argument '{opt}' requires a value, but none was supplied. {HINT}")
    assert error_of([f"-{opt}"]) == f"The argument '{opt}' requires a value, but none was supplied. {HINT}"


def test_single_value_option_with_two_values():
    assert error_of(["-kernel", "a", "b"]) == (
        f"The argument 'kernel' only needs one value, but 2 were given (a b). {HINT}")
    assert "only needs one value" in error_of(["-D", "a", "b"])


def test_optional_value_options():
    parsed = tokenize(["-D", "-balloon"])
    assert [(o.option.name, o.values) for o in parsed.occurrences] == [("D", ()), ("balloon", ())]


def test_values_keep_spaces_and_empty_strings():
    parsed = tokenize(["-append", "console=ttyS0 reboot=k", "", "panic=1"])
    assert parsed.occurrences[0].values == ("console=ttyS0 reboot=k", "", "panic=1")


def test_non_string_argument():
    assert "must be strings" in error_of(["-kernel", 3])  # type: ignore[list-item]
