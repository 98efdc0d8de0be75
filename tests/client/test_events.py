"""IDs and event encoding: pure functions, no servers."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chukcha.client.events import IdSupply, encode_event, encode_events, split_bodies
from chukcha.client.ids import ID_LENGTH, IdGenerator, id_timestamp, new_id, new_ids
from chukcha.errors import MessageTooLargeError, WriteRejectedError
from chukcha.protocol import MAX_MESSAGE_SIZE, split_messages


def test_ids_are_unique_and_ordered() -> None:
    gen = IdGenerator()
    ids = [gen.next() for _ in range(2000)] + gen.ids(5000) + [gen.next()]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == ID_LENGTH for i in ids)


def test_ids_of_two_generators_differ_and_carry_their_time() -> None:
    a, b = new_ids(100), IdGenerator().ids(100)
    assert not set(a) & set(b)
    before = id_timestamp(new_id())
    assert abs(id_timestamp(a[0]) - before) < 60
    with pytest.raises(ValueError, match="not a chukcha event ID"):
        id_timestamp("nope")


def test_dicts_without_id_get_one_and_keep_their_fields() -> None:
    original = {"amount": 5}
    lines, ids = encode_events([original, {"id": "x-1", "amount": 6}, {"id": 7}])
    assert original == {"amount": 5}  # the caller's dict is not changed
    first = orjson.loads(lines[0])
    assert first == {"id": ids[0], "amount": 5}
    assert len(ids[0]) == ID_LENGTH
    assert ids[1:] == ["x-1", "7"]


def test_bytes_lines_are_sent_as_they_are() -> None:
    lines, ids = encode_events([b"plain", b'{"id":"abc","v":1}\n', bytearray(b"[1]")])
    assert lines == [b"plain", b'{"id":"abc","v":1}', b"[1]"]
    assert ids == ["", "abc", ""]


def test_bad_events_are_refused_before_anything_is_encoded() -> None:
    with pytest.raises(MessageTooLargeError):
        encode_events([b"ok", b"x" * (MAX_MESSAGE_SIZE + 1)])
    with pytest.raises(MessageTooLargeError):
        encode_event({"blob": "y" * MAX_MESSAGE_SIZE}, IdSupply())
    with pytest.raises(WriteRejectedError, match="newline"):
        encode_events([b"a\nb"])
    with pytest.raises(WriteRejectedError, match="must be a dict, a typed event"):
        encode_events([42])
    with pytest.raises(WriteRejectedError, match="newline"):
        encode_events(["two\nlines"])
    # Exactly at the limit is fine.
    lines, _ = encode_events([b"x" * MAX_MESSAGE_SIZE])
    assert len(lines[0]) == MAX_MESSAGE_SIZE


@given(st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"")), max_size=60),
       st.integers(min_value=52, max_value=400))
def test_split_bodies_round_trips_within_the_limit(lines: list[bytes], limit: int) -> None:
    bodies = split_bodies(lines, limit)
    assert all(len(b) <= limit and b.endswith(b"\n") for b in bodies)
    assert [m for b in bodies for m in split_messages(b)] == lines
