"""The run loop of an app against the bus: read, process, then the checkpoint commits.

One consumer (group = the app's name) per category, each in its own task; a lock makes
"process a batch + commit it" one step, so the categories share the state safely. Per step:
``consumer.read()`` -> batches (at most one per owner stream), :meth:`Engine.process` each
batch (dedup, callbacks), then :meth:`Checkpoint.commit
<chukcha.processors.checkpoint.Checkpoint.commit>` (flush sinks, one write, fsync, send the
outbox, ack). :class:`~chukcha.processors.busio.BusIO` is where the checkpoint's effects go:
the sinks, the client, and ``consumer.commit(positions)``, which acks the complete chunks
wholly before the positions.

Sinks that are async context managers (or have ``start()``/``stop()``) are entered when the app
starts, before anything is read, and closed in reverse order when it stops, also on an error;
see :func:`_enter_sinks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

from chukcha.bus.app_coordination import etcd_cluster_id
from chukcha.client import Client
from chukcha.client.consumer import Batch, Consumer, Position
from chukcha.errors import ClientError
from chukcha.loop import run_loop
from chukcha.processors.busio import BusIO
from chukcha.processors.engine import Engine
from chukcha.processors.group import GroupConfig, GroupMode, PartitionLoop, check_group_app
from chukcha.processors.monitor import AppMonitor, parse_http_address
from chukcha.processors.partitions import PartitionSet, raise_single
from chukcha.processors.presence import Presence
from chukcha.processors.repartition import InputPlan, Repartitioner, plan_inputs
from chukcha.processors.split import StaticSplit
from chukcha.processors.views import View
from chukcha.state.leveldb import LevelDBStore
from chukcha.state.partitions import open_partition_stores

if TYPE_CHECKING:
    from chukcha.processors.base import App

__all__ = ["PROGRESS_INTERVAL", "Runner", "run_app", "run_app_async"]

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL: Final = 10.0
"""Seconds between progress lines while an app works."""

_TIMER_TICK = 1.0  # seconds: the longest a newly scheduled, due timer waits for its run


async def run_app_async(
    app: App, stop: asyncio.Event | None = None, *, split: StaticSplit | None = None,
    http: str | None = None, group: GroupConfig | None = None,
) -> None:
    """Run ``app`` until ``stop`` is set (or the task is cancelled), then stop gracefully:
    finish the batch, commit, ack, close. ``split``: run only this instance's share of the
    partitions (:mod:`chukcha.processors.split`). ``http``: ``HOST:PORT`` to serve the app's
    ``/metrics`` on (:mod:`chukcha.processors.monitor`).

    Raises:
        ProcessorError: a callback failed under the ``stop`` error policy.
        StateLockedError: another process runs on ``app.state_dir``.
        AppConfigError: the state directory was written under another split.
    """
    if not app.handlers:
        raise ValueError(f"app {app.name!r} has no processors")
    await Runner(app, split, http=http, group=group).run(stop or asyncio.Event())


def run_app(app: App, *, split: StaticSplit | None = None, http: str | None = None,
            group: GroupConfig | None = None) -> None:
    """Run ``app`` until SIGINT or SIGTERM (blocking)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await run_app_async(app, stop, split=split, http=http, group=group)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    run_loop(main())


