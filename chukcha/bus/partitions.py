"""Partitioned categories (extension): ``/partitions?category=C[&count=N]``.

A category created with N partitions is N ordinary categories on the wire,
``<category>.p0000`` … (:func:`chukcha.partitioning.partition_category`), so any client, the Go
one included, reads or writes one like any category; the producer routes each event to the
partition of its key's hash (:func:`chukcha.partitioning.partition_of`). What the node records is
the count, cluster-wide, the way consumer groups are recorded:

- with etcd: ``chukcha/<cluster>/partitions/<category>`` = N, written in a transaction that
  compares the value read before (so two nodes cannot record two counts), and read from etcd
  (linearizable) by every ``GET``;
- with static peers (or alone): in the node's group registry (``.groups.json``, durable before
  the answer) and forwarded to every peer through the registry's durable outbox.

``/partitions?category=C`` answers ``{"category", "partitions", "names"}`` (``0`` and ``[]``
when C is not partitioned). With ``count=N`` (1..1024) it records N first; the same N again is
a no-op. Refused with 409 (:class:`~chukcha.errors.PartitionsConflictError`), changing nothing:

- another count while a partition of the current count holds data on this node (migrate by
  creating a new category with the new count and copying the events over, e.g. with a
  repartitioning app, then switching producers);
- a first count whose partition names are taken by categories that hold data here (say a plain
  ``orders.p0003`` written by someone else).

A name that is itself a partition's (``orders.p0003``) cannot be partitioned (400).
"""

from __future__ import annotations

import logging
from typing import Any, Final

import orjson

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.group_coordination import EtcdGroups
from chukcha.bus.groups import ConsumerGroups
from chukcha.bus.http import Handler, int_param, str_param
from chukcha.errors import BadRequestError, PartitionsConflictError
from chukcha.partitioning import (
    MAX_PARTITIONS,
    parse_partition_category,
    partition_category,
)
from chukcha.protocol import validate_category, validate_instance

__all__ = ["CategoryPartitions"]

logger = logging.getLogger(__name__)

_JSON: Final = "application/json"


class CategoryPartitions:
    """The partition counts of categories, recorded cluster-wide; serves ``/partitions``."""

    def __init__(self, store: ChunkStore, groups: ConsumerGroups,
                 etcd: EtcdGroups | None = None) -> None:
        self._store = store
        self._groups = groups
        self._etcd = etcd

    async def count(self, category: str) -> int:
        """The partition count of ``category`` (0: not partitioned)."""
        validate_category(category)
        if self._etcd is not None:
            return await self._etcd.partitions(category)
        return self._groups.registry.partitions(category)

    def _holds_data(self, category: str) -> bool:
        return any(c.size > 0 for c in self._store.list_chunks(category))

    async def create(self, category: str, count: int, origin: str | None = None) -> bool:
        """Record ``count`` partitions for ``category``; returns whether anything changed.

        Raises:
            BadRequestError: ``count`` outside 1..1024, a partition's own name, a name too long.
            PartitionsConflictError: see the module docstring (nothing changed).
        """
        validate_category(category)
        if not 1 <= count <= MAX_PARTITIONS:
            raise BadRequestError(
                f"count must be from 1 to {MAX_PARTITIONS}, not {count}")
        if parse_partition_category(category) is not None:
            raise BadRequestError(
                f"{category!r} is the name of a partition (<category>.pNNNN); a partition "
                "cannot be partitioned again")
        try:
            names = [partition_category(category, i) for i in range(count)]
        except BadRequestError as exc:
            raise BadRequestError(f"cannot partition {category!r}: {exc}") from None
        if origin is not None:  # a peer's forward: the origin checked it
            await self._groups.record_partitions(category, count, origin)
            return True
        current = await self.count(category)
        if current == count:
            return False
        if current:
            full = [n for n in (partition_category(category, i) for i in range(current))
                    if self._holds_data(n)]
            if full:
                raise PartitionsConflictError(
                    f"category {category!r} has {current} partitions and {full[0]!r} "
                    f"(and {len(full) - 1} more) holds data: changing the count to {count} "
                    "would move keys to other partitions. Create a new category with "
                    f"{count} partitions and copy the events over instead")
        else:
            taken = [n for n in names if self._holds_data(n)]
            if taken:
                raise PartitionsConflictError(
                    f"cannot partition {category!r}: category {taken[0]!r} already exists "
                    "with data and is not one of its partitions; choose another category "
                    "name (or delete that data first)")
        if self._etcd is not None and not await self._etcd.set_partitions(
                category, count, current):
            raise PartitionsConflictError(
                f"the partition count of {category!r} changed meanwhile (another node "
                "recorded one); read it again")
        await self._groups.record_partitions(category, count, None)
        logger.info("instance=%s category=%s partitions %d -> %d", self._store.instance,
                    category, current, count)
        return True

    def routes(self) -> dict[str, Handler]:
        return {"/partitions": self._serve}

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        created = False
        if request.query.get("count"):
            origin = request.query.get("from")
            created = await self.create(
                category, int_param(request, "count", maximum=MAX_PARTITIONS),
                validate_instance(origin) if origin else None)
        count = await self.count(category)
        body: dict[str, Any] = {
            "category": category,
            "partitions": count,
            "names": [partition_category(category, i) for i in range(count)],
            "changed": created,
        }
        return web.Response(body=orjson.dumps(body), content_type=_JSON)
