"""Decoding a batch of one stream for its processor: each message through the processor's codec,
its event ID (the ``id`` field, the app's ``event_id`` function, or where it is stored) and its
key (the processor's ``key`` function, else the ID). Used by the engine and by the
repartitioning hop, which routes by the same key the keyed stage computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from chukcha.codecs import JSON
from chukcha.processors.base import App, default_event_id

__all__ = ["Decoded", "Undecodable", "decode_batch"]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Why the processor's codec could not decode an event (and the ID its line carries, if
    one could be read: a typed event that failed validation)."""

    codec: str
    reason: str
    line_id: str | None


# One event of a batch, decoded: (offset, line, event, id, key, error). ``id`` is None when the
# event could not be identified (``error`` is then :class:`Undecodable`, or the exception of
# the ID function): it is dead-lettered and gets no dedup entry. An
# ``error`` with an ``id`` is the key function's failure. ``key`` routes the event to its
# partition: the key function's value (an integer as its decimal digits, as the hash sees it),
# else the ID (the position ID when there is none).
Decoded = tuple[int, bytes, Any, "str | None", str, "Exception | Undecodable | None"]


def decode_batch(
    app: App, category: str, chunk: str, offset: int, data: bytes, *, handler: str | None = None
) -> tuple[list[Decoded], int]:
    """Decode the ``\\n``-terminated messages ``data`` (at ``offset`` of ``chunk`` of stream
    category ``category``, read for the processor of ``handler``, by default ``category``
    itself) and take each one's ID and key; returns them and the offset after the last one.
    Never raises for a bad event: failures are items that :meth:`Engine.apply` hands to the
    error policy."""
    handler_def = app.handlers[handler or category]
    key_fn, codec = handler_def.key, handler_def.codec
    user_id_fn = app.event_id
    default_id = user_id_fn is default_event_id
    fast_id = default_id and codec is JSON
    loads = orjson.loads if codec is JSON else codec.decode

    def id_fn(event: Any, line: bytes) -> str | None:
        return codec.id_of(event, line) if default_id else user_id_fn(event)

    # The ID of an event without one: where it is stored. Chunk names repeat across
    # categories, so the category is part of it (its emits' IDs must not collide).
    place = f"{category}:{chunk}:"
    items: list[Decoded] = []
    append = items.append
    pos = offset
    for line in data[:-1].split(b"\n") if data else ():
        ev_off = pos
        pos += len(line) + 1
        try:
            event = loads(line)
        except ValueError as exc:  # orjson's and the codecs' decode errors
            reason = f"invalid JSON: {exc}" if codec is JSON else str(exc)
            # Valid JSON that failed a typed codec's validation may still carry its ID.
            line_id = codec.id_of(None, line) if codec.type is not None else None
            append((ev_off, line, None, None, f"{place}{ev_off}",
                    Undecodable(codec.name, reason, line_id)))
            continue
        # The common case inline: a JSON object with a string "id" and the default ID function.
        eid = event.get("id") if fast_id and type(event) is dict else None
        if type(eid) is not str or not eid:
            try:
                raw_id = id_fn(event, line)
            except Exception as exc:  # noqa: BLE001 - a user's function; the policy decides
                append((ev_off, line, event, None, f"{place}{ev_off}", exc))
                continue
            eid = f"{place}{ev_off}" if raw_id is None or raw_id == "" else str(raw_id)
        if key_fn is None:
            append((ev_off, line, event, eid, eid, None))
            continue
        try:
            key = key_fn(event)
            if type(key) is int:
                key = str(key)
            elif type(key) is not str:
                raise TypeError(  # noqa: TRY301 - the same failure as a raising key function
                    f"the key function returned {type(key).__name__} {key!r:.100}; a key is a "
                    "string or an integer"
                )
        except Exception as exc:  # noqa: BLE001 - a user's function; the policy decides
            append((ev_off, line, event, eid, eid, exc))
            continue
        append((ev_off, line, event, eid, key, None))
    return items, pos
