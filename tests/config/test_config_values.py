"""Value syntax: key=value lists, booleans, integers, memory sizes, MAC addresses."""

from __future__ import annotations

import pytest

from pystratovirt.config import ConfigError
from pystratovirt.config.values import (
    byte_len,
    check_len,
    check_mac,
    parse_bool,
    parse_fd,
    parse_kv,
    parse_mem_size,
    parse_uint,
)
from pystratovirt.memory.layout import GiB, MiB

KEYS = ("", "id", "path", "num")


def test_kv_basic():
    assert parse_kv("socket,id=c0,path=/tmp/c.sock,num=1", "chardev", KEYS) == {
        "": "socket", "id": "c0", "path": "/tmp/c.sock", "num": "1"}


def test_kv_value_keeps_later_equals_signs():
    assert parse_kv("path=/a=b", "x", KEYS) == {"path": "/a=b"}


@pytest.mark.parametrize("text, bad", [
    (",id=a", ",id=a"), ("id=a,", "id=a,"), ("id=a,=b", "=b"), ("id=", "id="), ("foo=1", "foo"),
    ("id=a,,path=b", ""),
])
def test_kv_invalid_parameter(text, bad):
    with pytest.raises(ConfigError) as err:
        parse_kv(text, "drive", ("id", "path"))
    assert str(err.value) == f"Invalid parameter '{bad}'"


def test_kv_bare_word_when_not_allowed():
    with pytest.raises(ConfigError, match=r"^Invalid parameter 'rootfs'$"):
        parse_kv("rootfs,id=a", "drive", ("id",))


def test_kv_repeated_key():
    with pytest.raises(ConfigError) as err:
        parse_kv("id=a,id=b", "drive", ("id",))
    assert str(err.value) == "Input field 'id' in drive is offered more than once."


def test_kv_two_bare_words():
    with pytest.raises(ConfigError, match="Only one value without a key is allowed in smp, but '3'"):
        parse_kv("2,3", "smp", ("", "cpus"))


def test_kv_empty_text_is_one_empty_bare_word():
    assert parse_kv("", "balloon", ("",)) == {"": ""}


@pytest.mark.parametrize("raw, value", [
    ("on", True), ("true", True), ("yes", True), ("off", False), ("false", False), ("no", False),
    ("ON", True), ("False", False),
])
def test_bool(raw, value):
    assert parse_bool(raw, "readonly") is value


@pytest.mark.parametrize("raw", ["", "1", "0", "y", "enable", "onn"])
def test_bool_invalid(raw):
    with pytest.raises(ConfigError) as err:
        parse_bool(raw, "readonly")
    assert str(err.value) == (f"Unable to parse '{raw}' for 'readonly'; expected on, off, true, false, "
                              "yes or no.")


@pytest.mark.parametrize("raw", ["", "-1", "+1", " 1", "1 ", "1_000", "0x10", "١", "1.0", "1\n"])
def test_uint_invalid(raw):
    with pytest.raises(ConfigError, match="for 'iops'; expected a non-negative integer"):
        parse_uint(raw, "iops")


def test_uint_and_fd():
    assert parse_uint("007", "x") == 7
    assert parse_fd("2147483647", "fds") == 2147483647
    with pytest.raises(ConfigError, match="below 2147483648"):
        parse_fd("2147483648", "fds")


@pytest.mark.parametrize("raw, size", [
    ("256M", 256 * MiB), ("256m", 256 * MiB), ("1G", GiB), ("1g", GiB), ("128M", 128 * MiB),
    ("512G", 512 * GiB), ("268435456", 256 * MiB), ("2524971008", 2408 * MiB), ("134217728", 128 * MiB),
])
def test_mem_size(raw, size):
    assert parse_mem_size(raw) == size


@pytest.mark.parametrize("raw", ["127M", "513G", "134217727", "0", "0M", "549755813889", "100000G"])
def test_mem_size_out_of_range(raw):
    with pytest.raises(ConfigError) as err:
        parse_mem_size(raw)
    assert str(err.value) in ("Size of memory should be less than 512G and more than 128M.",
                              f"Input value {raw} is unaligned with 1048576 for memory.")


def test_mem_size_range_text():
    with pytest.raises(ConfigError) as err:
        parse_mem_size("64M")
    assert str(err.value) == "Size of memory should be less than 512G and more than 128M."


def test_mem_size_unaligned_bytes():
    with pytest.raises(ConfigError) as err:
        parse_mem_size("268435457")
    assert str(err.value) == "Input value 268435457 is unaligned with 1048576 for memory."


@pytest.mark.parametrize("raw", ["", "256K", "1T", "256MB", "M", "-256M", "2.5G", "256 M", "1Gm", "256M\n"])
def test_mem_size_syntax(raw):
    with pytest.raises(ConfigError, match="Unable to parse memory size"):
        parse_mem_size(raw)


def test_lengths_count_utf8_bytes():
    assert byte_len("é") == 2
    assert byte_len("\udcff") == 3  # a surrogate from an undecodable argv byte does not raise
    check_len("é" * 127, "name", 255)
    with pytest.raises(ConfigError) as err:
        check_len("é" * 128, "name", 255)
    assert str(err.value) == "Input name string's length must be no more than 255."


@pytest.mark.parametrize("mac", ["12:34:56:78:9A:BC", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"])
def test_mac_ok(mac):
    check_mac(mac)


@pytest.mark.parametrize("mac", ["12:34:56:78:9A", "12:34:56:78:9A:BC:DE", "12-34-56-78-9A-BC", "12:34:56:78:9A:BG",
                                 "1:34:56:78:9A:BC0", "", "12:34:56:78:9A:BC\n"])
def test_mac_bad(mac):
    with pytest.raises(ConfigError) as err:
        check_mac(mac)
    assert str(err.value) == f"Mac address '{mac}' is illegal.".replace("\n", "\\n")


def test_error_messages_escape_control_characters():
    from pystratovirt.config import ConfigError

    assert str(ConfigError("bad 'a\nb\0c\udcff' value")) == "bad 'a\\nb\\x00c\\udcff' value"
    assert str(ConfigError("é ok")) == "é ok"
