"""Consumer groups and retention (extensions; see DESIGN.md "Consumer groups").

In the Go server an ack deletes a chunk for everyone. Here a consumer group registers for a
category (``/groups/register?category=C&group=G``); ``/ack?...&group=G`` then only records that
G is done with the chunk, and the chunk is tombstoned when *every* group registered for the
category has acked it. An ack without ``group`` keeps the Go behaviour: the chunk is tombstoned
at once. An ack for a group that is not registered is refused (400), so a typo in a group name
cannot silently keep data forever or, worse, delete it early.

Retention (``/retention?category=C&max_age=SECONDS&max_bytes=BYTES``) deletes the oldest
*complete* chunks of a category, acked or not, once they are older than ``max_age`` or while the
category holds more than ``max_bytes``: Kafka-like expiry for users who want it.

Registrations, group acks and retention policies are kept in ``<data_dir>/.groups.json``
(written atomically: temp file, fsync, rename), which is not a directory and so never mistaken
for a category.

They are kept per node; the client makes them cluster-wide: a group consumer registers its
group on every node it knows and, after acking on the node it reads from, copies the ack to the
other nodes through ``/groups/ack`` (record only: that node may not have the chunk, or all of
it, yet). A node where every group's ack has arrived tombstones the chunk, and ack replication
tombstones it everywhere. :class:`GroupRegistry` is the seam where an etcd-backed registry would
replace this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from chukcha.bus.chunks import ChunkStore
from chukcha.bus.http import Handler, float_param, int_param, str_param
from chukcha.errors import BadRequestError, InvalidAckError
from chukcha.protocol import parse_chunk_name, validate_category

__all__ = [
    "GROUPS_FILE",
    "ConsumerGroups",
    "GroupRegistry",
    "RetentionPolicy",
    "validate_group",
]

logger = logging.getLogger(__name__)

GROUPS_FILE: Final = ".groups.json"
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
_JSON: Final = "application/json"
_MAX_AGE: Final = 100 * 365 * 86400.0


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
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")

    @property
    def enabled(self) -> bool:
        return self.max_age is not None or self.max_bytes is not None

    def to_json(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "max_bytes": self.max_bytes}


@dataclass(slots=True)
class _CategoryGroups:
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # group -> chunk -> size
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)


class GroupRegistry:
    """Registrations, group acks and retention policies of one node, persisted in one file.

    Mutations are applied in memory and then written out; callers hold the
    :class:`ConsumerGroups` lock so writes never interleave.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cats: dict[str, _CategoryGroups] = {}

    async def load(self) -> None:
        raw = await asyncio.to_thread(_read_file, self._path)
        if raw is None:
            return
        try:
            data = orjson.loads(raw)
            for cat, obj in data.get("categories", {}).items():
                ret = obj.get("retention") or {}
                self._cats[validate_category(cat)] = _CategoryGroups(
                    groups={validate_group(g): {str(c): int(s) for c, s in acked.items()}
                            for g, acked in obj.get("groups", {}).items()},
                    retention=RetentionPolicy(ret.get("max_age"), ret.get("max_bytes")),
                )
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{self._path} is damaged: {exc}") from exc

    async def save(self) -> None:
        data = {
            "categories": {
                cat: {"groups": cg.groups, "retention": cg.retention.to_json()}
                for cat, cg in sorted(self._cats.items())
                if cg.groups or cg.retention.enabled
            }
        }
        await asyncio.to_thread(_write_atomic, self._path, orjson.dumps(data))

    def groups(self, category: str) -> dict[str, dict[str, int]]:
        cg = self._cats.get(category)
        return cg.groups if cg else {}

    def categories(self) -> list[str]:
        return sorted(self._cats)

    def retention(self, category: str) -> RetentionPolicy:
        cg = self._cats.get(category)
        return cg.retention if cg else RetentionPolicy()

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
        self._cat(category).groups[group][chunk] = size

    def forget_chunks(self, category: str, gone: set[str]) -> None:
        """Drop the acks of chunks that are gone."""
        for acked in self._cat(category).groups.values():
            for chunk in gone & acked.keys():
                del acked[chunk]

    def set_retention(self, category: str, policy: RetentionPolicy) -> None:
        self._cat(category).retention = policy


