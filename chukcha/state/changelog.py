"""Changelog records: one partition's commits as lines on the bus (pure, no I/O).

A record is one commit of one partition's store: the keys it put and deleted (state, dedup IDs,
positions, outbox, timers: the store's own keys, bytes, so that replaying the records in order
into an empty store rebuilds the store exactly). It carries the partition, the owner's
``epoch`` and a per-partition sequence number ``seq`` (1, 2, ...).

Wire format (version 2): the payload is MessagePack ``[put keys, put values, deleted keys]``
(three arrays of binary strings), base64-encoded, and cut into one or more JSON lines of at most
``max_line`` bytes each, so that no message goes over the bus's message limit::

    {"v": 2, "p": 3, "e": 9, "s": 17, "l": [5, 12], "i": 0, "n": 2, "b": "<base64 slice>"}

``"l"`` (:attr:`Record.link`) is the **epoch link**: the ``[epoch, seq]`` of the last record the
writer's epoch built on (what its store held when it took the partition: ``[0, 0]`` for an empty
one), so the first record of epoch 9 here is seq 13. Every record of the epoch carries it (not
only the first: a reader that finds the first one acked away with older chunks still knows
where the epoch began). A writer that continues its own epoch (no etcd, or the same claim after
an etcd outage) writes the link its epoch started with, or none: records of the previous release
have none, and still replay (by the rules below without links).

A **snapshot** is a record with ``"k": 1`` (:attr:`Record.base`): every key of the store as it
was right after commit ``seq`` (no deletes). A replay starts from the latest snapshot found and
applies the records after it, so records before a snapshot are no longer needed.

Encoding and decoding are a few C calls per record (msgspec, binascii), not per key.
:class:`Assembler` collects lines in any order, with duplicates (a record is resent after a
crash; a producer retry writes it twice), and yields whole records; :func:`plan_replay` is the
one reader-side filter (a restore, a view, a standby all use it): it picks what to apply, and
says when a reader's own position is not on the chain any more.

**The chain.** The records that count form one chain: going back from the newest epoch, each
epoch's records from its link up, then the linked epoch's records up to the link, and so on. A
record off that chain is ignored: a fenced-off former owner's record written after the newer
epoch's link (``seq`` past it), a record of an epoch that a newer link skipped (a paused owner
whose records the next owner never saw), or a snapshot of either. Where no link says which
epoch holds a ``seq`` (records of the previous release), the highest epoch wins and nothing of an
older epoch follows a newer one.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgspec
import orjson

__all__ = ["MAX_LINE", "Assembler", "Head", "Record", "Replay", "encode_record", "plan_replay",
           "replay_order"]

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
    link: tuple[int, int] | None = None
    """``(epoch, seq)`` of the last record this record's epoch built on (``None``: not known,
    e.g. a record of the previous release)."""

    @property
    def head(self) -> Head:
        """Where a store stands after applying this record."""
        return Head(self.epoch, self.seq, self.link)


class Head(NamedTuple):
    """Where a store stands: the ``epoch`` and ``seq`` of the last record applied to it and
    that epoch's ``link`` (``None``: not known)."""

    epoch: int
    seq: int
    link: tuple[int, int] | None = None


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
    fields: dict[str, Any] = head
    if record.link is not None:
        fields = {**head, "l": list(record.link)}
    return [orjson.dumps({**fields, "i": i, "n": len(slices), "b": b})
            for i, b in enumerate(slices)]


