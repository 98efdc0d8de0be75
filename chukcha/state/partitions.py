"""The layout of an app's state directory: one store per partition.

::

    <state_dir>/PARTITIONS     {"partitions": 8, "hash": "blake2b-64"}  (written once)
    <state_dir>/p0000/ ...     one LevelDB per partition (state, dedup, positions, outbox)

A partition's directory can be copied, dropped or moved on its own. A state directory written
before partitions existed (one LevelDB at its root, no ``PARTITIONS``) opens as one partition,
in place, without conversion; asking for more partitions on it, or another count on any
existing state, is refused (:class:`~chukcha.errors.StateLayoutError`) before anything is
written.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from chukcha.errors import StateLayoutError
from chukcha.partitioning import HASH_NAME, check_partitions, partition_dir_name
from chukcha.state.leveldb import LevelDBStore

__all__ = ["PARTITIONS_FILE", "StateLayout", "open_partition_stores", "read_layout"]

logger = logging.getLogger(__name__)

PARTITIONS_FILE: Final = "PARTITIONS"
_LEGACY_MARKER: Final = "CURRENT"  # LevelDB's own file: a store at the root


@dataclass(frozen=True, slots=True)
class StateLayout:
    """What a state directory holds: ``partitions`` stores; ``legacy``: the one store is the
    directory itself (written before partitions existed)."""

    partitions: int
    legacy: bool = False

    def store_path(self, state_dir: Path, index: int) -> Path:
        return state_dir if self.legacy else state_dir / partition_dir_name(index)


def _advice(app_partitions: int, found: int) -> str:
    return (
        f"the state directory holds {found} partition(s) and the app asks for "
        f"{app_partitions}. The partition count of an existing state cannot change (each key's "
        f"state lives in the partition its hash picked). Run the app with partitions="
        f"{found}, or give it a new state directory and let it process its input again "
        "(only input not yet acknowledged for the group is still on the bus)"
    )


def read_layout(state_dir: Path) -> StateLayout | None:
    """The layout of ``state_dir`` (``None``: no state there yet).

    Raises:
        StateLayoutError: an unreadable ``PARTITIONS`` file, or one naming another hash.
    """
    marker = state_dir / PARTITIONS_FILE
    try:
        raw = marker.read_bytes()
    except FileNotFoundError:
        if (state_dir / _LEGACY_MARKER).exists():
            return StateLayout(1, legacy=True)
        return None
    try:
        record = json.loads(raw)
        partitions = check_partitions(record["partitions"])
        hash_name = record["hash"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateLayoutError(f"{marker} is not a valid partitions record: {exc}") from None
    if hash_name != HASH_NAME:
        raise StateLayoutError(
            f"{marker} says the keys were hashed with {hash_name!r}; this version uses "
            f"{HASH_NAME!r}"
        )
    return StateLayout(partitions)


def _write_marker(state_dir: Path, partitions: int) -> None:
    """Record the partition count once, atomically and durably (temp, fsync, rename)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{PARTITIONS_FILE}.tmp"
    data = json.dumps({"partitions": partitions, "hash": HASH_NAME}).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(state_dir / PARTITIONS_FILE)
    dfd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def open_partition_stores(
    state_dir: Path, partitions: int | None, *, write_buffer_size: int = 16 << 20
) -> list[LevelDBStore]:
    """Open (creating a new state directory when there is none) the ``partitions`` stores of
    ``state_dir``, in partition order (blocking). ``partitions=None``: as many as the
    directory holds (to read a stopped app's state; refused where there is no state).

    Raises:
        StateLayoutError: the directory holds another partition count (nothing is changed).
        StateLockedError: another process has the state open.
    """
    state_dir = Path(state_dir)
    layout = read_layout(state_dir)
    if partitions is None:
        if layout is None:
            raise StateLayoutError(f"{state_dir} holds no app state")
        partitions = layout.partitions
    check_partitions(partitions)
    if layout is None:
        if state_dir.exists() and any(
            p.name != f".{PARTITIONS_FILE}.tmp" for p in state_dir.iterdir()
        ):
            raise StateLayoutError(
                f"{state_dir} is not empty and holds no app state (no {PARTITIONS_FILE} file, "
                "no LevelDB): give the app an empty or new state directory"
            )
        _write_marker(state_dir, partitions)
        layout = StateLayout(partitions)
        logger.info("state created path=%s partitions=%d", state_dir, partitions)
    elif layout.partitions != partitions:
        legacy = (" (one LevelDB at its root, written before partitions existed: it opens "
                  "as partitions=1 as it is)") if layout.legacy else ""
        raise StateLayoutError(
            f"{state_dir}{legacy}: {_advice(partitions, layout.partitions)}"
        )
    stores: list[LevelDBStore] = []
    with ExitStack() as undo:  # a store that fails to open closes the ones opened before it
        for i in range(partitions):
            store = LevelDBStore(layout.store_path(state_dir, i),
                                 write_buffer_size=write_buffer_size)
            undo.callback(store.close)
            stores.append(store)
        undo.pop_all()
    return stores
