"""One partition's commit protocol, in one object that the runner and the tester both drive.

After a batch was staged by the partition's :class:`~chukcha.processors.engine.Engine`,
:meth:`Checkpoint.commit` does, in this order and nowhere else:

1. flush the sink rows of the applied events (retried with backoff until they succeed);
2. write ONE batch to the partition's store: table + dedup + positions + outbox;
3. fsync it per the policy (``StateConfig.sync_interval``);
4. with a changelog, publish the commit's record (confirmed) first; then send the outbox
   (retried), scheduling its keys for deletion in the next commit;
5. ack, through :class:`CheckpointIO`, what lies wholly before the committed positions, but
   only once they are fsync'ed (or the policy never fsyncs).

A crash anywhere loses nothing: the next start resumes at the committed positions, resends the
committed-but-unsent outbox (:meth:`Checkpoint.send_outbox`), and the dedup index skips what
was applied. Where the effects go (the bus, or the tester's lists) is the :class:`CheckpointIO`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from chukcha.processors.changelog import Changelog
from chukcha.processors.config import ProcessorConfig
from chukcha.processors.engine import Engine
from chukcha.state.base import StateStore

__all__ = ["COMMIT_BUCKETS", "Checkpoint", "CheckpointIO", "OwnershipUnproven"]

logger = logging.getLogger(__name__)

_PROGRESS_INTERVAL: Final = 5.0
COMMIT_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                         2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the commit-latency histogram (:attr:`Checkpoint.commit_seconds`)."""


class CheckpointIO(Protocol):
    """The effects of a commit: the runner's bus and sinks, or the tester's lists."""

    async def flush(self, sink: str, rows: list[Any]) -> None:
        """Write ``rows`` to sink ``sink`` (raise to be retried with the same rows)."""
        ...

    async def send(self, category: str, lines: list[bytes]) -> None:
        """Send emitted events (JSON lines) to ``category`` (raise to be retried)."""
        ...

    async def ack(self, checkpoint: Checkpoint, *, force: bool) -> None:
        """Ack the input wholly before ``checkpoint.engine.positions`` (durable when called).
        ``force``: even if those positions were acked already (a chunk may have completed)."""
        ...


class OwnershipUnproven(Exception):
    """A partition's owner could not prove its ownership before sending (its lease expired
    while it was paused) and the partition was stopped: its loop ends quietly."""


