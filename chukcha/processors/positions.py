"""A stopped app's read positions: show them, reset them, skip a poison event.

An app keeps, in every partition's store, the position (chunk, byte offset) it has committed
in each owner stream of each input category; a restart resumes each stream at the lowest
position of all partitions. With the app stopped (its state is locked while it runs, so these
refuse to touch a running app's state):

- :func:`read_positions`: the positions a restart resumes from;
- :func:`reset_positions`: move a category's streams to the earliest data the node still holds
  (a replay; with ``--retain-acked`` that includes acknowledged chunks) or to the end;
- :func:`skip_event`: have the app step over the event it stopped on (the poison-pill escape
  for ``on_error="stop"``) or one named by its position; the app records it in
  ``<category>.dead`` like any dead letter, ``error`` saying it was skipped.

Positions are written to every partition's store in one synced write per store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from chukcha.client import Client
from chukcha.processors.context import FAILURE_PREFIX, POSITION_PREFIX
from chukcha.processors.engine import skip_key
from chukcha.protocol import ChunkInfo, parse_chunk_name, validate_category
from chukcha.state.partitions import open_partition_stores

__all__ = ["Skipped", "read_positions", "reset_positions", "skip_event", "write_positions"]

Positions = dict[str, dict[str, tuple[str, int]]]  # category -> owner -> (chunk, offset)


def _key(category: str, owner: str) -> bytes:
    return POSITION_PREFIX + category.encode() + b"\x00" + owner.encode()


def _read_blocking(state_dir: Path) -> Positions:
    stores = open_partition_stores(state_dir, None)
    try:
        per_store: list[Positions] = []
        for store in stores:
            positions: Positions = {}
            for key, value in store.scan(POSITION_PREFIX):
                category, _, owner = key[len(POSITION_PREFIX):].decode().partition("\x00")
                chunk, offset = orjson.loads(value)
                positions.setdefault(category, {})[owner] = (str(chunk), int(offset))
            per_store.append(positions)
    finally:
        for store in stores:
            store.close()
    # What a restart resumes from: per stream, the lowest position of all partitions (a
    # stream some partition has no position for is read from its start).
    lowest: Positions = {}
    for category, owners in per_store[0].items():
        for owner, pos in owners.items():
            others = [p.get(category, {}).get(owner) for p in per_store[1:]]
            if all(o is not None for o in others):
                lowest.setdefault(category, {})[owner] = min([pos, *(o for o in others if o)])
    return lowest


async def read_positions(state_dir: Path) -> Positions:
    """The positions a stopped app resumes from, per category and owner stream.

    Raises:
        StateLockedError: the app is running.
        StateLayoutError: no app state there.
    """
    return await asyncio.to_thread(_read_blocking, Path(state_dir))


def _write_blocking(state_dir: Path, category: str, positions: dict[str, tuple[str, int]],
                    drop: list[str]) -> None:
    stores = open_partition_stores(state_dir, None)
    try:
        puts = {_key(category, owner): orjson.dumps([chunk, offset])
                for owner, (chunk, offset) in positions.items()}
        for store in stores:
            store.write(puts, [_key(category, owner) for owner in drop], sync=True)
    finally:
        for store in stores:
            store.close()


async def write_positions(state_dir: Path, category: str,
                          positions: dict[str, tuple[str, int]],
                          drop: list[str] | None = None) -> None:
    """Set ``category``'s positions in every partition (and forget those of ``drop``)."""
    validate_category(category)
    await asyncio.to_thread(_write_blocking, Path(state_dir), category, positions, drop or [])


def _by_owner(chunks: list[ChunkInfo]) -> dict[str, list[ChunkInfo]]:
    owners: dict[str, list[ChunkInfo]] = {}
    for c in chunks:
        owners.setdefault(c.name.rpartition("-")[0], []).append(c)
    return owners


async def reset_positions(state_dir: Path, client: Client, category: str,
                          to: Literal["earliest", "end"]) -> dict[str, tuple[str, int]]:
    """Move every stream of ``category`` to the earliest data a node holds, or to its end;
    returns the new positions."""
    chunks = await client.list_chunks(category)
    new: dict[str, tuple[str, int]] = {}
    for owner, lst in _by_owner(chunks).items():
        new[owner] = (lst[0].name, 0) if to == "earliest" else (lst[-1].name, lst[-1].size)
    current = (await read_positions(state_dir)).get(category, {})
    await write_positions(state_dir, category, new, [o for o in current if o not in new])
    return new


@dataclass(frozen=True, slots=True)
class Skipped:
    """The event :func:`skip_event` asked the app to step over."""

    category: str
    chunk: str
    offset: int
    event_id: str | None
    error: str | None


def _failure_blocking(state_dir: Path, category: str) -> dict[str, Any] | None:
    stores = open_partition_stores(state_dir, None)
    try:
        for store in stores:
            raw = store.get(FAILURE_PREFIX + category.encode())
            if raw is not None:
                found: dict[str, Any] = orjson.loads(raw)
                return found
        return None
    finally:
        for store in stores:
            store.close()


def _mark_blocking(state_dir: Path, key: bytes) -> None:
    stores = open_partition_stores(state_dir, None)
    try:
        for store in stores:
            store.write({key: b""}, (), sync=True)
    finally:
        for store in stores:
            store.close()


async def skip_event(state_dir: Path, category: str, at: tuple[str, int] | None = None,
                     stream: str | None = None) -> Skipped:
    """Ask the stopped app to step over one event of ``category`` when it next runs: the one
    it stopped on (recorded when a callback failed under ``on_error="stop"``), or the one at
    ``at`` = (chunk, offset) of ``stream`` (the category read: ``category`` unless the app
    reads a partition or a repartitioned copy of it). The app dead-letters it to
    ``<category>.dead`` (error "skipped with chukcha app skip") in the same commit as the
    events around it, so the skip is exactly once like everything else, and processes the
    events before and after it as usual.

    Raises:
        ValueError: no failure is recorded and ``at`` is not given.
    """
    validate_category(category)
    state_dir = Path(state_dir)
    failure = await asyncio.to_thread(_failure_blocking, state_dir, category)
    if at is None:
        if failure is None:
            raise ValueError(f"the app has not stopped on an event of {category} (no failure "
                             "recorded); name the event with --at CHUNK:OFFSET")
        at = (str(failure["chunk"]), int(failure["offset"]))
        stream = str(failure.get("stream") or category)
    else:
        stream = stream or category
    chunk, offset = at
    parse_chunk_name(chunk)
    if offset < 0:
        raise ValueError("the offset must not be negative")
    await asyncio.to_thread(_mark_blocking, state_dir, skip_key(stream, chunk, offset))
    same = failure is not None and (failure["chunk"], failure["offset"]) == (chunk, offset)
    return Skipped(category, chunk, offset, failure.get("id") if same and failure else None,
                   failure.get("error") if same and failure else None)
