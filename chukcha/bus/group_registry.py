"""The consumer-group registry of one node and its file (``<data_dir>/.groups.json``).

:class:`GroupRegistry` holds the registrations, group acks, retention policies
(:class:`RetentionPolicy`), partition counts and the outbox of one node, in memory and in
``<data_dir>/.groups.json`` (written atomically: temp file, fsync, rename), which is not a
directory and so never mistaken for a category. A change is durable or nowhere
(:meth:`GroupRegistry.change`). What the groups mean (when a chunk is tombstoned) is
:class:`~chukcha.bus.groups.ConsumerGroups`; the outbox's delivery is
:mod:`chukcha.bus.group_forwarding`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from chukcha.bus import files
from chukcha.bus.group_coordination import GroupsSnapshot
from chukcha.bus.tasks import run_to_end
from chukcha.errors import BadRequestError, DiskWriteError
from chukcha.partitioning import MAX_PARTITIONS
from chukcha.protocol import MAX_INT_PARAM, validate_category

__all__ = ["GROUPS_FILE", "GroupRegistry", "RetentionPolicy", "validate_group"]

logger = logging.getLogger(__name__)

GROUPS_FILE: Final = ".groups.json"
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")


def validate_group(name: str) -> str:
    """Return ``name`` if it is a valid group name (letters, digits, ``_ . : -``; 1-200)."""
    if not _GROUP_RE.fullmatch(name):
        raise BadRequestError(
            f"invalid group name {name!r}: use 1-200 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Delete complete chunks older than ``max_age`` seconds, and the oldest complete chunks
    while the category holds more than ``max_bytes``; ``None`` turns a limit off."""

    max_age: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("max_age must be positive")
        if self.max_bytes is not None and not 0 < self.max_bytes <= MAX_INT_PARAM:
            raise ValueError(f"max_bytes must be between 1 and {MAX_INT_PARAM}")

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    def to_json(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "max_bytes": self.max_bytes}


@dataclass(slots=True)
class _CategoryGroups:
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> chunk -> size
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    partitions: int = 0  # 0: not a partitioned category (see chukcha.bus.partitions)


