"""Property: the repartition hop's fast routing (:class:`JsonRouter`) gives every line exactly
the partition and bytes that a full decode of each event, one at a time, gives (the hop's
routing as first released, kept here as the oracle), for any mix of events: with and without
IDs (strings, ints, empty, null, other types), keys of every type, key functions that raise or
return other types or touch the event, invalid JSON, JSON that is not an object, repeated keys
(the cache). For well-formed events the partition is the keyed stage's (:func:`decode_batch`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha import App, Context
from chukcha.codecs import splice_id
from chukcha.partitioning import partition_of
from chukcha.processors import routing
from chukcha.processors.decoding import decode_batch
from chukcha.processors.routing import JsonRouter, KeyHash

SOURCE = "orders"


def oracle(source: str, partitions: int, key_fn: Callable[[Any], Any] | None, *, chunk: str,
           offset: int, data: bytes) -> list[list[bytes]]:
    """The hop's routing as first released: decode every event, then decide (verbatim)."""
    parts: list[list[bytes]] = [[] for _ in range(partitions)]
    pos = offset
    for line in data[:-1].split(b"\n") if data else ():
        off = pos
        pos += len(line) + 1
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            event = None
        eid = event.get("id") if type(event) is dict else None
        if eid is None or eid == "":
            eid = f"{source}:{chunk}:{off}"
            if type(event) is dict and "id" not in event:
                line = splice_id(line, eid)  # noqa: PLW2901
        key: Any = eid
        if key_fn is not None and event is not None:
            try:
                key = key_fn(event)
            except Exception:  # noqa: BLE001
                key = eid
        if type(key) is not str:
            key = str(key) if type(key) is int else str(eid)
        p = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(),
                           "big") % partitions
        parts[p].append(line)
    return parts


def fast(router: JsonRouter, partitions: int, chunk: str, offset: int,
         data: bytes) -> list[list[bytes]]:
    parts: list[list[bytes]] = [[] for _ in range(partitions)]
    router.route(chunk, offset, data, [lines.append for lines in parts])
    return parts


def by_field(event: Any) -> Any:
    return event["k"]


def popping(event: Any) -> Any:
    """A key function that changes the event (removes its ID) before answering."""
    event.pop("id", None)
    return event["k"]


def int_or_str(event: Any) -> Any:
    return event["n"] if "n" in event else event["k"]


KEY_FNS: dict[str, Callable[[Any], Any] | None] = {
    "id": None, "field": by_field, "popping": popping, "int_or_str": int_or_str,
    "constant": lambda _e: "same", "bool": lambda _e: True,
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(-1e3, 1e3), st.sampled_from(["", "a", "b", "k1", "k2", "é", "x\\y"]),
                    st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=3),
                                                                      inner, max_size=3)),
                      max_leaves=6)
objects = st.fixed_dictionaries(
    {}, optional={"id": st.one_of(st.sampled_from(["ev-1", "ev-2", "", "ev-1"]), values),
                  "k": st.one_of(st.sampled_from(["a", "b", "c"]), values),
                  "n": st.one_of(st.integers(-3, 3), values),
                  "pad": st.text(max_size=8)})


@st.composite
def lines_st(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["object", "object", "object", "other", "invalid", "spaced"]))
    if kind == "object":
        return orjson.dumps(draw(objects))
    if kind == "spaced":  # another formatting of an object: what a Go client or curl may send
        return b"  " + orjson.dumps(draw(objects), option=orjson.OPT_INDENT_2).replace(
            b"\n", b" ") + b" "
    if kind == "other":
        return orjson.dumps(draw(values))
    return draw(st.sampled_from([b"", b"{", b"{\"id\":\"x\",", b"not json", b"\"open",
                                 b"{\"k\":\"a\"} {}", b"\xff\xfe", b"[1,",
                                 b"{\"id\":\"y\",\"k\":123456789012345678901234567890}"]))


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(lines_st(), max_size=30), key=st.sampled_from(sorted(KEY_FNS)),
       partitions=st.sampled_from([1, 2, 3, 8, 1024]), offset=st.integers(0, 10**9),
       chunk=st.sampled_from(["moscow-000000001", "c2"]))
def test_fast_routing_is_the_full_decodes(lines: list[bytes], key: str, partitions: int,
                                          offset: int, chunk: str) -> None:
    data = b"".join(line + b"\n" for line in lines)
    key_fn = KEY_FNS[key]
    router = JsonRouter(SOURCE, partitions, key_fn)
    # Twice through the same router: the second time every key is in the cache.
    for _ in range(2):
        assert fast(router, partitions, chunk, offset, data) == \
            oracle(SOURCE, partitions, key_fn, chunk=chunk, offset=offset, data=data)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.text(), max_size=40), partitions=st.integers(1, 1024))
def test_the_cached_hash_is_partition_of(keys: list[str], partitions: int) -> None:
    saved = routing._CACHE_MAX
    routing._CACHE_MAX = 8  # type: ignore[misc]  # the cache is cleared while in use
    try:
        h = KeyHash(partitions)
        for k in keys + keys:
            assert h.partition(k) == h.uncached(k) == partition_of(k, partitions)
            assert len(h.cache) <= 8
    finally:
        routing._CACHE_MAX = saved  # type: ignore[misc]


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=8), "k": st.one_of(st.text(max_size=8),
                                                          st.integers(-10**6, 10**6))}),
    max_size=20), partitions=st.sampled_from([2, 8, 1024]))
def test_well_formed_events_go_where_the_keyed_stage_keys_them(
        events: list[dict[str, Any]], partitions: int) -> None:
    app = App("billing", nodes=["http://127.0.0.1:1"], partitions=partitions)

    @app.processor(SOURCE, key=by_field)
    def on_order(ctx: Context, event: dict[str, Any]) -> None:
        raise NotImplementedError

    data = b"".join(orjson.dumps(e) + b"\n" for e in events)
    parts = fast(JsonRouter(SOURCE, partitions, by_field), partitions, "c1", 0, data)
    items, _ = decode_batch(app, SOURCE, "c1", 0, data)
    expected: list[list[bytes]] = [[] for _ in range(partitions)]
    for _off, line, _event, _eid, k, error in items:
        assert error is None
        expected[partition_of(k, partitions)].append(line)
    assert parts == expected