class Checkpoint:
    """The commit protocol of one partition: its engine (staging), its store, its fsync state.

    Args:
        engine: the partition's engine (it stages batches).
        store: the partition's store (the engine's).
        io: where flushes, emits and acks go.
        config: retry delays and the fsync policy.
        name: for logs (``app`` or ``app/p003``).
    """

    def __init__(self, engine: Engine, store: StateStore, io: CheckpointIO,
                 config: ProcessorConfig, *, name: str,
                 changelog: Changelog | None = None) -> None:
        self.engine = engine
        self.changelog = changelog
        """State on the bus (:mod:`chukcha.processors.changelog`): each fsync'ed commit is
        published there before any input past it is acked; an empty store is restored from it."""
        self.store = store
        self._io = io
        self._config = config
        self.name = name
        self._last_sync = 0.0
        self.unsynced = False
        """A commit was written without fsync: its positions must not be acked yet."""
        self.commits = 0
        self.commit_seconds = [0] * (len(COMMIT_BUCKETS) + 1)
        """Commit durations (write batch + fsync) per :data:`COMMIT_BUCKETS` bucket (not
        cumulative; the last one: slower than all)."""
        self.commit_seconds_sum = 0.0
        self._progress_at = time.monotonic()
        self.owner_proof: Callable[[], Awaitable[bool]] | None = None
        """Set by an instance through etcd: True once its ownership of the partition is
        proven (at once while its lease is), False once the partition is stopped first."""

    async def load(self, *, engine_loaded: bool = False) -> None:
        """Read the partition's dedup index, positions and unsent outbox (after restoring an
        empty store from its changelog, with one); ``engine_loaded``: the engine holds them
        already (a standby's warm engine)."""
        if self.changelog is not None:
            await self.changelog.restore_if_empty(self.store)
            await asyncio.to_thread(self.changelog.load, self.store)
        if not engine_loaded:
            await asyncio.to_thread(self.engine.load)

    async def commit(self) -> None:
        """Steps 1-5 for everything staged since the last commit."""
        await self.flush_sinks()
        await self._write(self._sync_due())
        await self.send_outbox()
        if not self.unsynced:  # fsync'ed (or the policy never fsyncs): the acks may follow
            await self._ack(force=False)

    async def idle(self) -> None:
        """Nothing new to process: fsync a pending commit (then ack), or ack what is due (a
        chunk may have completed meanwhile, or a predecessor committed but died before
        acking)."""
        if self.unsynced:
            await self.sync()
        else:
            await self._ack(force=True)

    async def sync(self) -> None:
        """fsync the store now, then ack."""
        await asyncio.to_thread(self.store.write, {}, (), sync=True)
        self._last_sync = time.monotonic()
        self.unsynced = False
        await self._ack(force=False)

    async def finish(self) -> None:
        """At a graceful stop: commit what is staged (fsync'ed unless the policy never
        fsyncs), or fsync a pending commit, then ack. A failing ack is the IO's to report: the
        positions are committed, the next start acks again."""
        if self.engine.has_staged:
            await self.flush_sinks()  # flush before commit, always (normally nothing left)
            await self._write(sync=self._config.state.sync_interval is not None)
        elif self.unsynced:
            await asyncio.to_thread(self.store.write, {}, (), sync=True)
            self.unsynced = False
        await self._ack(force=False)

    async def _ack(self, *, force: bool) -> None:
        """Step 5, after publishing the committed changelog records (retried until they are
        confirmed): an ack never precedes the bus holding the state it covers."""
        await self._publish_changelog()
        await self._io.ack(self, force=force)

    async def _publish_changelog(self) -> None:
        """Publish the committed changelog records (retried until they are confirmed)."""
        changelog = self.changelog
        if changelog is not None and changelog.unpublished:
            await self._prove_owner()
            await self.retry(f"changelog publish to {changelog.category!r}", changelog.publish)

    async def _prove_owner(self) -> None:
        """Before anything leaves as the partition's owner: with an :attr:`owner_proof` (an
        instance through etcd), wait until the ownership is proven; when it cannot be (the
        partition is stopped first), raise :class:`OwnershipUnproven`: what was committed stays
        in the local store, unsent."""
        if self.owner_proof is not None and not await self.owner_proof():
            raise OwnershipUnproven(f"app={self.name}: ownership cannot be proven; the "
                                    "committed batch stays unsent")

    async def flush_sinks(self) -> None:
        """Step 1: write the staged sink rows (retried until they succeed)."""
        for name, rows in self.engine.sink_rows.items():
            if rows:
                await self.retry(f"sink {name!r} flush of {len(rows)} rows",
                                 lambda n=name, r=rows: self._io.flush(n, r))  # type: ignore[misc]

    async def send_outbox(self) -> None:
        """Step 4: send the committed outbox (also what a previous run left unsent); with a
        changelog, only once the bus holds the commits the emits come from (fsync'ed ones): a
        partition rebuilt from the bus must never emit an ID already sent with other content."""
        if not self.unsynced:
            await self._publish_changelog()
        engine = self.engine
        for entry in list(engine.outbox):
            await self._prove_owner()
            await self.retry(f"emit of {len(entry.lines())} events to {entry.category!r}",
                             lambda e=entry: self._io.send(e.category, e.lines()))  # type: ignore[misc]
            engine.outbox_sent(entry)

    def _sync_due(self) -> bool:
        interval = self._config.state.sync_interval
        if interval is None:
            return False
        return interval == 0 or time.monotonic() - self._last_sync >= interval

    async def _write(self, sync: bool) -> None:
        """Steps 2-3: one write batch, fsync'ed when ``sync``."""
        engine, store, changelog = self.engine, self.store, self.changelog
        started = time.perf_counter()
        plan = engine.prepare()
        puts, deletes = plan.puts, plan.deletes
        done_deletes: list[bytes] = []
        if changelog is not None:
            extra, done_deletes = changelog.stage(plan)
            puts, deletes = {**plan.puts, **extra}, [*plan.deletes, *done_deletes]
        write = asyncio.ensure_future(asyncio.to_thread(store.write, puts, deletes, sync=sync))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The write cannot be interrupted; wait for it so the state and memory agree.
            with contextlib.suppress(Exception):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                engine.committed()
                if changelog is not None:
                    changelog.committed()
            elif changelog is not None:
                changelog.discard(done_deletes)
            raise
        except BaseException:
            engine.discard()
            if changelog is not None:
                changelog.discard(done_deletes)
            raise
        engine.committed()
        if changelog is not None:
            changelog.committed()
        self.commits += 1
        took = time.perf_counter() - started
        self.commit_seconds[bisect_left(COMMIT_BUCKETS, took)] += 1
        self.commit_seconds_sum += took
        if sync:
            self._last_sync = time.monotonic()
            self.unsynced = False
        else:
            self.unsynced = self._config.state.sync_interval is not None
        logger.debug("app=%s commit events=%d sync=%s", self.name, plan.events, sync)
        if (now := time.monotonic()) - self._progress_at >= _PROGRESS_INTERVAL:
            self._progress_at = now
            e = self.engine
            logger.info("app=%s applied=%d duplicates=%d dead_lettered=%d undecodable=%d "
                        "commits=%d dedup_ids=%d dedup_pruned_young=%d positions=%s", self.name,
                        e.applied, e.duplicates, e.dead_lettered, e.undecodable, self.commits,
                        len(e.dedup), e.dedup.pruned_young, e.positions)

    async def retry(self, what: str, fn: Callable[[], Awaitable[object]]) -> None:
        """Await ``fn()`` until it succeeds, with backoff; an error whose class says it is not
        retriable (``retriable = False``, e.g. :class:`~chukcha.errors.MessageTooLargeError`)
        is raised at once: retrying it would block the app forever at the same place."""
        cfg = self._config
        delay = cfg.retry_initial
        attempt = 1
        while True:
            try:
                await fn()
            except Exception as exc:  # a user's sink may raise anything
                if not getattr(exc, "retriable", True):
                    logger.error("app=%s %s failed (attempt %d), not retriable: %r",  # noqa: TRY400
                                 self.name, what, attempt, exc)
                    raise
                logger.warning("app=%s %s failed (attempt %d), retrying in %.1fs: %r",
                               self.name, what, attempt, delay, exc)
            else:
                return
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
            delay = min(delay * 2, cfg.retry_max)
            attempt += 1
