"""Hostile input: thousands of random byte strings, JSON values, half-valid commands, truncated
and huge messages on one connection. Every answer must be a well-formed QMP line, and after each
case (a 0xFF byte resets the parser) the server must still answer query-status. The machine
behind it is a fake.

Two tests share the work: one draws structured cases from hypothesis strategies (good shrinking,
but hypothesis spends milliseconds per draw), the other has hypothesis seed a ``random.Random``
that mutates real commands cheaply, which is how the case count reaches the thousands in seconds.
"""

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystratovirt.qmp.schema import GREETING, MAX_MESSAGE, command_names
from pystratovirt.qmp.server import QmpServer

ARG_NAMES = ["id", "value", "addr", "lun", "node-name", "file", "cache", "read-only", "ifname",
             "fds", "vhost", "driver", "filename", "enable", "foo"]

# The strategies are kept shallow on purpose: deep recursive JSON costs hypothesis far more time
# to generate than the server takes to answer, and the framing's nesting is covered by the
# JSON-alphabet soup and the huge cases.
leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
          | st.text(max_size=8) | st.sampled_from(["0x1", "0xZ", "tap0", "", "raw", "file"]))
values = (leaves | st.lists(leaves, max_size=3)
          | st.dictionaries(st.sampled_from(ARG_NAMES) | st.text(max_size=4), leaves, max_size=3))


def dumps(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included: not JSON, must be refused


commands = st.fixed_dictionaries(
    {"execute": st.sampled_from(command_names() + ["foo", "exec", ""])},
    optional={"arguments": st.dictionaries(st.sampled_from(ARG_NAMES), values, max_size=4)
              | values,
              "id": leaves | st.lists(st.integers(), max_size=2),
              "extra": leaves}).map(dumps)

truncated = commands.flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i]))

# Random text over JSON's own alphabet: unbalanced brackets, stray quotes and escapes, bad numbers.
soup = st.text(alphabet='{}[]":,0123456789.eE+-truefalsnl \\\nabcé\x00', max_size=64).map(
    lambda t: t.encode())

huge = st.one_of(
    st.integers(MAX_MESSAGE - 64, 3 * MAX_MESSAGE).map(
        lambda n: b'{"execute":"quit","arguments":{"pad":"' + b"A" * n
        + b'"},"x":{"execute":"stop"}}'),
    st.integers(1000, 2 * MAX_MESSAGE).map(lambda n: b"[" * n),
    st.integers(1000, 2 * MAX_MESSAGE).map(lambda n: b"{" * n + b"}" * n),
    st.integers(MAX_MESSAGE, 2 * MAX_MESSAGE).map(lambda n: b"7" * n + b"\n"),
)

hostile = st.lists(st.one_of(st.binary(max_size=128), values.map(dumps), commands, truncated,
                             soup, st.sampled_from([b"\n", b"}", b"]", b'"', b"\\", b"\xff"]),
                             huge), max_size=4).map(b"".join)

ALLOWED_KEYS = [{"return"}, {"return", "id"}, {"error"}, {"error", "id"},
                {"event", "data", "timestamp"}]


class Session:
    """One long-lived connection to the server under test, with a probe after each case."""

    def __init__(self, path: str, open_client):
        self.path = path
        self.open_client = open_client
        self.client = open_client(path)
        assert self.client.line() == GREETING
        self.ids = itertools.count()

    def probe(self, case: bytes = b"") -> None:
        probe_id = f"probe-{next(self.ids)}"
        self.client.send(b'\xff{"execute":"query-status","id":"%s"}' % probe_id.encode())
        while True:
            line = self.client.line()
            msg = json.loads(line)
            assert isinstance(msg, dict) and set(msg) in ALLOWED_KEYS, (case[:200], line)
            if "error" in msg:
                assert list(msg["error"]) == ["class", "desc"]
            if msg.get("id") == probe_id:
                assert msg["return"]["status"] in ("running", "paused"), (case[:200], line)
                return


@pytest.fixture(scope="module")
def session(tmp_path_factory, qmp_kit):
    lt = qmp_kit.LoopThread()
    machine = qmp_kit.FakeMachine()
    server = QmpServer(lt.loop, tmp_path_factory.mktemp("fuzz") / "qmp.sock", machine)
    machine.server = server
    lt.call(server.start)
    s = Session(server.path, qmp_kit.RawClient)
    yield s
    s.client.close()
    assert lt.thread.is_alive()  # nothing stopped the loop
    lt.call(server.close)
    lt.stop()


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile)
def test_hostile_input_never_breaks_the_server(session, data):
    session.client.send(data)
    session.probe(data)


SEED_COMMANDS = [
    b'{"execute":"query-status"}',
    b'{ "execute": "query-cpus" }',
    b'{"execute": "blockdev-add", "arguments": {"node-name": "drive-0", "file": {"driver": "file",'
    b' "filename": "/path/to/block"}, "cache": {"direct": true}, "read-only": false}}',
    b'{"execute": "device_add", "arguments": {"id": "drive-0", "driver": "virtio-blk-mmio", '
    b'"addr": "0x1"}}',
    b'{"execute":"netdev_add", "arguments":{"id":"net-0", "ifname":"tap0"}}',
    b'{"execute": "device_del", "arguments": {"id": "drive-0"}, "id": 7}',
    b'{"execute": "balloon", "arguments": {"value": 2147483648}, "id": "b"}',
    b'{"execute":"stop"}{"execute":"cont"}\n{"execute":"quit"}',
]
SOUP = b'{}[]":,0123456789.eE+-truefalsnl \\\n\xff\x00\x80\xc3'


def mutate(rng, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, at = rng.randrange(3), rng.randrange(len(data) + 1)
        if op == 0 and at < len(data):
            data[at] = rng.randrange(256)
        elif op == 1:
            data[at:at] = bytes([rng.choice(SOUP)])
        elif at < len(data):
            del data[at]
    return bytes(data)


def random_case(rng) -> bytes:
    if rng.random() < 0.02:  # now and then, a message over the size limit
        pattern = rng.choice([b"{", b"[", b'{"a":"', b"7", b" "])
        return pattern * (rng.randrange(MAX_MESSAGE, 3 * MAX_MESSAGE) // len(pattern))
    kind = rng.randrange(6)
    template = rng.choice(SEED_COMMANDS)
    if kind == 0:
        return rng.randbytes(rng.randrange(200))
    if kind == 1:
        return bytes(rng.choice(SOUP) for _ in range(rng.randrange(100)))
    if kind == 2:
        return template[:rng.randrange(len(template) + 1)]
    if kind == 3:
        return mutate(rng, template)
    if kind == 4:
        other = rng.choice(SEED_COMMANDS)
        return template[:rng.randrange(len(template) + 1)] + other[rng.randrange(len(other)):]
    return template


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=True))  # a plain Random: cheap to call
def test_thousands_of_mutated_commands(session, rng):
    for _ in range(100):
        case = random_case(rng)
        session.client.send(case)
        session.probe(case)


def test_a_fresh_client_is_served_after_the_fuzzing(session):
    session.probe()
    other = session.open_client(session.path)  # queued behind the fuzzing client
    session.client.close()
    assert other.line() == GREETING
    assert json.loads(other.ask(b'{"execute":"query-status"}'))["return"]["status"] in (
        "running", "paused")
    session.client = other
