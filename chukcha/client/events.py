"""Turning events into write bodies: IDs, orjson encoding, limits, splitting. No I/O.

An event is a ``dict`` (encoded with orjson; one without ``"id"`` gets a new time-ordered ID
first, so that a retry sends the same bytes and the same IDs), a typed event (a
``msgspec.Struct``, dataclass, attrs class or pydantic model: encoded as JSON, and given an
``"id"`` like a dict when its own ``id`` is missing or empty), a ``str`` (one line of text, sent
as UTF-8) or a ``bytes`` line (sent as it is; one trailing ``\\n`` is allowed). A line must not
contain another ``\\n`` (it would become two messages) and must be at most 1 MiB: both are
refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

import orjson

from chukcha.client.ids import new_ids
from chukcha.codecs import encode_object, is_typed_event, splice_id
from chukcha.errors import MessageTooLargeError, WriteRejectedError
from chukcha.protocol import MAX_MESSAGE_SIZE

__all__ = [
    "Event",
    "IdSupply",
    "encode_event",
    "encode_events",
    "event_list",
    "id_of_line",
    "split_bodies",
]

Event = bytes | bytearray | memoryview | dict[str, Any] | str | Any
"""A dict, a typed event (msgspec.Struct, dataclass, attrs, pydantic), str or bytes."""
_BLOCK: Final = 512


class IdSupply:
    """Hands out IDs from blocks reserved at once (one lock per block, not per event)."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())

    def __call__(self) -> str:
        for i in self._ids:
            return i
        self._ids = iter(new_ids(_BLOCK))
        return next(self._ids)


def id_of_line(line: bytes) -> str:
    """The ``id`` of a JSON-object line, ``""`` when it has none (or is not a JSON object)."""
    if not line.startswith(b"{"):
        return ""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(obj, dict) and (eid := obj.get("id")) is not None:
        return str(eid)
    return ""


def encode_event(
    event: Event, next_id: IdSupply, max_message: int = MAX_MESSAGE_SIZE
) -> tuple[bytes, str]:
    """One event as a message (without its ``\\n``) and its ID.

    Raises:
        MessageTooLargeError: the encoded event is over ``max_message`` bytes.
        WriteRejectedError: a bytes line holds a newline inside, or the event is of another type.
    """
    if isinstance(event, dict):
        eid = event.get("id")
        if eid is None:
            eid = next_id()
            event = {"id": eid, **event}
        line = orjson.dumps(event)
        ident = eid if isinstance(eid, str) else str(eid)
    elif isinstance(event, bytes | bytearray | memoryview | str):
        line = event.encode() if isinstance(event, str) else bytes(event)
        if line.endswith(b"\n"):
            line = line[:-1]
        if b"\n" in line:
            raise WriteRejectedError("an event line contains a newline: it would be two messages")
        ident = id_of_line(line)
    elif (typed := encode_object(event)) is not None:
        ident = id_of_line(typed)
        if ident:
            line = typed
        else:  # no id, or "id": null / "": give it one, as a dict gets
            ident = next_id()
            obj = orjson.loads(typed)
            line = (orjson.dumps({**obj, "id": ident}) if "id" in obj
                    else splice_id(typed, ident))
    else:
        raise WriteRejectedError(
            "an event must be a dict, a typed event (msgspec.Struct, dataclass, attrs, "
            f"pydantic model), str or bytes; not {type(event).__name__}"
        )
    if len(line) > max_message:
        raise MessageTooLargeError(max_message)
    return line, ident


def event_list(events: Event | Iterable[Event]) -> list[Event]:
    """``events`` as a sequence; one event (a dict, str, bytes or typed event) is a sequence of
    one: iterated, it would be a dict's keys or a string's characters."""
    if isinstance(events, list):
        return events
    if isinstance(events, dict | str | bytes | bytearray | memoryview) or is_typed_event(events):
        return [events]
    return list(events)


def encode_events(
    events: Event | Iterable[Event], max_message: int = MAX_MESSAGE_SIZE
) -> tuple[list[bytes], list[str]]:
    """Encode every event (see :func:`encode_event`; one event alone is one event); nothing is
    returned if one is refused."""
    seq = event_list(events)
    supply: IdSupply | None = None
    fresh: Iterator[str] | None = None
    dumps = orjson.dumps
    lines: list[bytes] = []
    ids: list[str] = []
    add_line, add_id = lines.append, ids.append
    for event in seq:
        # Dicts are inlined: this loop is the producer's hot path (about 1 us per event).
        if type(event) is dict:
            eid = event.get("id")
            if eid is None:
                if fresh is None:
                    fresh = iter(new_ids(len(seq)))  # one reservation for the whole call
                eid = next(fresh)
                add_line(dumps({"id": eid, **event}))
            else:
                add_line(dumps(event))
                if type(eid) is not str:
                    eid = str(eid)
            add_id(eid)
            continue
        if supply is None:
            supply = IdSupply()
        line, ident = encode_event(event, supply, max_message)
        add_line(line)
        add_id(ident)
    if lines and max(map(len, lines)) > max_message:
        raise MessageTooLargeError(max_message)
    return lines, ids


def split_bodies(lines: list[bytes], max_body: int) -> list[bytes]:
    """Join messages into ``\\n``-terminated bodies of at most ``max_body`` bytes each.

    Every line must fit a body on its own (``len(line) < max_body``).
    """
    if not lines:
        return []
    total = sum(map(len, lines)) + len(lines)
    if total <= max_body:
        return [b"\n".join(lines) + b"\n"]
    bodies: list[bytes] = []
    start = 0
    size = 0
    for i, line in enumerate(lines):
        n = len(line) + 1
        if size + n > max_body and i > start:
            bodies.append(b"\n".join(lines[start:i]) + b"\n")
            start, size = i, 0
        size += n
    bodies.append(b"\n".join(lines[start:]) + b"\n")
    return bodies
