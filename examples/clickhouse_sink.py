"""Idempotent ClickHouse sink: orders from the bus into a ``ReplacingMergeTree``.

The processor stages one row per applied order (``ctx.to_sink("clickhouse", row)``); the framework
calls :meth:`ClickHouseSink.flush` with the batch's rows *before* it commits its state and acks,
and calls it again with the same rows if it fails or if the process dies before the commit. So a
row can reach ClickHouse more than once, never zero times. The table makes that harmless: it is a
``ReplacingMergeTree(version) ORDER BY (id)``, keyed by the event ID, so copies of one event
collapse into one row (the one with the highest ``version``) when parts merge, and queries with
``FINAL`` see the collapsed result at once::

    SELECT count(), sum(amount) FROM orders FINAL

Run it (a node on 127.0.0.1:8080 and ClickHouse on 127.0.0.1:8123 by default)::

    CLICKHOUSE_URL=http://127.0.0.1:8123 python -m examples.clickhouse_sink
    # or: chukcha run examples.clickhouse_sink:app

Environment: ``CHUKCHA_NODES`` (comma-separated node URLs), ``CHUKCHA_STATE_DIR``,
``CHUKCHA_CATEGORY`` (default ``orders``), ``CHUKCHA_BATCH_BYTES`` (most bytes read per stream
and batch), ``CLICKHOUSE_URL``, ``CLICKHOUSE_TABLE`` (default ``orders``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson

from chukcha.processors import App, Context, ErrorPolicy, ProcessorConfig, Sink

__all__ = [
    "ClickHouseInsertError",
    "ClickHouseSink",
    "ClickHouseSinkStats",
    "app",
    "build_app",
    "main",
    "order_row",
    "orders_sink",
    "orders_table_ddl",
]

logger = logging.getLogger(__name__)

_TABLE_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def orders_table_ddl(table: str) -> str:
    """The orders table: one row per event ID; the highest ``version`` wins.

    Old servers (Debian's 18.16) need this exact form: ``ENGINE = ReplacingMergeTree(version)``
    with an ``ORDER BY`` clause and no ``PRIMARY KEY`` / ``SETTINGS``.
    """
    _check_table(table)
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "id String, version UInt64, customer String, amount Int64"
        ") ENGINE = ReplacingMergeTree(version) ORDER BY (id)"
    )


def order_row(order: Mapping[str, Any]) -> dict[str, Any]:
    """The row staged for one order event (``id`` is the event ID the producer assigned).

    Raises:
        ValueError: the order has no ``id``, no ``customer`` or a non-integer ``amount``.
    """
    event_id, customer, amount = order.get("id"), order.get("customer"), order.get("amount")
    version = order.get("version", 0)
    _require(isinstance(event_id, str) and bool(event_id), "order without an event id", order)
    _require(isinstance(customer, str), "order without a customer", order)
    _require(_is_int(amount), "order amount is not an integer", order)
    _require(_is_int(version) and version >= 0,
             "order version is not a non-negative integer", order)
    return {"id": event_id, "version": version, "customer": customer, "amount": amount}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, problem: str, order: Mapping[str, Any]) -> None:
    if not ok:
        raise ValueError(f"{problem}: {dict(order)!r}")


def _check_table(table: str) -> None:
    if not _TABLE_NAME.match(table):
        raise ValueError(f"bad table name {table!r}: expected [db.]name of [A-Za-z0-9_]")


class ClickHouseInsertError(RuntimeError):
    """ClickHouse refused a statement; ``status`` is its HTTP status. The flush is retried."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ClickHouseSinkStats:
    """Counters of one sink: flushes that reached ClickHouse, rows sent, seconds in ``INSERT``."""

    flushes: int
    rows: int
    insert_seconds: float


class ClickHouseSink:
    """Writes staged rows to one ClickHouse table, one ``INSERT ... FORMAT JSONEachRow`` per flush.

    ``async with ClickHouseSink(...)`` (or :meth:`start` / :meth:`stop`) keeps one HTTP session
    open; a sink that was not started opens a session per flush. ``create_sql`` (if given) runs
    once, before the first insert.
    """

    def __init__(
        self,
        url: str,
        table: str,
        *,
        create_sql: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        _check_table(table)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url.rstrip("/")
        self.table = table
        self._create_sql = create_sql
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._start_lock = asyncio.Lock()
        self._table_ready = create_sql is None
        self._flushes = 0
        self._rows = 0
        self._insert_seconds = 0.0

    @property
    def stats(self) -> ClickHouseSinkStats:
        return ClickHouseSinkStats(self._flushes, self._rows, self._insert_seconds)

    async def start(self) -> None:
        """Open the HTTP session and create the table (idempotent)."""
        async with self._start_lock:
            if self._session is not None:
                return
            session = aiohttp.ClientSession()
            try:
                await self._ensure_table(session)
            except BaseException:
                await session.close()
                raise
            self._session = session
            logger.info("clickhouse sink started url=%s table=%s", self.url, self.table)

    async def stop(self) -> None:
        """Close the HTTP session (idempotent)."""
        if (session := self._session) is None:
            return
        self._session = None
        await session.close()
        logger.info("clickhouse sink stopped url=%s table=%s", self.url, self.table)

    async def __aenter__(self) -> ClickHouseSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def flush(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` in one statement. Raises on any failure so that the framework retries
        the same rows; sending them twice is harmless (the table collapses equal IDs)."""
        if not rows:
            return
        body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        params = {"query": f"INSERT INTO {self.table} FORMAT JSONEachRow"}
        started = time.perf_counter()
        if (session := self._session) is not None:
            await self._post(session, body, params)
        else:
            # Not started (a runner that does not manage sink lifecycles): a session for this
            # flush only, so nothing is left open when the process ends.
            async with aiohttp.ClientSession() as session:
                await self._ensure_table(session)
                started = time.perf_counter()
                await self._post(session, body, params)
        self._insert_seconds += time.perf_counter() - started
        self._flushes += 1
        self._rows += len(rows)
        logger.debug("clickhouse insert table=%s rows=%d", self.table, len(rows))

    async def _ensure_table(self, session: aiohttp.ClientSession) -> None:
        if not self._table_ready and self._create_sql is not None:
            await self._post(session, self._create_sql.encode(), {})
            self._table_ready = True

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, params: Mapping[str, str]
    ) -> str:
        async with (
            asyncio.timeout(self._timeout),
            session.post(self.url, params=params, data=body) as resp,
        ):
            text = await resp.text()
            if resp.status != 200:
                raise ClickHouseInsertError(text.strip(), status=resp.status)
            return text


def build_app(
    nodes: Sequence[str],
    state_dir: str,
    sink: Sink,
    *,
    category: str = "orders",
    config: ProcessorConfig | None = None,
) -> App:
    """The example app: every applied order becomes one row for ``sink`` (normally a
    :class:`ClickHouseSink` for the orders table).

    Orders that are not valid (no ``id``, no ``customer``, a non-integer ``amount``) go to the
    dead-letter category instead of stopping the app.
    """
    cfg = replace(config or ProcessorConfig(), on_error=ErrorPolicy.DEAD_LETTER)
    the_app = App("clickhouse-orders", nodes=nodes, state_dir=state_dir, config=cfg)
    the_app.add_sink("clickhouse", sink)

    @the_app.processor(category)
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        # Only events applied for the first time get here (the framework drops duplicates by
        # event ID); rows of a batch that crashed before its commit are flushed again on
        # restart, and the ReplacingMergeTree collapses them.
        ctx.to_sink("clickhouse", order_row(order))

    return the_app


def orders_sink(clickhouse_url: str, table: str = "orders") -> ClickHouseSink:
    """A sink for the orders table that creates the table when it starts."""
    return ClickHouseSink(clickhouse_url, table, create_sql=orders_table_ddl(table))


def _from_env() -> tuple[App, ClickHouseSink]:
    env = os.environ
    config = ProcessorConfig()
    if batch := env.get("CHUKCHA_BATCH_BYTES"):
        config = replace(config, max_batch_bytes=int(batch))
    the_sink = orders_sink(env.get("CLICKHOUSE_URL", "http://127.0.0.1:8123"),
                           env.get("CLICKHOUSE_TABLE", "orders"))
    the_app = build_app(
        [n.strip() for n in env.get("CHUKCHA_NODES", "http://127.0.0.1:8080").split(",")
         if n.strip()],
        env.get("CHUKCHA_STATE_DIR", "./clickhouse-orders-state"),
        the_sink,
        category=env.get("CHUKCHA_CATEGORY", "orders"),
        config=config,
    )
    return the_app, the_sink


app, sink = _from_env()


async def main() -> None:
    """Run :data:`app` until SIGINT or SIGTERM, with the sink's session open around it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sink:
        await app.run_async(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main())
