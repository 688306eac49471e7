"""Splitting the QMP byte stream into messages."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pystratovirt.qmp.framing import TOO_LONG, JsonSplitter

CMD = b'{"execute":"query-status"}'


def feed_all(splitter, *chunks):
    out = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


def test_several_messages_in_one_chunk_with_and_without_separators():
    s = JsonSplitter()
    assert s.feed(CMD + CMD + b"\n" + CMD + b"\r\n \t" + CMD) == [CMD] * 4
    assert s.pending == 0


def test_one_message_split_byte_by_byte():
    s = JsonSplitter()
    message = b'{"execute":"device_del","arguments":{"id":"a}\\"{["}}'
    out = feed_all(s, *(message[i:i + 1] for i in range(len(message))))
    assert out == [message]


def test_brackets_and_escapes_inside_strings_do_not_count():
    s = JsonSplitter()
    message = b'{"a":"}}]]{{\\\\","b":"\\"}","c":[{"d":"["}]}'
    assert s.feed(message + CMD) == [message, CMD]
    assert json.loads(message)["a"] == "}}]]{{\\"


def test_utf8_is_passed_through_untouched():
    s = JsonSplitter()
    message = '{"id":"диск-0"}'.encode()
    assert feed_all(s, message[:8], message[8:]) == [message]


def test_top_level_arrays_strings_and_scalars_are_messages_too():
    s = JsonSplitter()
    assert s.feed(b'[1,[2]] "a{b[" 42\ntrue\n') == [b"[1,[2]]", b'"a{b["', b"42", b"true"]


def test_garbage_runs_to_the_end_of_the_line_or_the_next_object():
    s = JsonSplitter()
    assert s.feed(b"hello world\n}}]] junk" + CMD) == [b"hello world", b"}}]] junk", CMD]


def test_a_token_waits_for_its_end():
    s = JsonSplitter()
    assert s.feed(b"tr") == []
    assert s.feed(b"ue\n") == [b"true"]


def test_too_long_message_reported_once_and_skipped_without_executing_nested_objects():
    s = JsonSplitter(limit=64)
    inner = b'{"execute":"quit"}'
    long_message = b'{"execute":"x","arguments":{"pad":"' + b"A" * 100 + b'","x":' + inner + b"}}"
    out = feed_all(s, *(long_message[i:i + 7] for i in range(0, len(long_message), 7)))
    assert out == [TOO_LONG]
    assert s.pending == 0
    assert s.feed(CMD) == [CMD]  # the stream is back in step


def test_limit_is_inclusive():
    s = JsonSplitter(limit=len(CMD))
    assert s.feed(CMD) == [CMD]
    s = JsonSplitter(limit=len(CMD) - 1)
    assert s.feed(CMD + CMD) == [TOO_LONG, TOO_LONG]
    assert s.feed(CMD[:-1]) == []  # exactly at the limit: still a message in progress


def test_memory_is_bounded_while_skipping():
    s = JsonSplitter(limit=100)
    assert s.feed(b"{" + b"x" * 1000) == [TOO_LONG]
    for _ in range(100):
        assert s.feed(b"y" * 1000) == []
        assert s.pending == 0


def test_ff_abandons_a_partial_message_silently():
    s = JsonSplitter()
    assert s.feed(b'{"execute":"stop", "arguments": {"a": "unterminated') == []
    assert s.feed(b"\xff" + CMD) == [CMD]
    assert s.feed(b'"abc\\') == []
    assert s.feed(b"\xff\xff" + CMD) == [CMD]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10).filter(lambda v: isinstance(v, (dict, list))), min_size=1, max_size=5),
    st.data())
def test_any_sequence_of_json_values_comes_back_whole(values, data):
    texts = [json.dumps(v, ensure_ascii=data.draw(st.booleans())).encode() for v in values]
    stream = b"".join(t + data.draw(st.sampled_from([b"", b"\n", b" ", b"\r\n"])) for t in texts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)], strict=True)]
    out = feed_all(JsonSplitter(limit=1 << 20), *chunks)
    assert [json.loads(m) for m in out] == values