class Runner:
    """Runs one :class:`~chukcha.processors.base.App` until its stop event is set."""

    def __init__(self, app: App, split: StaticSplit | None = None, *,
                 http: str | None = None, group: GroupConfig | None = None) -> None:
        if group is not None and split is not None and split.count > 1:
            raise ValueError("a static split and instances through etcd exclude each other")
        self.app = app
        self.group = group
        self.split = split or StaticSplit(0, 1)
        self.http = parse_http_address(http) if http else None
        self.monitor: AppMonitor | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Open the state, run every category's loop, stop gracefully when ``stop`` is set."""
        app, split = self.app, self.split
        owned = split.owned(app.partitions)
        if self.group is not None:
            check_group_app(app)
        await asyncio.to_thread(split.check_state_dir, app.state_dir)
        stores = await asyncio.to_thread(
            open_partition_stores, app.state_dir, app.partitions,
            write_buffer_size=app.config.state.write_buffer_size,
        )
        try:
            await asyncio.to_thread(split.record, app.state_dir)
            # Sinks close after the client (reverse order): the last flush happens in finish().
            async with contextlib.AsyncExitStack() as sinks, Client(
                list(app.nodes), token=app.config.token,
                ssl=ssl.create_default_context(cafile=app.config.tls_ca)
                if app.config.tls_ca else None,
            ) as client:
                # Refuses a second live instance, before anything; waits for a node to answer.
                # Through etcd the partitions are shared out there, but the heartbeats still
                # meet an instance run without etcd (or through another cluster).
                presence = Presence(
                    app.name, app.partitions, app.state_dir, split, client,
                    etcd=self.group.cluster if self.group is not None else "",
                    identify=functools.partial(etcd_cluster_id, self.group.etcd)
                    if self.group is not None else None)
                await presence.start(stop, retry_initial=app.config.retry_initial,
                                     retry_max=app.config.retry_max)
                try:
                    session = _Session(app, stores, client, split, group=self.group,
                                       presence=presence)
                    await session.load()
                    if self.http is not None:
                        self.monitor = session.monitor()
                        await self.monitor.start(*self.http)
                        sinks.push_async_callback(self.monitor.stop)
                    await _enter_sinks(sinks, app)
                    async with contextlib.AsyncExitStack() as views:  # stop before the client
                        await _start_views(views, app, client, session.engines)
                        logger.info(
                            "app=%s running categories=%s partitions=%d nodes=%s state=%s%s",
                            app.name, ",".join(app.handlers), app.partitions,
                            ",".join(app.nodes), app.state_dir,
                            f" instance {split.index} of {split.count} (partitions {owned}, "
                            f"group {split.group(app.name)})" if split.count > 1 else "")
                        try:
                            await session.work_until(stop)
                            await session.finish()
                        finally:
                            await session.close()
                finally:
                    await presence.leave()  # before the client closes
        finally:
            for store in stores:
                await asyncio.to_thread(store.close)
            logger.info("app=%s stopped", app.name)


async def _start_views(stack: contextlib.AsyncExitStack, app: App, client: Client,
                       engines: list[Engine]) -> None:
    """Start a :class:`View` of every app in ``app.views`` (``stack`` stops them) and wait,
    bounded, until each has caught up, so that the first lookups see the current tables."""
    if not app.views:
        return
    views: dict[str, View] = {}
    for name in app.views:
        view = views[name] = View(name, client=client)
        await view.start()
        stack.push_async_callback(view.stop)
    for engine in engines:
        engine.ctx.views = views
    for name, view in views.items():
        try:
            await view.wait_caught_up(timeout=3 * app.config.stop_timeout)
        except TimeoutError:
            logger.warning("app=%s view of %s has not caught up yet (%r); starting anyway",
                           app.name, name, view)
        else:
            logger.info("app=%s view of %s caught up: %d keys", app.name, name, len(view))


