"""Views: a read-only, local, continuously updated copy of another app's table, built from
that app's changelog on the bus (``ProcessorConfig(changelog=True)``;
:mod:`chukcha.processors.changelog`).

In a script::

    async with View("billing", nodes=["http://127.0.0.1:8080"]) as billing:
        await billing.wait_caught_up()
        print(billing.get("ann"))

In an app: ``app.view("billing")`` and, in a callback, ``ctx.lookup("billing", key)`` (Goka's
View and ``ctx.Lookup``, Faust's GlobalTable).

**How fresh.** The other app publishes each partition's fsync'ed commit as a changelog record
before it acks any input past it; the view reads every partition's changelog category with a
long poll, so a committed change shows up in the view within the replication of the record and
one read (milliseconds on a quiet cluster); it is never ahead of what the other app committed,
and it applies each partition's records in order, whole (a partition's commit appears at once
or not at all). Partitions are not synchronised with each other. A lookup in a callback reads
the view as it is at that moment: reprocessing an event after a crash may see a newer value.

The view reads the changelog without a consumer group: it never acks, so it deletes nothing.

**Which records.** The changelog can hold records that do not count: a former owner's (paused
past its lease, then resumed) written after a newer owner took the partition. The view applies
what :func:`~chukcha.state.changelog.plan_replay` puts on the chain; when a newer owner's link
shows that the view already applied such a record (it arrived before the newer owner's records: the
changelog's streams on several nodes are read in any order), the view rebuilds that partition
from the start of its changelog, applying nothing of it until it has read all of it (a WARNING
says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final

import orjson

from chukcha.client import Client, Consumer
from chukcha.errors import ChukchaError
from chukcha.partitioning import parse_partition_category
from chukcha.processors.context import TABLE_PREFIX
from chukcha.state.changelog import Assembler, Head, plan_replay

__all__ = ["View"]

logger = logging.getLogger(__name__)

_RELIST: Final = 1.0  # seconds between looks for changelog categories not seen yet


class View:
    """A read-only copy of app ``app``'s table (see the module docstring).

    Args:
        app: the name of the app whose table to follow.
        nodes: node URLs (ignored when ``client`` is given).
        client: a client to share (not closed by the view).
    """

    def __init__(self, app: str, nodes: Sequence[str] = ("http://127.0.0.1:8080",), *,
                 client: Client | None = None) -> None:
        self.app = app
        self._prefix = f"{app}.changelog"
        self._nodes = list(nodes)
        self._client = client
        self._own_client = client is None
        self._table: dict[str, bytes] = {}
        self.seqs: dict[int, int] = {}
        """The last applied changelog ``seq`` per partition."""
        self._heads: dict[int, Head] = {}  # the last applied record per partition
        self._rebuilding: set[int] = set()  # partitions read again from their start
        self.rebuilds = 0
        """Partitions rebuilt from the start because a record applied was off the chain."""
        self._assemblers: dict[int, Assembler] = {}
        self._keys: dict[int, set[str]] = {}  # the table's keys per partition
        self._consumers: dict[int, Consumer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._listed = False
        self.errors = 0
        """Failed reads (retried)."""

    # --- reading the table -------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (a fresh copy), ``default`` when the table has none."""
        raw = self._table.get(key)
        return default if raw is None else orjson.loads(raw)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __len__(self) -> int:
        return len(self._table)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value, in key order."""
        for key in sorted(self._table):
            yield key, orjson.loads(self._table[key])

    @property
    def caught_up(self) -> bool:
        """Every changelog partition found so far has been read to its end and applied."""
        return self._listed and not self._rebuilding and all(
            c.caught_up and not self._assemblers[p].incomplete
            for p, c in self._consumers.items()
        )

    async def wait_for(self, predicate: Callable[[View], bool], timeout: float = 30.0) -> None:
        """Wait until ``predicate(view)`` holds (checked after every change).

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until :attr:`caught_up`."""
        await self.wait_for(lambda v: v.caught_up, timeout)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        if self._client is None:
            self._client = Client(self._nodes)
        task = asyncio.create_task(self._discover(), name=f"view-{self.app}")
        self._tasks.add(task)

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for consumer in self._consumers.values():
            await consumer.stop()
        self._consumers.clear()
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> View:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- following the changelog -------------------------------------------------------------

    def _need_client(self) -> Client:
        if self._client is None:
            raise RuntimeError(f"view of {self.app!r} is not started")
        return self._client

    async def _discover(self) -> None:
        client = self._need_client()
        while True:
            try:
                categories = await client.list_categories()
            except ChukchaError as exc:
                self.errors += 1
                logger.warning("view=%s listing categories failed: %s", self.app, exc)
            else:
                for category in categories:
                    parsed = parse_partition_category(category)
                    if parsed is None or parsed[0] != self._prefix:
                        continue
                    partition = parsed[1]
                    if partition not in self._consumers:
                        self._start_partition(partition, category)
                if not self._listed:
                    self._listed = True
                    if not self._consumers:
                        logger.warning(
                            "view=%s: no changelog of app %r on the bus yet (%s.p0000...): the "
                            "view is empty until that app commits with "
                            "ProcessorConfig(changelog=True)", self.app, self.app, self._prefix)
                    await self._notify()
            await asyncio.sleep(_RELIST)  # a new partition's first record: look again

    def _start_partition(self, partition: int, category: str) -> None:
        self._assemblers[partition] = Assembler()
        self.seqs.setdefault(partition, 0)
        consumer = self._consumers[partition] = self._need_client().consumer(category)
        task = asyncio.create_task(self._follow(partition, consumer),
                                   name=f"view-{self.app}-p{partition}")
        self._tasks.add(task)

    async def _follow(self, partition: int, consumer: Consumer) -> None:
        assembler = self._assemblers[partition]
        category = consumer.category
        while True:
            try:
                batches = await consumer.read(timeout=1.0)
            except ChukchaError as exc:
                self.errors += 1
                logger.warning("view=%s partition %d read failed (retrying): %s", self.app,
                               partition, exc)
                await asyncio.sleep(0.5)  # backoff before the retry
                continue
            for batch in batches:
                for line in batch.messages():
                    assembler.add(line)
            if partition in self._rebuilding:
                if not consumer.caught_up:
                    continue  # the whole changelog first: its streams come in any order
                self._rebuilding.discard(partition)
            if not self._apply(partition, assembler):
                # Applied a record off the chain: read the partition's changelog again.
                logger.warning("view=%s partition %d applied a record that a newer owner did "
                               "not build on (a former owner's late record); rebuilding the "
                               "partition from its changelog", self.app, partition)
                self.rebuilds += 1
                self._clear(partition)
                await consumer.stop()
                consumer = self._consumers[partition] = self._need_client().consumer(category)
                assembler = self._assemblers[partition] = Assembler()
                self._rebuilding.add(partition)
            await self._notify()

    def _clear(self, partition: int) -> None:
        """Forget what the view applied of ``partition``."""
        keys = self._keys.setdefault(partition, set())
        for key in keys:
            del self._table[key]
        keys.clear()
        self.seqs[partition] = 0
        self._heads.pop(partition, None)

    def _apply(self, partition: int, assembler: Assembler) -> bool:
        """Apply what came (``False``: the view's position is off the chain, start over)."""
        table = self._table
        keys = self._keys.setdefault(partition, set())
        n = len(TABLE_PREFIX)
        seq = self.seqs[partition]
        records = assembler.records()
        head = self._heads.get(partition)
        replay = plan_replay(records, head)
        if replay.diverged:
            return False
        if head is not None and not replay.records:
            # From the newest snapshot on the chain, if any: the chain that ``head`` is on
            # (the records it built on may be forgotten; a former owner's late snapshot past
            # head's link is not on it).
            fresh = plan_replay(records, known=head)
            if fresh.records and fresh.records[0].base and fresh.records[0].seq > head.seq:
                # The records after ``seq`` were deleted with the changelog chunks before a
                # newer snapshot (the app acks them once it is confirmed) while this view was
                # behind: rebuild the partition from the snapshot, or it would stay at ``seq``
                # for good.
                logger.warning("view=%s partition %d fell behind a snapshot; rebuilding it "
                               "from the snapshot", self.app, partition)
                replay = fresh
        for record in replay.records:
            if record.base:  # a snapshot is the whole table: nothing before it stays
                for key in keys:
                    del table[key]
                keys.clear()
            for raw in record.deletes:
                if raw.startswith(TABLE_PREFIX):
                    key = raw[n:].decode()
                    if table.pop(key, None) is not None:
                        keys.discard(key)
            for raw, value in record.puts.items():
                if raw.startswith(TABLE_PREFIX):
                    key = raw[n:].decode()
                    table[key] = value
                    keys.add(key)
            seq = record.seq
            self._heads[partition] = record.head
        self.seqs[partition] = seq
        assembler.forget(seq)
        return True

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def __repr__(self) -> str:
        return f"View({self.app!r}, keys={len(self._table)}, seqs={self.seqs})"