class ConsumerGroups:
    """The node's :class:`~chukcha.bus.http.AckHandler` with groups, their routes, retention."""

    def __init__(self, store: ChunkStore, *, retention_interval: float = 10.0) -> None:
        if retention_interval <= 0:
            raise ValueError("retention_interval must be positive")
        self._store = store
        self._registry = GroupRegistry(store.data_dir / GROUPS_FILE)
        self._retention_interval = retention_interval
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def registry(self) -> GroupRegistry:
        return self._registry

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the registry (after the store is open) and start the retention loop."""
        await self._registry.load()
        if self._task is None:
            self._task = asyncio.create_task(self._retention_forever(), name="retention")

    async def stop(self) -> None:
        if (task := self._task) is None:
            return
        self._task = None
        task.cancel()
        await asyncio.wait([task])

    async def __aenter__(self) -> ConsumerGroups:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- acks ---------------------------------------------------------------------------

    async def ack(self, category: str, chunk: str, size: int, group: str | None) -> None:
        """Apply ``/ack``; see the module docstring."""
        if group is None:
            await self._store.ack(category, chunk, size)
            return
        validate_group(group)
        async with self._lock:
            groups = self._registry.groups(category)
            if group not in groups:
                raise BadRequestError(
                    f"consumer group {group!r} is not registered for category {category!r}; "
                    f"register it first (/groups/register?category={category}&group={group})"
                )
            if self._store.is_tombstoned(category, chunk):
                return
            self._check_ack(category, chunk, size)
            self._registry.record_ack(category, group, chunk, size)
            done = all(chunk in acked for acked in groups.values())
            if done:
                await self._store.ack(category, chunk, size)
                self._prune(category)
            await self._registry.save()
        logger.debug("category=%s group=%s acked %s%s", category, group, chunk,
                     " (all groups: tombstoned)" if done else "")

    async def record_ack(self, category: str, chunk: str, size: int, group: str) -> bool:
        """``/groups/ack``: record ``group``'s ack of ``chunk`` made on another node (no checks
        against this node's copy, which may lag); tombstone the chunk here when every group has
        acked it and it is complete here. Returns whether it was tombstoned."""
        validate_category(category)
        parse_chunk_name(chunk)
        validate_group(group)
        async with self._lock:
            groups = self._registry.groups(category)
            if group not in groups:
                raise BadRequestError(
                    f"consumer group {group!r} is not registered for category {category!r}"
                )
            if self._store.is_tombstoned(category, chunk) or groups[group].get(chunk) == size:
                return False
            self._registry.record_ack(category, group, chunk, size)
            done = (
                all(chunk in acked for acked in groups.values())
                and self._store.is_complete(category, chunk)
                and (self._store.chunk_size(category, chunk) or 0) <= size
            )
            if done:
                await self._store.ack(category, chunk, None)
            await self._registry.save()
        return done

    def _check_ack(self, category: str, chunk: str, size: int) -> None:
        # The same checks as ChunkStore.ack, without tombstoning.
        parse_chunk_name(chunk)
        have = self._store.chunk_size(category, chunk)
        if have is None:
            raise InvalidAckError(f"chunk {category}/{chunk} not found")
        if not self._store.is_complete(category, chunk):
            raise InvalidAckError(f"chunk {chunk} is not complete yet; cannot ack it")
        if size < have:
            raise InvalidAckError(
                f"size {size} is smaller than chunk {chunk} ({have} bytes): "
                "it has not been read to the end"
            )

    def _prune(self, category: str) -> None:
        # Keep acks of chunks not here yet (copied from another node); drop tombstoned ones.
        gone = {chunk for acked in self._registry.groups(category).values() for chunk in acked
                if self._store.is_tombstoned(category, chunk)}
        self._registry.forget_chunks(category, gone)

    async def _tombstone_fully_acked(self, category: str) -> list[str]:
        groups = self._registry.groups(category)
        if not groups:
            return []
        done: list[str] = []
        for info in self._store.list_chunks(category):
            if info.complete and all(info.name in acked for acked in groups.values()):
                await self._store.ack(category, info.name, None)
                done.append(info.name)
        return done

    # --- registration -------------------------------------------------------------------

    async def register(self, category: str, group: str) -> bool:
        validate_category(category)
        validate_group(group)
        async with self._lock:
            created = self._registry.register(category, group)
            if created:
                await self._registry.save()
        if created:
            logger.info("instance=%s category=%s registered group %s",
                        self._store.instance, category, group)
        return created

    async def unregister(self, category: str, group: str) -> bool:
        """Remove ``group``; chunks every remaining group has acked are tombstoned now."""
        validate_category(category)
        validate_group(group)
        async with self._lock:
            removed = self._registry.unregister(category, group)
            if removed:
                await self._tombstone_fully_acked(category)
                self._prune(category)
                await self._registry.save()
        if removed:
            logger.info("instance=%s category=%s unregistered group %s",
                        self._store.instance, category, group)
        return removed

    def describe(self, category: str) -> dict[str, Any]:
        """``/groups/list``: the groups of ``category`` and the chunks each has acked (live
        here, or not replicated here yet)."""
        validate_category(category)
        return {
            "category": category,
            "groups": [
                {"name": g, "acked": sorted(c for c in acked
                                            if not self._store.is_tombstoned(category, c))}
                for g, acked in sorted(self._registry.groups(category).items())
            ],
            "retention": self._registry.retention(category).to_json(),
        }

    # --- retention ----------------------------------------------------------------------

    async def set_retention(self, category: str, policy: RetentionPolicy) -> None:
        validate_category(category)
        async with self._lock:
            self._registry.set_retention(category, policy)
            await self._registry.save()
        logger.info("instance=%s category=%s retention max_age=%s max_bytes=%s",
                    self._store.instance, category, policy.max_age, policy.max_bytes)

    async def apply_retention(self, now: float | None = None) -> list[str]:
        """Delete what the retention policies say must go; returns ``category/chunk`` names."""
        deleted: list[str] = []
        for category in self._registry.categories():
            policy = self._registry.retention(category)
            if policy.enabled:
                deleted += await self._apply(category, policy, now)
        return deleted

    async def _apply(
        self, category: str, policy: RetentionPolicy, now: float | None
    ) -> list[str]:
        chunks = self._store.list_chunks(category)
        complete = [c for c in chunks if c.complete]
        if not complete:
            return []
        cat_dir = self._store.data_dir / category
        mtimes = await asyncio.to_thread(_mtimes, cat_dir, [c.name for c in complete])
        # Oldest first: by last write, then by name (a stream's chunks in order).
        order = sorted(complete, key=lambda c: (mtimes.get(c.name, 0.0), c.name))
        total = sum(c.size for c in chunks)
        now = time.time() if now is None else now
        victims: list[str] = []
        for c in order:
            too_old = policy.max_age is not None and now - mtimes.get(c.name, now) > policy.max_age
            too_big = policy.max_bytes is not None and total > policy.max_bytes
            if not (too_old or too_big):
                if policy.max_age is None:
                    break  # by size only: the rest is newer
                continue
            victims.append(c.name)
            total -= c.size
        deleted: list[str] = []
        async with self._lock:
            for name in victims:
                if await self._store.ack(category, name, None):
                    deleted.append(f"{category}/{name}")
            if victims:
                self._prune(category)
                await self._registry.save()
        if deleted:
            logger.info("instance=%s category=%s retention deleted %s", self._store.instance,
                        category, ", ".join(deleted))
        return deleted

    async def _retention_forever(self) -> None:
        while True:
            await asyncio.sleep(self._retention_interval)
            try:
                await self.apply_retention()
            except Exception:
                logger.exception("retention failed; retrying in %g s", self._retention_interval)

    # --- HTTP ---------------------------------------------------------------------------

    def routes(self) -> dict[str, Handler]:
        return {
            "/groups/register": self._serve_register,
            "/groups/unregister": self._serve_unregister,
            "/groups/list": self._serve_list,
            "/groups/ack": self._serve_record_ack,
            "/retention": self._serve_retention,
        }

    async def _serve_register(self, request: web.Request) -> web.StreamResponse:
        created = await self.register(str_param(request, "category"), str_param(request, "group"))
        return web.json_response({"created": created})

    async def _serve_unregister(self, request: web.Request) -> web.StreamResponse:
        removed = await self.unregister(str_param(request, "category"),
                                        str_param(request, "group"))
        return web.json_response({"removed": removed})

    async def _serve_record_ack(self, request: web.Request) -> web.StreamResponse:
        done = await self.record_ack(
            str_param(request, "category"), str_param(request, "chunk"),
            int_param(request, "size"), str_param(request, "group"),
        )
        return web.json_response({"tombstoned": done})

    async def _serve_list(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(self.describe(str_param(request, "category")))
        return web.Response(body=body, content_type=_JSON)

    async def _serve_retention(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        if "max_age" in request.query or "max_bytes" in request.query:
            max_age = float_param(request, "max_age", 0.0, maximum=_MAX_AGE)
            max_bytes = int_param(request, "max_bytes", 0)
            await self.set_retention(
                category, RetentionPolicy(max_age or None, max_bytes or None)
            )
        body = orjson.dumps(self._registry.retention(category).to_json())
        return web.Response(body=body, content_type=_JSON)


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _mtimes(directory: Path, names: list[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            result[name] = (directory / name).stat().st_mtime
    return result