class Assembler:
    """Collects record lines (any order, duplicates allowed) into whole records."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int, int, bool], dict[int, str]] = {}
        self._done: dict[tuple[int, int, int, bool], Record] = {}
        self._links: dict[tuple[int, int, int, bool], tuple[int, int]] = {}
        self.bad_lines = 0
        """Lines that were not changelog records (skipped)."""

    def add(self, line: bytes) -> None:
        try:
            msg: dict[str, Any] = orjson.loads(line)
            key = (int(msg["p"]), int(msg["e"]), int(msg["s"]), msg.get("k") == 1)
            index, total, data = int(msg["i"]), int(msg["n"]), str(msg["b"])
            raw_link = msg.get("l")
            link = None if raw_link is None else (int(raw_link[0]), int(raw_link[1]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
            self.bad_lines += 1
            return
        if key in self._done or not 0 <= index < total:
            return
        got = self._parts.setdefault(key, {})
        got[index] = data
        if link is not None:
            self._links[key] = link
        if len(got) == total:
            del self._parts[key]
            link = self._links.pop(key, None)
            try:
                keys, values, deletes = _DECODER.decode(
                    binascii.a2b_base64("".join(got[i] for i in range(total))))
            except (binascii.Error, msgspec.DecodeError):
                self.bad_lines += total
                return
            self._done[key] = Record(key[0], key[1], key[2], dict(zip(keys, values, strict=True)),
                                     deletes, base=key[3], link=link)

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


@dataclass(frozen=True, slots=True)
class Replay:
    """What :func:`plan_replay` found."""

    records: list[Record]
    """The records to apply, in order (a snapshot first when the replay starts from one)."""
    diverged: bool = False
    """The reader's position is off the chain (it applied a record that a newer epoch did not
    build on): it must start again from an empty store. ``records`` is empty then."""


class _Chain:
    """The links of a set of records, walked back from the newest epoch (see
    :func:`plan_replay`)."""

    def __init__(self, records: Iterable[Record], after: Head | None) -> None:
        self.by_seq: dict[int, dict[int, Record]] = {}
        self.snapshots: list[Record] = []
        self._links: dict[int, tuple[int, int]] = {}
        top = -1
        by_seq, links = self.by_seq, self._links
        for r in records:  # the hot loop of a long replay: plain lookups only
            epoch, link = r.epoch, r.link
            top = max(top, epoch)
            if link is not None and links.get(epoch) != link:
                self._note(epoch, link)
            if r.base:
                self.snapshots.append(r)
            elif (same := by_seq.get(r.seq)) is None:
                by_seq[r.seq] = {epoch: r}
            else:
                same[epoch] = r
        if after is not None:
            self._note(after.epoch, after.link)
            top = max(top, after.epoch)
        # The chain's epochs, newest first, with the seq each one's records start after.
        self._pinned: list[tuple[int, int]] = []
        oldest = top
        while (link := self._links.get(oldest)) is not None:
            self._pinned.append((oldest, link[1]))
            oldest = link[0]
        self.oldest = oldest
        """The oldest epoch a link reaches: it and older epochs hold the seqs no link fixes."""
        self._anchor = self._pinned[-1][1] if self._pinned else -1  # ``oldest``'s, by a link

    def _note(self, epoch: int, link: tuple[int, int] | None) -> None:
        if link is not None and link[0] < epoch:
            known = self._links.get(epoch)
            if known is None or link < known:  # one link per epoch; if two disagree, one rule
                self._links[epoch] = link

    def epoch_at(self, seq: int) -> int | None:
        """The epoch that holds ``seq`` on the chain (``None``: no link says; then it is
        :attr:`oldest` or older)."""
        for epoch, start in self._pinned:
            if seq > start:
                return epoch
        return self.oldest if seq == self._anchor else None

    def holds(self, epoch: int, seq: int) -> bool:
        """Whether the record ``(epoch, seq)`` can be on the chain."""
        want = self.epoch_at(seq)
        return epoch <= self.oldest if want is None else epoch == want

    def next(self, epoch: int, seq: int) -> Record | None:
        """The record after ``(epoch, seq)`` on the chain, if it came."""
        found = self.by_seq.get(seq + 1)
        if found is None:
            return None
        want = self.epoch_at(seq + 1)
        if want is None:
            ok = [e for e in found if epoch <= e <= self.oldest]
            want = max(ok) if ok else None
        record = found.get(want) if want is not None and want >= epoch else None
        if record is None or (record.epoch != epoch and record.link is not None
                              and record.link[0] < record.epoch and record.link != (epoch, seq)):
            return None  # missing, or a new epoch that did not build on ``(epoch, seq)``
        return record


def plan_replay(records: Iterable[Record], after: Head | None = None, *,
                known: Head | None = None) -> Replay:
    """The records of one partition to apply, in order, to a store that stands at ``after``
    (``None``: an empty store); ``records``: whole records as found on the bus (any order,
    duplicates, several nodes' copies, records already applied, zombies' records).

    Only records on the chain (the module docstring) are applied: into an empty store the
    latest snapshot on it first, then one record per ``seq``, contiguous (a missing ``seq`` ends
    the replay: what follows waits for it). Where a link fixes the epoch of a ``seq``, only
    that epoch's record is taken; elsewhere the highest epoch, never lower than the last one
    applied. When ``after`` is itself off the chain, nothing is applied and ``diverged`` says
    so: the reader must rebuild from an empty store (``plan_replay(records)`` with every record
    on the bus).

    ``known`` (with ``after=None``): a position on the chain that the caller knows of (where a
    reader stood before it chose to start again from a snapshot); its epoch and link count for
    the chain like a record's, so a former owner's late snapshot past that epoch's link is not
    taken for the newest one when the newer epoch's own records are not among ``records``."""
    if after is not None and after.seq <= 0:
        after = None
    chain = _Chain(records, after if after is not None else known)
    out: list[Record] = []
    epoch, seq = 0, 0
    if after is not None:
        if not chain.holds(after.epoch, after.seq):
            return Replay([], diverged=True)
        epoch, seq = after.epoch, after.seq
    else:
        on = [r for r in chain.snapshots if chain.holds(r.epoch, r.seq)]
        if on:
            snapshot = max(on, key=lambda r: (r.seq, r.epoch))
            out.append(snapshot)
            epoch, seq = snapshot.epoch, snapshot.seq
    while (record := chain.next(epoch, seq)) is not None:
        out.append(record)
        epoch, seq = record.epoch, record.seq
    return Replay(out)


def replay_order(records: Iterable[Record], after: int = 0) -> Iterator[Record]:
    """:func:`plan_replay` for a reader that knows only its last ``seq`` (``0``: an empty
    store), not that record's epoch (kept for callers of the previous release)."""
    head = None
    if after:
        records = list(records)
        applied = [r for r in records if r.seq == after and not r.base]
        best = max(applied, key=lambda r: r.epoch, default=None)
        head = best.head if best is not None else Head(-1, after)
    yield from plan_replay(records, head).records