async def _enter_sinks(stack: contextlib.AsyncExitStack, app: App) -> None:
    """Start the app's sinks in registration order; ``stack`` closes them in reverse order.

    A sink that is an async context manager is entered (``__aenter__``); else one with
    ``start()`` and ``stop()`` is started; a sink with neither (only ``flush``) is left alone. A
    sink object registered under several names is started once. A sink whose start raises stops
    the app with that error (the sinks started before it are closed): a wrong URL or credentials
    should fail the start, not look like a running app whose flushes retry forever.

    Closing is bounded by ``config.stop_timeout`` per sink (a sink that does not close in time is
    left behind with a warning). A sink whose close raises makes the app's stop raise it, unless
    the app is already stopping on an error: then that error is the one raised and the sink's is
    logged, so a failing ``stop()`` cannot hide why the app stopped.
    """
    timeout = app.config.stop_timeout
    entered: set[int] = set()
    for name, sink in app.sinks.items():
        if id(sink) in entered:
            continue
        entered.add(id(sink))
        kind = type(sink)
        closer: _SinkCloser
        if hasattr(kind, "__aenter__") and hasattr(kind, "__aexit__"):
            cm = cast(AbstractAsyncContextManager[Any], sink)
            await cm.__aenter__()
            closer = _SinkCloser(app.name, name, timeout, cm=cm)
        elif callable(start := getattr(sink, "start", None)) and callable(
            stop := getattr(sink, "stop", None)
        ):
            await start()
            closer = _SinkCloser(app.name, name, timeout, stop=stop)
        else:
            continue
        logger.info("app=%s sink %s started", app.name, name)
        stack.push_async_exit(closer)


class _SinkCloser:
    """The exit callback of one started sink (see :func:`_enter_sinks`)."""

    def __init__(self, app_name: str, name: str, timeout: float, *,
                 cm: AbstractAsyncContextManager[Any] | None = None,
                 stop: Callable[[], Awaitable[object]] | None = None) -> None:
        self._app_name, self._name, self._timeout = app_name, name, timeout
        self._cm, self._stop = cm, stop

    async def __call__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                       tb: TracebackType | None) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                if self._cm is not None:
                    await self._cm.__aexit__(exc_type, exc, tb)
                elif self._stop is not None:
                    await self._stop()
        except TimeoutError:
            logger.warning("app=%s sink %s did not stop within %.1fs; leaving it",
                           self._app_name, self._name, self._timeout)
        except Exception:
            if exc is None:
                raise
            logger.exception("app=%s sink %s failed to stop (the app is stopping on %r)",
                             self._app_name, self._name, exc)
        else:
            logger.info("app=%s sink %s stopped", self._app_name, self._name)
        return False  # never swallow the app's error


class _Progress:
    """The app's progress log: a line at least every :data:`PROGRESS_INTERVAL` seconds while it
    works (applied, duplicates, dead letters, lag per input category), and "caught up" when a
    category has been read to its end (at start, and after each stretch of work of more than
    one interval, so that a trickle of events does not log a line per event)."""

    def __init__(self, app: str, totals: Callable[[], str]) -> None:
        self._app = app
        self._totals = totals
        self._logged = time.monotonic()
        self._busy_since: dict[str, float] = {}  # category -> when it last found work
        self._caught_up: set[str] = set()

    def note(self, category: str, worked: bool, caught_up: bool) -> None:
        now = time.monotonic()
        if worked:
            self._busy_since.setdefault(category, now)
            if now - self._logged >= PROGRESS_INTERVAL:
                self._logged = now
                logger.info("app=%s progress %s", self._app, self._totals())
            return
        if not caught_up:
            return
        since = self._busy_since.pop(category, None)
        first = category not in self._caught_up
        if first or (since is not None and now - since >= PROGRESS_INTERVAL):
            self._caught_up.add(category)
            logger.info("app=%s category=%s caught up: %s", self._app, category, self._totals())


