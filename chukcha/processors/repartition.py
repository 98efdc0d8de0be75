"""The repartitioning stage: a stateless hop from an input that is not partitioned the way an
app needs (a plain category written by the Go client or ``curl``, or another count) into the
app's own partitioned category, which the keyed stage reads.

For an app ``billing`` with P partitions reading ``orders``:

- the app's category is ``billing.orders`` (:func:`repartition_category`) with P partitions,
  ``billing.orders.p0000`` …, created (idempotently) when the app starts;
- the stage reads ``orders``'s owner streams (those of each of its partitions, when it is
  partitioned with another count) as the group ``billing``, takes each event's key
  (the processor's ``key=``, default the ID) and writes the event's line, unchanged, into the
  partition of its key; an event without an ID gets the one the processor would give it at its
  original place, ``"orders:<chunk>:<offset>"``, spliced in, so every copy the hop writes has
  the same ID;
- it acks a chunk of ``orders`` for the group only after the writes of everything before it
  were confirmed (200) by a node. A crash anywhere resends from the last ack: the keyed stage's
  dedup drops the copies (counted by ID: nothing lost, nothing added).

No state, no store: the positions live in the acks. :func:`plan_inputs` decides per processor
whether the hop is needed: not when the input category is already partitioned with the app's
count (the same hash is implied: it is the only one the bus knows).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chukcha.client.events import split_bodies
from chukcha.codecs import JSON, splice_id
from chukcha.errors import ClientError, ConsumerError, RemoteNotFoundError
from chukcha.partitioning import partition_category
from chukcha.processors.base import default_event_id
from chukcha.processors.decoding import decode_batch
from chukcha.processors.routing import JsonRouter, KeyHash

if TYPE_CHECKING:
    from chukcha.client import Batch, Client, Consumer, Position
    from chukcha.processors.base import App

__all__ = ["InputPlan", "Repartitioner", "plan_inputs", "repartition_category"]

logger = logging.getLogger(__name__)

_MAX_BODY = 4 << 20


def repartition_category(app: str, category: str) -> str:
    """The app's own partitioned copy of ``category``: ``<app>.<category>``."""
    return f"{app}.{category}"


@dataclass(frozen=True, slots=True)
class InputPlan:
    """How a processor's input is read: ``streams`` (the categories the keyed stage reads) and,
    when a hop is needed, the input categories ``sources`` it copies from into ``target``."""

    handler: str
    streams: tuple[str, ...]
    sources: tuple[str, ...] = ()
    target: str = ""


async def _bus_count(app: App, client: Client, category: str) -> int:
    """The partition count of ``category`` on the bus; while no node answers, asked again
    with backoff (an app may start before the bus, as the consumers wait for it too)."""
    delay = app.config.retry_initial
    while True:
        try:
            return await client.partitions(category)
        except RemoteNotFoundError:  # a node without /partitions (the Go server): none
            return 0
        except ClientError as exc:
            if not exc.retriable:
                raise
            logger.warning("app=%s cannot read the partitions of %s yet, retrying in %.1fs: "
                           "%s", app.name, category, delay, exc)
        await asyncio.sleep(delay)  # backoff between attempts
        delay = min(delay * 2, app.config.retry_max)


async def plan_inputs(app: App, client: Client) -> list[InputPlan]:
    """Decide, per processor, what the keyed stage reads (and create the app's partitioned
    categories where a hop is needed).

    Raises:
        ValueError: a processor pinned ``input_partitions`` and the bus says otherwise.
        RequestRejectedError: the app's partitioned category cannot be created (its name is
            taken by data, or it holds data under another count).
    """
    plans: list[InputPlan] = []
    n = app.partitions
    for name, handler in app.handlers.items():
        pinned = handler.input_partitions
        count = await _bus_count(app, client, name)
        if pinned is not None and count != pinned:
            raise ValueError(
                f"app {app.name!r}: the processor of {name!r} pins input_partitions={pinned}, "
                f"but the bus has {name!r} " + (f"with {count} partitions" if count else
                                               "unpartitioned")
                + (f" (create them: chukcha partitions {name} {pinned})" if not count else ""))
        inputs = tuple(partition_category(name, i) for i in range(count)) or (name,)
        if n in {1, count}:
            # One partition reads any input as it is; the same count needs no hop either.
            plans.append(InputPlan(name, inputs))
            continue
        target = repartition_category(app.name, name)
        streams = tuple(await client.create_partitions(target, n))
        logger.info("app=%s category=%s has %s; repartitioning into %s (%d partitions)",
                    app.name, name, f"{count} partitions" if count else "no partitions",
                    target, n)
        plans.append(InputPlan(name, streams, sources=inputs, target=target))
    return plans


