"""Changelog records: one partition's commits as lines on the bus (pure, no I/O).

A record is one commit of one partition's store: the keys it put and deleted (state, dedup IDs,
positions, outbox, timers: the store's own keys, bytes, so that replaying the records in order
into an empty store rebuilds the store exactly). It carries the partition, the owner's
``epoch`` and a per-partition sequence number ``seq`` (1, 2, ...). A record is written as one or
more JSON lines (``parts``) of at most ``max_line`` bytes each, so that no message goes over the
bus's message limit; a value too long for one line is cut into fragments across lines::

    {"v": 1, "p": 3, "e": 0, "s": 17, "i": 0, "n": 2,
     "put": [["<key b64>", "<value b64>", 0], ...], "del": ["<key b64>", ...]}

``put`` items are ``[key, value fragment, more]``: ``more = 1`` means the next item (possibly
in the next part) continues the same value. :class:`Assembler` collects lines in any order,
with duplicates (a record is resent after a crash; a producer retry writes it twice), and yields
whole records; :func:`replay_order` picks what to apply: by ``seq``, one record per ``seq``,
the highest epoch winning, and nothing of an older epoch after a newer epoch was seen (a
fenced-off former owner's late records are ignored).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = ["MAX_LINE", "Assembler", "Record", "encode_record", "replay_order"]

MAX_LINE: Final = 512 * 1024
"""Default longest line of a record (half the bus's 1 MiB message limit)."""
_OVERHEAD: Final = 160  # the envelope of one part, generously


@dataclass(frozen=True, slots=True)
class Record:
    """One commit of one partition."""

    partition: int
    epoch: int
    seq: int
    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode_record(record: Record, *, max_line: int = MAX_LINE) -> list[bytes]:
    """The record as JSON lines (no newline inside), each at most ``max_line`` bytes."""
    if max_line < 1024:
        raise ValueError("max_line must be at least 1024 bytes")
    budget = max_line - _OVERHEAD
    parts: list[tuple[list[Any], list[str]]] = [([], [])]
    used = 0

    def room(size: int) -> None:
        nonlocal used
        if used + size > budget:
            parts.append(([], []))
            used = 0
        used += size

    for key in record.deletes:
        k = _b64(key)
        if len(k) + 4 > budget:
            raise ValueError(f"a key of {len(key)} bytes does not fit in a changelog line")
        room(len(k) + 4)
        parts[-1][1].append(k)
    for key, value in record.puts.items():
        k = _b64(key)
        if len(k) + 16 > budget // 2:
            raise ValueError(f"a key of {len(key)} bytes does not fit in a changelog line")
        # Fragments of raw bytes whose base64 fits in what is left of a line (multiple of 3).
        chunk = max(3, ((budget - len(k) - 16) // 4) * 3)
        pieces = [value[i:i + chunk] for i in range(0, len(value), chunk)] or [b""]
        for n, piece in enumerate(pieces):
            v = _b64(piece)
            room(len(k) + len(v) + 16)
            parts[-1][0].append([k, v, 1 if n < len(pieces) - 1 else 0])
    total = len(parts)
    return [
        orjson.dumps({"v": 1, "p": record.partition, "e": record.epoch, "s": record.seq,
                      "i": i, "n": total, "put": puts, "del": dels})
        for i, (puts, dels) in enumerate(parts)
    ]


class Assembler:
    """Collects record lines (any order, duplicates allowed) into whole records."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int, int], dict[int, dict[str, Any]]] = {}
        self._done: dict[tuple[int, int, int], Record] = {}
        self.bad_lines = 0
        """Lines that were not changelog records (skipped)."""

    def add(self, line: bytes) -> None:
        try:
            msg = orjson.loads(line)
            key = (int(msg["p"]), int(msg["e"]), int(msg["s"]))
            index, total = int(msg["i"]), int(msg["n"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.bad_lines += 1
            return
        if key in self._done or not 0 <= index < total:
            return
        got = self._parts.setdefault(key, {})
        got[index] = msg
        if len(got) == total:
            del self._parts[key]
            self._done[key] = _assemble(key, [got[i] for i in range(total)])

    def forget(self, upto_seq: int) -> None:
        """Drop the whole records with ``seq <= upto_seq`` of every partition and epoch (they
        were applied), so that a reader that follows a changelog for long holds bounded
        memory. A late duplicate of one is assembled again and left out by the replay."""
        self._done = {k: r for k, r in self._done.items() if r.seq > upto_seq}

    def records(self) -> list[Record]:
        """The whole records collected so far."""
        return list(self._done.values())

    @property
    def incomplete(self) -> int:
        """Records of which some parts are missing."""
        return len(self._parts)


def _assemble(key: tuple[int, int, int], parts: list[dict[str, Any]]) -> Record:
    puts: dict[bytes, bytes] = {}
    deletes: list[bytes] = []
    pending: tuple[bytes, list[bytes]] | None = None
    for part in parts:
        deletes.extend(base64.b64decode(k) for k in part["del"])
        for k, v, more in part["put"]:
            if pending is None:
                pending = (base64.b64decode(k), [])
            pending[1].append(base64.b64decode(v))
            if not more:
                puts[pending[0]] = b"".join(pending[1])
                pending = None
    return Record(key[0], key[1], key[2], puts, deletes)


def replay_order(records: Iterable[Record], after: int = 0) -> Iterator[Record]:
    """The records to apply, in order, to a store that holds the commits up to ``after``: one
    per ``seq`` (the highest epoch winning), contiguous from ``after + 1`` (a missing ``seq``
    ends the replay: what follows it cannot be applied without it); a record of an epoch
    older than one already applied ends it too (a fenced-off former owner's late record)."""
    best: dict[int, Record] = {}
    for r in records:
        if r.seq > after and (r.seq not in best or r.epoch > best[r.seq].epoch):
            best[r.seq] = r
    epoch = 0
    seq = after + 1
    while (record := best.get(seq)) is not None and record.epoch >= epoch:
        epoch = record.epoch
        yield record
        seq += 1