class _Session:
    """One run: the open state, the client and the consumers."""

    def __init__(self, app: App, stores: list[LevelDBStore], client: Client,
                 split: StaticSplit, *, group: GroupConfig | None = None,
                 presence: Presence | None = None) -> None:
        self.app = app
        self._presence = presence
        self._stores = stores
        self._group_config = group
        self.config = app.config
        self._client = client
        self._split = split
        self._group = split.group(app.name)
        self._lock = asyncio.Lock()
        self._consumers: dict[str, Consumer] = {}
        self._handler_of: dict[str, str] = {}  # stream category -> its processor's category
        self._hop_consumers: list[Consumer] = []
        self._hops: list[Repartitioner] = []
        self._progress = _Progress(app.name, self._totals)
        self._group_mode: GroupMode | None = None  # through etcd: set once it runs
        io = self._io = BusIO(app, client, self._consumers)
        self._parts = io.partitions = PartitionSet(app, stores, io,
                                                   owned=() if group is not None
                                                   else split.owned(app.partitions),
                                                   changelog_bus=io)

    async def load(self) -> None:
        await self._parts.load()

    @property
    def engines(self) -> list[Engine]:
        return self._parts.engines

    def _totals(self) -> str:
        engines = [self._parts.engines[i] for i in self._parts.owned]
        lag = {c: consumer.backlog_bytes() for c, consumer in self._consumers.items()}
        return (f"applied={sum(e.applied for e in engines)} "
                f"duplicates={sum(e.duplicates for e in engines)} "
                f"dead_lettered={sum(e.dead_lettered for e in engines)} lag_bytes="
                + ",".join(f"{c}:{n}" for c, n in sorted(lag.items())))

    def monitor(self) -> AppMonitor:
        """The app's ``/metrics`` over this run's checkpoints and consumers (those of the
        partitions owned at each scrape: through etcd they move)."""
        return AppMonitor(self.app.name, self.app.partitions, self._parts.owned_checkpoints(),
                          lambda: self._consumers, failing=self._failing)

    def _failing(self) -> Mapping[int, int]:
        group = self._group_mode
        return group.failing() if group is not None else {}

    async def close(self) -> None:
        for consumer in [*self._consumers.values(), *self._hop_consumers]:
            await consumer.stop()
        self._consumers.clear()
        self._hop_consumers.clear()

    async def work_until(self, stop: asyncio.Event) -> None:
        work = asyncio.create_task(self._work(stop), name=f"app-{self.app.name}")
        stopped = asyncio.create_task(stop.wait(), name=f"app-{self.app.name}-stop")
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                logger.info("app=%s stopping: finishing the batch", self.app.name)
                await asyncio.wait({work}, timeout=self.config.stop_timeout)
                if not work.done():
                    logger.warning("app=%s batch did not finish in %.1fs; abandoning it "
                                   "(it is processed again on restart)", self.app.name,
                                   self.config.stop_timeout)
        finally:
            for task in (work, stopped):
                task.cancel()
            await asyncio.wait({work, stopped})
        if work.cancelled() or work.exception() is not None:
            # Whatever the unfinished batch staged is dropped; it is read again on restart.
            self._parts.discard()
        if not work.cancelled() and (exc := work.exception()) is not None:
            raise exc

    async def _work(self, stop: asyncio.Event) -> None:
        parts, client = self._parts, self._client
        if self._group_config is not None:
            await self._work_group(self._group_config, stop)
            return
        await parts.send_outbox()  # what the previous run committed but did not send
        for plan in await plan_inputs(self.app, client):
            # A partitioned input: stream i is partition i; with a static split an instance
            # reads (and its group holds back) only its own partitions' streams.
            partitioned = len(plan.streams) == self.app.partitions > 1
            for index, stream in enumerate(plan.streams):
                if partitioned and not self._split.owns(index):
                    continue
                self._handler_of[stream] = plan.handler
                await self._register(stream, mine_only=partitioned)
                saved = parts.resume_positions(stream)
                self._consumers[stream] = client.consumer(
                    stream,
                    group=self._group,
                    positions={owner: Position(chunk, off)
                               for owner, (chunk, off) in saved.items()},
                    max_batch_bytes=self.config.max_batch_bytes,
                )
            for source in plan.sources:
                await self._register(source)
                consumer = client.consumer(source, group=self._group,
                                           max_batch_bytes=self.config.max_batch_bytes)
                self._hop_consumers.append(consumer)
                self._hops.append(Repartitioner(self.app, client, consumer, source=source,
                                                target=plan.target,
                                                partitions=self.app.partitions,
                                                owned=self._parts.owned,
                                                handler=plan.handler))
        try:
            async with asyncio.TaskGroup() as tg:
                for category, consumer in self._consumers.items():
                    tg.create_task(self._consume_loop(category, consumer, stop),
                                   name=f"app-{self.app.name}-{category}")
                if self.app.timers or self.app.key_timer is not None:
                    tg.create_task(self._timer_loop(stop), name=f"app-{self.app.name}-timers")
                for hop in self._hops:
                    tg.create_task(self._repartition_loop(hop, stop),
                                   name=f"app-{self.app.name}-repartition-{hop.source}")
                if self._presence is not None:
                    tg.create_task(self._presence.watch(self._lock, stop),
                                   name=f"app-{self.app.name}-presence")
        except BaseExceptionGroup as group:
            # One failure (ProcessorError, StateLockedError...) is what the caller wants to see.
            raise_single(group)

    async def _work_group(self, config: GroupConfig, stop: asyncio.Event) -> None:
        """Instances through etcd (:mod:`chukcha.processors.group`): partition ``p`` reads
        stream ``p`` of every (partitioned) input."""
        streams: dict[int, list[str]] = {p: [] for p in range(self.app.partitions)}
        hops: list[PartitionLoop] = []
        for plan in await plan_inputs(self.app, self._client):
            for p, stream in enumerate(plan.streams):
                self._handler_of[stream] = plan.handler
                await self._register(stream, mine_only=True)
                streams[p].append(stream)
            for source in plan.sources:
                # Not partitioned with the app's count: the hop copies it into the app's own
                # partitioned category, on the instance that owns partition 0.
                await self._register(source)
                hops.append(functools.partial(self._hop_while_owned, source, plan))
        group = self._group_mode = GroupMode(
            self.app, config, parts=self._parts, stores=list(self._stores),
            client=self._client, lock=self._lock, consumers=self._consumers, streams=streams,
            consume_loop=self._consume_loop, bus=self._io, with_partition={0: hops})
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(group.run(stop), name=f"app-{self.app.name}-group")
                if self.app.timers or self.app.key_timer is not None:
                    # The owned partitions' timers (the set changes as partitions move).
                    tg.create_task(self._timer_loop(stop), name=f"app-{self.app.name}-timers")
                if self._presence is not None:
                    tg.create_task(self._presence.watch(self._lock, stop),
                                   name=f"app-{self.app.name}-presence")
        except BaseExceptionGroup as errors:
            raise_single(errors)

    async def _hop_while_owned(self, source: str, plan: InputPlan, stop: asyncio.Event,
                               epoch: int) -> None:
        """The repartition hop of ``source`` while this instance owns partition 0 (through
        etcd) at ``epoch``: until ``stop`` (the partition revoked or lost), its last batch
        written and acked first. Its acks are fenced by partition 0's claim (a node refuses
        an app's unfenced acks while it holds claims)."""
        consumer = self._client.consumer(source, group=self._group,
                                         max_batch_bytes=self.config.max_batch_bytes,
                                         fence=(0, epoch))
        hop = Repartitioner(self.app, self._client, consumer, source=source, target=plan.target,
                            partitions=self.app.partitions, handler=plan.handler)
        logger.info("app=%s repartitioning %s into %s here (this instance owns partition 0)",
                    self.app.name, source, plan.target)
        try:
            await self._repartition_loop(hop, stop)
        finally:
            await consumer.stop()

    async def _register(self, category: str, *, mine_only: bool = False) -> None:
        # On every node, so that no node drops chunks this group has not acked yet; with a
        # split, every instance's group (so that none loses input before it first runs),
        # except on a partition's stream, which only its owner reads.
        groups = [self._group] if mine_only else self._split.groups(self.app.name)
        try:
            for group in groups:
                await self._client.register_group(category, group)
        except ClientError as exc:
            logger.warning("app=%s registering group on every node failed (the consumer "
                           "registers on the node it reads): %s", self.app.name, exc)

    async def _repartition_loop(self, hop: Repartitioner, stop: asyncio.Event) -> None:
        """Copy the hop's input until ``stop``; a batch being copied is finished first."""
        consumer, timeout = hop.consumer, self.config.read_timeout
        stopped = asyncio.create_task(stop.wait())
        read = asyncio.create_task(consumer.read(timeout=timeout))
        try:
            while not stop.is_set():
                await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break
                batches = read.result()
                # Read ahead while this batch is written (never acked before it is written).
                read = asyncio.create_task(consumer.read(timeout=timeout))
                if batches:
                    await hop.step(batches)  # its writes go on while the next is read
                else:
                    await hop.ack()
            await hop.ack()  # the batch being copied is finished
        finally:
            for task in (read, stopped):
                task.cancel()
            await asyncio.wait([read, stopped])
            await hop.cancel()  # only left on an error: not acked, resent after a restart
            logger.info("app=%s repartitioned %d events of %s into %s", self.app.name,
                        hop.events, hop.source, hop.target)

    async def _consume_loop(self, category: str, consumer: Consumer, stop: asyncio.Event) -> None:
        timeout = self.config.read_timeout
        name = f"app-{self.app.name}-{category}"
        stopped = asyncio.create_task(stop.wait(), name=f"{name}-stop")
        read: asyncio.Task[list[Batch]] | None = None
        try:
            while not stop.is_set():
                if read is None:
                    read = asyncio.create_task(consumer.read(timeout=timeout), name=f"{name}-read")
                await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break  # stopping while idle: no batch to finish
                batches = read.result()
                # Read ahead: the next batches arrive while this one is processed and committed
                # (a read-ahead batch that is never processed is simply read again later).
                read = asyncio.create_task(consumer.read(timeout=timeout), name=f"{name}-read")
                async with self._lock:
                    if batches:
                        await self._step(category, batches)
                    else:
                        await self._parts.idle()
                self._progress.note(category, bool(batches), consumer.caught_up)
                # If `stop` was set while the batch was processed, the loop ends here: after
                # the commit and the acks, never in the middle of a batch.
        finally:
            for task in (read, stopped):
                if task is not None:
                    task.cancel()
            await asyncio.wait([t for t in (read, stopped) if t is not None])
            if read is not None and not read.cancelled() and read.exception() is not None:
                # A read-ahead that failed while we stopped: its batch is read again later.
                logger.debug("app=%s category=%s read-ahead failed: %r", self.app.name,
                             category, read.exception())

    async def _timer_loop(self, stop: asyncio.Event) -> None:
        """Run the partitions' due timers (wall clock), under the same lock as the batches,
        and commit them. Looks again at least every second (a timer scheduled by an event
        runs within about a second of its time)."""
        parts = self._parts
        while not stop.is_set():
            due = parts.next_timer()
            now = time.time()
            if due is not None and due <= now:
                async with self._lock:
                    ran = await parts.fire_timers(time.time())
                    if ran:
                        await parts.commit()
                if ran:
                    continue
                due = None  # stored timers without a handler (removed from the app): idle
            wait = _TIMER_TICK if due is None else min(_TIMER_TICK, due - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _step(self, category: str, batches: list[Batch]) -> None:
        parts = self._parts
        parts.note_streams(category, frozenset(self._consumers[category].positions()))
        handler = self._handler_of.get(category)
        for b in batches:
            await parts.process(category, b.owner, b.chunk, b.offset, b.data,
                                handler=None if handler == category else handler)
        await parts.commit()

    async def finish(self) -> None:
        """After the loops: commit what is left, sync, ack."""
        async with self._lock:
            await self._parts.finish()