class Repartitioner:
    """Copies ``source`` into the ``partitions`` partitions of ``target`` by key (see the module
    docstring); :meth:`step` handles one read's batches."""

    def __init__(self, app: App, client: Client, consumer: Consumer, *, source: str,
                 target: str, partitions: int, owned: Collection[int] | None = None,
                 handler: str | None = None) -> None:
        self._app = app
        self._client = client
        self.consumer = consumer
        self.source = source
        self.target = target
        self._partitions = partitions
        # With a static split each instance copies only its own partitions' events (every
        # instance reads the whole input as its own group): one writer per partition.
        self._owned = None if owned is None or len(set(owned)) == partitions else set(owned)
        self._handler = handler or source
        handler_def = app.handlers[self._handler]
        self._stamp = handler_def.codec.json_object
        # JSON with the default ``id`` field: the hot path; else what the keyed stage computes.
        self._router = (JsonRouter(source, partitions, handler_def.key)
                        if handler_def.codec is JSON and app.event_id is default_event_id
                        else None)
        self._hash = KeyHash(partitions)
        self.events = 0
        """Events copied (written and confirmed) since start."""
        self.routed = 0
        """Events handed to writes since start (confirmed or in flight)."""
        self._inflight: asyncio.Task[None] | None = None  # the last step's writes, then ack
        self._written: dict[str, Position] = {}  # owner -> position, everything before written

    async def step(self, batches: list[Batch]) -> None:
        """Route every event of ``batches`` to its partition, wait for the previous step's
        writes (their error is raised here) and start this step's: routing a batch overlaps
        with writing the one before. What a step's writes finish is acked once they are all
        confirmed (:meth:`ack` waits for the writes in flight)."""
        lists: list[list[bytes]] = [[] for _ in range(self._partitions)]
        appends = [lines.append for lines in lists]
        if self._router is not None:
            route = self._router.route
            for b in batches:
                route(b.chunk, b.offset, b.data, appends)
        else:
            for b in batches:
                self._route_any(b, appends)
        owned = self._owned
        parts = [(p, lines) for p, lines in enumerate(lists)
                 if lines and (owned is None or p in owned)]
        positions = {b.owner: b.position for b in batches}
        await self._settle()
        self.routed += sum(len(lines) for _, lines in parts)
        self._inflight = asyncio.create_task(
            self._write_then_ack(parts, positions),
            name=f"repartition-{self._app.name}-{self.source}-write")

    async def _write_then_ack(self, parts: list[tuple[int, list[bytes]]],
                              positions: dict[str, Position]) -> None:
        if parts:
            await asyncio.gather(*(self._write(p, lines) for p, lines in parts))
            self.events += sum(len(lines) for _, lines in parts)
        # Every write is confirmed: now the input before these positions may go.
        self._written.update(positions)
        await self._commit()

    async def _settle(self) -> None:
        """Wait for the writes in flight and their ack (raising their error)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def cancel(self) -> None:
        """Stop the writes in flight, if any (not acked: resent after a restart)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def _route_any(self, b: Batch, appends: list[Callable[[bytes], None]]) -> None:
        """Route by what the keyed stage will compute (:func:`decode_batch`: any codec, any
        ID function)."""
        source, partition = self.source, self._hash.partition
        items, _ = decode_batch(self._app, source, b.chunk, b.offset, b.data,
                                handler=self._handler)
        for ev_off, line, event, eid, key, _error in items:
            if self._stamp and type(event) is dict and event.get("id") is None \
                    and eid is not None and eid == f"{source}:{b.chunk}:{ev_off}":
                # No ID of its own: carry the one of its original place.
                line = splice_id(line, eid)  # noqa: PLW2901
            appends[partition(key)](line)

    async def ack(self) -> None:
        """Wait for the writes in flight, then ack what lies wholly before the positions whose
        events are written (again when idle: a chunk copied earlier may have become complete
        since)."""
        await self._settle()
        await self._commit()

    async def _commit(self) -> None:
        if not self._written:
            return
        try:
            await self.consumer.commit(dict(self._written))
        except ClientError as exc:
            logger.warning("app=%s category=%s repartition ack failed (acked later): %s",
                           self._app.name, self.source, exc)
        except ConsumerError as exc:
            if self.consumer.fence is None:
                raise
            # Refused (fenced): partition 0 moved; the hop is being stopped with it.
            logger.warning("app=%s category=%s repartition ack refused, partition 0 moved: %s",
                           self._app.name, self.source, exc)

    async def _write(self, partition: int, lines: list[bytes]) -> None:
        """Write ``lines`` into one partition, retried with backoff until a node confirms (an
        error that says it is not retriable is raised)."""
        category = partition_category(self.target, partition)
        cfg = self._app.config
        for body in split_bodies(lines, _MAX_BODY):
            delay = cfg.retry_initial
            while True:
                try:
                    await self._client.write_body(category, body)
                    break
                except ClientError as exc:
                    if not exc.retriable:
                        raise
                    logger.warning("app=%s repartition write to %s failed, retrying in "
                                   "%.1fs: %s", self._app.name, category, delay, exc)
                await asyncio.sleep(delay)  # backoff between attempts
                delay = min(delay * 2, cfg.retry_max)
