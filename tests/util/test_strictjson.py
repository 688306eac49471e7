"""Strict JSON (pystratovirt.util.strictjson): what both the -config file and QMP refuse."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pystratovirt.util import strictjson


def test_plain_json_decodes_as_json_does():
    text = '{"a": [1, 2.5, "x", null, true], "b": {"c": -3}}'
    assert strictjson.loads(text) == json.loads(text)


def test_a_repeated_key_is_named():
    with pytest.raises(strictjson.DuplicateKeyError) as info:
        strictjson.loads('{"execute": "stop", "x": {"k": 1, "k": 2}}')
    assert info.value.key == "k" and str(info.value) == "duplicate key 'k'"


@pytest.mark.parametrize("text, phrase", [
    ("NaN", "NaN is not a valid JSON number"),
    ('{"v": Infinity}', "Infinity is not a valid JSON number"),
    ("[-Infinity]", "-Infinity is not a valid JSON number"),
    ('{"v": 1e999}', "number 1e999 is out of range"),
    ("-1e400", "number -1e400 is out of range"),
])
def test_numbers_that_are_not_json_or_not_finite(text, phrase):
    with pytest.raises(strictjson.StrictJsonError, match=phrase):
        strictjson.loads(text)


def test_syntax_errors_keep_their_position():
    with pytest.raises(json.JSONDecodeError) as info:
        strictjson.loads('{"a": }')
    assert info.value.colno == 7


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
def test_round_trip_of_any_valid_document(value):
    assert strictjson.loads(json.dumps(value)) == value
