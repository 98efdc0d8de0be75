"""Changelog records: one partition's commits as lines on the bus (pure, no I/O).

A record is one commit of one partition's store: the keys it put and deleted (state, dedup IDs,
positions, outbox, timers: the store's own keys, bytes, so that replaying the records in order
into an empty store rebuilds the store exactly). It carries the partition, the owner's
``epoch`` and a per-partition sequence number ``seq`` (1, 2, ...).

Wire format (version 2): the payload is MessagePack ``[put keys, put values, deleted keys]``
(three arrays of binary strings), base64-encoded, and cut into one or more JSON lines of at most
``max_line`` bytes each, so that no message goes over the bus's message limit::

    {"v": 2, "p": 3, "e": 0, "s": 17, "i": 0, "n": 2, "b": "<base64 slice>"}

A **snapshot** is a record with ``"k": 1`` (:attr:`Record.base`): every key of the store as it
was right after commit ``seq`` (no deletes). A replay starts from the latest snapshot found and
applies the records after it, so records before a snapshot are no longer needed.

Encoding and decoding are a few C calls per record (msgspec, binascii), not per key.
:class:`Assembler` collects lines in any order, with duplicates (a record is resent after a
crash; a producer retry writes it twice), and yields whole records; :func:`replay_order` picks
what to apply: by ``seq``, one record per ``seq``, the highest epoch winning, and nothing of an
older epoch after a newer epoch was seen (a fenced-off former owner's late records).
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import orjson

__all__ = ["MAX_LINE", "Assembler", "Record", "encode_record", "replay_order"]

MAX_LINE: Final = 512 * 1024
"""Default longest line of a record (half the bus's 1 MiB message limit)."""
_OVERHEAD: Final = 160  # the envelope of one part, generously
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(tuple[list[bytes], list[bytes], list[bytes]])


@dataclass(frozen=True, slots=True)
class Record:
    """One commit of one partition."""

    partition: int
    epoch: int
    seq: int
    puts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    base: bool = False
    """A snapshot: the whole store after commit ``seq`` (replayed into an empty store)."""


def encode_record(record: Record, *, max_line: int = MAX_LINE) -> list[bytes]:
    """The record as JSON lines (no newline inside), each at most ``max_line`` bytes."""
    if max_line < 1024:
        raise ValueError("max_line must be at least 1024 bytes")
    payload = _ENCODER.encode((list(record.puts), list(record.puts.values()),
                               list(record.deletes)))
    text = binascii.b2a_base64(payload, newline=False).decode()
    step = max_line - _OVERHEAD
    slices = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    head: dict[str, int] = {"v": 2, "p": record.partition, "e": record.epoch, "s": record.seq}
    if record.base:
        head["k"] = 1
    return [orjson.dumps({**head, "i": i, "n": len(slices), "b": b})
            for i, b in enumerate(slices)]


class Assembler:
    """Collects record lines (any order, duplicates allowed) into whole records."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int, int, bool], dict[int, str]] = {}
        self._done: dict[tuple[int, int, int, bool], Record] = {}
        self.bad_lines = 0
        """Lines that were not changelog records (skipped)."""

    def add(self, line: bytes) -> None:
        try:
            msg: dict[str, Any] = orjson.loads(line)
            key = (int(msg["p"]), int(msg["e"]), int(msg["s"]), msg.get("k") == 1)
            index, total, data = int(msg["i"]), int(msg["n"]), str(msg["b"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.bad_lines += 1
            return
        if key in self._done or not 0 <= index < total:
            return
        got = self._parts.setdefault(key, {})
        got[index] = data
        if len(got) == total:
            del self._parts[key]
            try:
                keys, values, deletes = _DECODER.decode(
                    binascii.a2b_base64("".join(got[i] for i in range(total))))
            except (binascii.Error, msgspec.DecodeError):
                self.bad_lines += total
                return
            self._done[key] = Record(key[0], key[1], key[2], dict(zip(keys, values, strict=True)),
                                     deletes, base=key[3])

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


def replay_order(records: Iterable[Record], after: int = 0) -> Iterator[Record]:
    """The records to apply, in order, to a store that holds the commits up to ``after``
    (``0``: an empty store).

    Into an empty store the replay starts with the latest snapshot (if any) and goes on with
    the records after it. Then one record per ``seq`` (the highest epoch winning), contiguous
    (a missing ``seq`` ends the replay: what follows cannot be applied without it); a record of
    an epoch older than one already applied ends it too (a fenced-off former owner's late
    record)."""
    best: dict[int, Record] = {}
    snapshot: Record | None = None
    for r in records:
        if r.base:
            if after == 0 and (snapshot is None or (r.seq, r.epoch) > (snapshot.seq,
                                                                       snapshot.epoch)):
                snapshot = r
        elif r.seq > after and (r.seq not in best or r.epoch > best[r.seq].epoch):
            best[r.seq] = r
    epoch = 0
    seq = after + 1
    if snapshot is not None:
        yield snapshot
        epoch, seq = snapshot.epoch, snapshot.seq + 1
    while (record := best.get(seq)) is not None and record.epoch >= epoch:
        epoch = record.epoch
        yield record
        seq += 1
