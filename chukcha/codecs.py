"""Codecs: how a message line becomes the event a processor sees, and an event becomes a line.

A codec is named per processor (``@app.processor("orders", codec=...)``), per emit
(``ctx.emit(category, event, codec=...)``), and inferred from the event in ``Client.send``:

- ``"json"`` (the default): a JSON value (in practice an object: a ``dict``); its ``id`` field
  is the event ID.
- ``"str"``: one line of UTF-8 text (without the newline); there is no ID field, so the ID comes
  from the app's ``event_id`` function or from where the line is stored.
- ``"bytes"``: the line's bytes as they are; IDs as for ``"str"``.
- a class: a ``msgspec.Struct``, a dataclass or an attrs class (decoded *and validated* by
  msgspec), or a pydantic model (``model_validate_json``). The event ID is the object's ``id``
  attribute, else the ``id`` field of the JSON line (which a class need not declare: the
  client's IDs work with any class).

A line that fails to decode raises :class:`EventDecodeError` with the reason; processors
dead-letter it (``<category>.dead``), count it and log a warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final

import msgspec
import orjson

__all__ = [
    "BYTES",
    "JSON",
    "STR",
    "Codec",
    "CodecSpec",
    "EventDecodeError",
    "encode_object",
    "get_codec",
    "is_typed_event",
    "splice_id",
]


class EventDecodeError(ValueError):
    """A line could not be decoded (or validated) by a codec; the message says why."""


class _IdOnly(msgspec.Struct):
    id: str | int | None = None


_ID_DECODER: Final = msgspec.json.Decoder(_IdOnly)


def _id_value(value: Any) -> str | None:
    if type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    return None


class Codec:
    """Turns lines into events and back. ``decode`` raises :class:`EventDecodeError`;
    ``encode`` returns one line without its newline; ``id_of`` returns the ID an event carries
    (``None``: it has none); ``json_object`` says whether encoded events are JSON objects (so
    an emit can carry a derived ``id``)."""

    __slots__ = ("_decode", "_encode", "_id_of", "json_object", "name", "type")

    def __init__(
        self,
        name: str,
        decode: Callable[[bytes], Any],
        encode: Callable[[Any], bytes],
        id_of: Callable[[Any, bytes], str | None],
        *,
        json_object: bool,
        type_: type | None = None,
    ) -> None:
        self.name = name
        self._decode = decode
        self._encode = encode
        self._id_of = id_of
        self.json_object = json_object
        self.type = type_

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"

    def decode(self, line: bytes) -> Any:
        try:
            return self._decode(line)
        except EventDecodeError:
            raise
        except (ValueError, TypeError) as exc:  # msgspec's and pydantic's errors are ValueErrors
            raise EventDecodeError(f"cannot decode as {self.name}: {_one_line(exc)}") from None

    def encode(self, event: Any) -> bytes:
        return self._encode(event)

    def id_of(self, event: Any, line: bytes) -> str | None:
        return self._id_of(event, line)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:1000] or type(exc).__name__


# --- the built-in codecs ------------------------------------------------------------------


def _json_id(event: Any, _line: bytes) -> str | None:
    return _id_value(event.get("id")) if type(event) is dict else None


def _no_id(_event: Any, _line: bytes) -> str | None:
    return None


def _decode_str(line: bytes) -> str:
    try:
        return line.decode()
    except UnicodeDecodeError as exc:
        raise EventDecodeError(f"cannot decode as str: not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})") from None


def _encode_str(event: Any) -> bytes:
    if not isinstance(event, str):
        raise TypeError(f"the str codec encodes str, not {type(event).__name__}")
    return event.encode()


def _encode_bytes(event: Any) -> bytes:
    if not isinstance(event, bytes | bytearray | memoryview):
        raise TypeError(f"the bytes codec encodes bytes, not {type(event).__name__}")
    return bytes(event)


def _encode_json(event: Any) -> bytes:
    typed = encode_object(event)
    return typed if typed is not None else orjson.dumps(event)


JSON: Final = Codec("json", orjson.loads, _encode_json, _json_id, json_object=True)
STR: Final = Codec("str", _decode_str, _encode_str, _no_id, json_object=False)
BYTES: Final = Codec("bytes", bytes, _encode_bytes, _no_id, json_object=False)
_NAMED: Final = {"json": JSON, "str": STR, "bytes": BYTES}

CodecSpec = str | type | Codec
"""``"json"``, ``"str"``, ``"bytes"``, a typed-event class, or a :class:`Codec`."""


def is_typed_event(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a class a typed codec handles."""
    return _kind(type(obj)) is not None


def _kind(cls: type) -> str | None:
    if issubclass(cls, msgspec.Struct):
        return "msgspec"
    if dataclasses.is_dataclass(cls) or hasattr(cls, "__attrs_attrs__"):
        return "msgspec"
    if callable(getattr(cls, "model_validate_json", None)) and callable(
        getattr(cls, "model_dump_json", None)
    ):
        return "pydantic"
    return None


def encode_object(event: Any) -> bytes | None:
    """The JSON line of a typed event (Struct, dataclass, attrs, pydantic); ``None`` for any
    other value."""
    kind = _kind(type(event))
    if kind == "msgspec":
        return msgspec.json.encode(event)
    if kind == "pydantic":
        return bytes(event.model_dump_json().encode())
    return None


def _typed_id(event: Any, line: bytes) -> str | None:
    own = _id_value(getattr(event, "id", None))
    if own is not None:
        return own
    try:  # the class need not declare "id": the line may carry one (the client's IDs)
        return _id_value(_ID_DECODER.decode(line).id)
    except msgspec.DecodeError:
        return None


def _typed_codec(cls: type) -> Codec:
    kind = _kind(cls)
    if kind == "msgspec":
        decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(cls)
        return Codec(cls.__name__, decoder.decode, msgspec.json.encode, _typed_id,
                     json_object=True, type_=cls)
    if kind == "pydantic":
        validate: Callable[[bytes], Any] = cls.model_validate_json  # type: ignore[attr-defined]

        def encode(event: Any) -> bytes:
            return bytes(event.model_dump_json().encode())

        return Codec(cls.__name__, validate, encode, _typed_id, json_object=True, type_=cls)
    raise TypeError(
        f"codec must be 'json', 'str', 'bytes', a msgspec.Struct, a dataclass, an attrs class "
        f"or a pydantic model; not {cls!r}"
    )


_TYPED_CACHE: dict[type, Codec] = {}


def get_codec(spec: CodecSpec | None) -> Codec:
    """The :class:`Codec` for ``spec`` (``None``: JSON).

    Raises:
        ValueError: an unknown codec name.
        TypeError: a class no codec handles.
    """
    if spec is None:
        return JSON
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        codec = _NAMED.get(spec)
        if codec is None:
            raise ValueError(f"unknown codec {spec!r}: use 'json', 'str', 'bytes' or a class")
        return codec
    if isinstance(spec, type):
        codec = _TYPED_CACHE.get(spec)
        if codec is None:
            codec = _TYPED_CACHE[spec] = _typed_codec(spec)
        return codec
    raise TypeError(f"codec must be a name or a class, not {type(spec).__name__}")


def splice_id(line: bytes, eid: str) -> bytes:
    """``line`` (one JSON object without an ``id``) with ``"id": eid`` put in front; the rest
    of the bytes is kept as it is."""
    rest = line.lstrip()[1:].lstrip()  # after the "{"
    comma = b"" if rest.startswith(b"}") else b","
    return b'{"id":' + orjson.dumps(eid) + comma + rest