class GroupRegistry:
    """Registrations, group acks and retention policies of one node, persisted in one file.

    Mutations are applied in memory and then written out; callers hold the
    :class:`~chukcha.bus.groups.ConsumerGroups` lock so writes never interleave.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cats: dict[str, _CategoryGroups] = {}
        self.outbox: dict[str, list[dict[str, Any]]] = {}
        """Destination (peer instance, or ``"etcd"``) -> changes not confirmed there yet."""
        self._on_disk: bytes | None = None  # the document last written (or loaded)

    async def load(self) -> None:
        raw = await asyncio.to_thread(files.read_file, self._path)
        if raw is not None:
            self._decode(raw)
            self._on_disk = raw

    def _decode(self, raw: bytes) -> None:
        """Make memory the registry document ``raw`` (all or nothing)."""
        try:
            data = orjson.loads(raw)
            cats: dict[str, _CategoryGroups] = {}
            for cat, obj in data.get("categories", {}).items():
                ret = obj.get("retention") or {}
                cats[validate_category(cat)] = _CategoryGroups(
                    groups={validate_group(g): {str(c): _size(s) for c, s in acked.items()}
                            for g, acked in obj.get("groups", {}).items()},
                    retention=RetentionPolicy(ret.get("max_age"), ret.get("max_bytes")),
                    partitions=_count(obj.get("partitions", 0)),
                )
            outbox = {str(dest): [dict(e) for e in entries]
                      for dest, entries in data.get("outbox", {}).items() if entries}
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{self._path} is damaged: {exc}") from exc
        self._cats, self.outbox = cats, outbox

    def _encode(self) -> bytes:
        return orjson.dumps({
            "categories": {
                cat: {"groups": cg.groups, "retention": cg.retention.to_json(),
                      **({"partitions": cg.partitions} if cg.partitions else {})}
                for cat, cg in sorted(self._cats.items())
                if cg.groups or cg.retention.enabled or cg.partitions
            },
            "outbox": {dest: entries for dest, entries in self.outbox.items() if entries},
        })

    async def save(self) -> None:
        """Write the registry out (atomically, fsync'ed).

        Raises:
            DiskWriteError: the file could not be written (memory is left as it is: use
                :meth:`change` to have it put back).
        """
        try:
            await run_to_end(self._write(self._encode()))
        except OSError as exc:
            raise DiskWriteError(
                exc.errno or errno.EIO,
                f"saving the consumer-group registry {self._path} failed: {exc.strerror}; "
                "nothing was changed",
            ) from exc

    async def _write(self, data: bytes) -> None:
        await asyncio.to_thread(files.write_atomic, self._path, data)
        self._on_disk = data

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[None]:
        """One durable change: the block changes memory, the exit saves it, and if either
        fails memory is put back as it was, so a change answered 200 is on disk and a failed
        one is nowhere (the caller holds the :class:`~chukcha.bus.groups.ConsumerGroups` lock)."""
        before = self._encode()
        try:
            yield
            if self._on_disk != self._encode():
                await self.save()
        except BaseException:
            # Unless the file has it after all (cancelled after the write), put memory back.
            if self._on_disk != self._encode():
                self._decode(before)
            raise

    async def save_quietly(self, what: str) -> None:
        """Save a change that needs no rollback (dropping the acks of tombstoned chunks: the
        next save writes it); a failure is logged."""
        try:
            await self.save()
        except DiskWriteError as exc:
            logger.warning("%s: %s", what, exc)

    def groups(self, category: str) -> dict[str, dict[str, int]]:
        cg = self._cats.get(category)
        return cg.groups if cg else {}

    def categories(self) -> list[str]:
        return sorted(self._cats)

    def retention(self, category: str) -> RetentionPolicy:
        cg = self._cats.get(category)
        return cg.retention if cg else RetentionPolicy()

    def partitions(self, category: str) -> int:
        """The recorded partition count of ``category`` (0: none)."""
        cg = self._cats.get(category)
        return cg.partitions if cg else 0

    def set_partitions(self, category: str, count: int) -> None:
        self._cat(category).partitions = count

    def _cat(self, category: str) -> _CategoryGroups:
        return self._cats.setdefault(category, _CategoryGroups())

    def register(self, category: str, group: str) -> bool:
        groups = self._cat(category).groups
        if group in groups:
            return False
        groups[group] = {}
        return True

    def unregister(self, category: str, group: str) -> bool:
        return self._cat(category).groups.pop(group, None) is not None

    def record_ack(self, category: str, group: str, chunk: str, size: int) -> None:
        self._cat(category).groups.setdefault(group, {})[chunk] = size

    def replace_groups(self, snapshot: GroupsSnapshot) -> None:
        """Make the groups and acks those of ``snapshot`` (etcd's); retention stays."""
        for cg in self._cats.values():
            cg.groups = {}
        for category, groups in snapshot.items():
            self._cat(category).groups = {g: dict(acked) for g, acked in groups.items()}

    def apply(self, entry: dict[str, Any]) -> None:
        """Apply an outbox entry to this registry (it is not in etcd's snapshot yet)."""
        category, group = entry["category"], entry.get("group", "")
        if entry["op"] == "partitions":
            self.set_partitions(category, entry["count"])
        elif entry["op"] == "register":
            self.register(category, group)
        elif entry["op"] == "unregister":
            self.unregister(category, group)
        else:
            self.record_ack(category, group, entry["chunk"], entry["size"])

    def enqueue(self, destinations: list[str], entry: dict[str, Any]) -> None:
        """Queue ``entry`` for each destination (not twice in a row)."""
        for dest in destinations:
            box = self.outbox.setdefault(dest, [])
            if not box or box[-1] != entry:
                box.append(entry)

    def forget_chunks(self, category: str, gone: set[str]) -> None:
        """Drop the acks of chunks that are gone."""
        for acked in self._cat(category).groups.values():
            for chunk in gone & acked.keys():
                del acked[chunk]

    def set_retention(self, category: str, policy: RetentionPolicy) -> None:
        self._cat(category).retention = policy


def _count(value: Any) -> int:
    """A recorded partition count from the registry file (0: none, else 1..1024)."""
    if value == 0:
        return 0
    if type(value) is not int or not 1 <= value <= MAX_PARTITIONS:
        raise ValueError(f"partition count {value!r} is not an integer from 1 to "
                         f"{MAX_PARTITIONS}")
    return value


def _size(value: Any) -> int:
    """A recorded ack size from the registry file (an int in the parameter range)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT_PARAM:
        raise ValueError(f"ack size {value!r} is not an integer between 0 and {MAX_INT_PARAM}")
    return value
