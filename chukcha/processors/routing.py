"""The repartitioning hop's hot path: which partition each line of a batch of JSON events goes
to. Pure, no I/O (:class:`chukcha.processors.repartition.Repartitioner` writes the result).

:class:`JsonRouter` gives every line exactly the partition and bytes that deciding it with a
full decode one event at a time gives (the reference, spelled out in :meth:`JsonRouter.general`):

- the key is ``key(event)`` (a string, or an integer as its decimal digits); without a key
  function, or for what the keyed stage treats as a failure (invalid JSON, a key function that
  raises or returns another type), the event's ID (its ``id`` field; an int as its digits) or,
  without one, its place ``"<category>:<chunk>:<offset>"``;
- a JSON object without an ``id`` field gets its place ID spliced in front.

It is faster only by doing less per line: the common case (a JSON object with an ``id``, a key
function returning a string) is tested inline and the partition of a repeated key is looked up
in a bounded cache instead of hashed again; offsets are computed only when a line needs its
place; anything else takes :meth:`JsonRouter.general`, the reference itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Final

import orjson

from chukcha.codecs import splice_id

__all__ = ["JsonRouter", "KeyHash"]

_CACHE_MAX: Final = 1 << 16
"""Keys whose partition :class:`KeyHash` remembers (cleared when full)."""

class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_UNSET: Final = _Marker("_UNSET")
_FAILED: Final = _Marker("_FAILED")
_ABSENT: Final = _Marker("_ABSENT")


Append = Callable[[bytes], None]
KeyFn = Callable[[Any], Any]


class KeyHash:
    """The partition of a key string (:func:`chukcha.partitioning.partition_of`), with a
    bounded cache for keys that repeat."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.cache: dict[str, int] = {}
        """Key -> partition, for keys seen since the last time it was full."""

    def partition(self, key: str) -> int:
        """``partition_of(key, partitions)`` for a ``str`` key."""
        p = self.cache.get(key)
        if p is None:
            p = self.uncached(key)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[key] = p
        return p

    def uncached(self, key: str) -> int:
        """The same without the cache (for keys that do not repeat, such as IDs)."""
        digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.partitions


class JsonRouter:
    """Routes the lines of batches of JSON events read from ``source`` by ``key_fn`` (``None``:
    the ID) into ``partitions`` partitions (see the module docstring)."""

    def __init__(self, source: str, partitions: int, key_fn: KeyFn | None) -> None:
        self.source = source
        self.hash = KeyHash(partitions)
        self._key_fn = key_fn

    def route(self, chunk: str, offset: int, data: bytes, appends: list[Append]) -> None:
        """Call ``appends[p](line)`` for each ``\\n``-terminated line of ``data`` (which starts
        at ``offset`` of ``chunk``), in order, ``p`` its partition."""
        if not data:
            return
        lines = data[:-1].split(b"\n")
        if self._key_fn is None:
            self._route_by_id(chunk, offset, lines, appends)
        else:
            self._route_by_key(chunk, offset, lines, appends, self._key_fn)

    def _route_by_id(self, chunk: str, offset: int, lines: list[bytes],
                     appends: list[Append]) -> None:
        loads, decode_error, general = orjson.loads, orjson.JSONDecodeError, self.general
        uncached = self.hash.uncached  # IDs do not repeat
        offsets: list[int] | None = None  # of each line, computed when one needs its place
        for i, line in enumerate(lines):
            try:
                event = loads(line)
            except decode_error:
                event = None
            if type(event) is dict:
                given = event.get("id")
                if type(given) is str and given:
                    appends[uncached(given)](line)
                    continue
            if offsets is None:
                offsets = list(accumulate((len(x) + 1 for x in lines), initial=offset))
            p, out = general(line, chunk, offsets[i], event)
            appends[p](out)

    def _route_by_key(self, chunk: str, offset: int, lines: list[bytes],
                      appends: list[Append], key_fn: KeyFn) -> None:
        loads, decode_error, general = orjson.loads, orjson.JSONDecodeError, self.general
        partition, cached = self.hash.partition, self.hash.cache.get
        offsets: list[int] | None = None  # of each line, computed when one needs its place
        for i, line in enumerate(lines):
            try:
                event = loads(line)
            except decode_error:
                event = None
            key: Any = _UNSET
            raw_id: Any = _UNSET
            if type(event) is dict:
                raw_id = event.get("id", _ABSENT)  # read before the key function sees it
                if raw_id is not _ABSENT:
                    try:
                        key = key_fn(event)
                    except Exception:  # noqa: BLE001 - the keyed stage's error policy decides
                        key = _FAILED
                    if type(key) is str:
                        p = cached(key)  # inline: most keys repeat
                        appends[partition(key) if p is None else p](line)
                        continue
            if offsets is None:
                offsets = list(accumulate((len(x) + 1 for x in lines), initial=offset))
            p, out = general(line, chunk, offsets[i], event, key=key, raw_id=raw_id)
            appends[p](out)

    def general(self, line: bytes, chunk: str, off: int, event: Any, *, key: Any = _UNSET,
                raw_id: Any = _UNSET) -> tuple[int, bytes]:
        """The partition and bytes of one line decoded as ``event`` (``None``: invalid JSON or
        ``null``) at ``off`` of ``chunk``; ``key``: what the key function returned for it,
        :data:`_FAILED` if it raised, :data:`_UNSET` if it was not called (it is then called
        here, when there is one); ``raw_id``: the event's ``id`` field read before the key
        function was called (:data:`_ABSENT` if it has none; :data:`_UNSET`: read it here).
        Every case, the reference for the fast paths of :meth:`route`."""
        if raw_id is _UNSET:
            raw_id = event.get("id", _ABSENT) if type(event) is dict else _ABSENT
        eid = None if raw_id is _ABSENT else raw_id
        if eid is None or eid == "":
            eid = f"{self.source}:{chunk}:{off}"
            if type(event) is dict and raw_id is _ABSENT:
                line = splice_id(line, eid)  # carry its place ID
        if self._key_fn is None or event is None:
            key = eid
        elif key is _UNSET:
            try:
                key = self._key_fn(event)
            except Exception:  # noqa: BLE001 - the keyed stage's error policy decides
                key = eid
        elif key is _FAILED:
            key = eid
        if type(key) is not str:
            key = str(key) if type(key) is int else str(eid)
        return self.hash.partition(key), line
