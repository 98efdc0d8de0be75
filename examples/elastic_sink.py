"""Idempotent Elasticsearch sink: the "entity changed" pattern.

Events on the bus carry only *which* entity changed (``{"id": <event id>, "product_id": "p7"}``),
never its new contents. The sink looks the entity up in the source of truth (here a SQLite table,
:class:`ProductCatalog`) at flush time and bulk-indexes what it finds with ``_id`` = the entity
ID, or deletes the document when the entity was deleted. So:

- a replayed or duplicated event re-indexes the same current document: harmless;
- events that arrive out of order still index the *current* version, whichever comes last;
- each document carries the entity's ``version`` as an external version (``external_gte``): a
  flush that read an older version than one already indexed (a slow sink racing a newer one) is
  refused by Elasticsearch with a 409, which the sink counts as done, so the index never goes
  back in time.

The framework calls :meth:`ElasticsearchSink.flush` before it commits and acks, and calls it
again with the same entity IDs if it fails, so every change reaches the index at least once.

Run it against Elasticsearch 8 (or ``examples.es_standin`` in tests)::

    ELASTIC_URL=http://127.0.0.1:9200 PRODUCTS_DB=./products.sqlite3 \\
        python -m examples.elastic_sink        # or: chukcha run examples.elastic_sink:app

Environment: ``CHUKCHA_NODES``, ``CHUKCHA_STATE_DIR``, ``CHUKCHA_CATEGORY`` (default
``product-changes``), ``ELASTIC_URL``, ``ELASTIC_INDEX`` (default ``products``),
``ELASTIC_API_KEY`` (optional: sent as ``Authorization: ApiKey ...``), ``PRODUCTS_DB``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import orjson

from chukcha.processors import App, Context, ErrorPolicy, ProcessorConfig

__all__ = [
    "ElasticsearchBulkError",
    "ElasticsearchSink",
    "Entity",
    "EntitySource",
    "ProductCatalog",
    "app",
    "build_app",
    "entity_id_of",
    "main",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entity:
    """One entity as the source of truth has it now: ``version`` grows with every change,
    deletion included (``document`` is None for a deleted entity)."""

    id: str
    version: int
    document: Mapping[str, Any] | None


class EntitySource(Protocol):
    """The source of truth the sink reads at flush time."""

    async def fetch(self, ids: Sequence[str]) -> Mapping[str, Entity]:
        """The current version of each entity it knows (IDs it never had: left out)."""
        ...


def entity_id_of(event: Mapping[str, Any], field: str = "product_id") -> str:
    """The entity ID an "entity changed" event carries.

    Raises:
        ValueError: the event has no non-empty string ``field``.
    """
    value = event.get(field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"event without a {field}: {dict(event)!r}")
    return value


class ProductCatalog:
    """The source of truth of the example: a SQLite table
    ``products(id, version, name, price, deleted)``.

    Every write, deletion included, bumps the product's ``version`` in the same transaction;
    deletion only marks the row, so a product deleted and created again continues its version
    sequence (the index refuses versions lower than one it has seen). All SQLite calls run in a
    worker thread (they block), each on its own short-lived connection.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def _create(self) -> None:
        conn = self._connect()
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS products (id TEXT PRIMARY KEY, "
                "version INTEGER NOT NULL, name TEXT NOT NULL, price INTEGER NOT NULL, "
                "deleted INTEGER NOT NULL DEFAULT 0)"
            )
        finally:
            conn.close()

    async def create(self) -> None:
        """Create the table if it does not exist."""
        await asyncio.to_thread(self._create)

    def _put(self, product_id: str, name: str, price: int) -> int:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT version FROM products WHERE id = ?", (product_id,)
            ).fetchone()
            version = (row[0] if row else 0) + 1
            conn.execute(
                "INSERT OR REPLACE INTO products (id, version, name, price, deleted) "
                "VALUES (?, ?, ?, ?, 0)",
                (product_id, version, name, price),
            )
            conn.execute("COMMIT")
            return int(version)
        finally:
            conn.close()

    async def put(self, product_id: str, name: str, price: int) -> int:
        """Create or change a product; returns its new version."""
        return await asyncio.to_thread(self._put, product_id, name, price)

    def _remove(self, product_id: str) -> None:
        conn = self._connect()
        try:
            conn.execute(
                "UPDATE products SET deleted = 1, version = version + 1 "
                "WHERE id = ? AND deleted = 0",
                (product_id,),
            )
        finally:
            conn.close()

    async def remove(self, product_id: str) -> None:
        """Delete a product (its document is deleted from the index by the next flush)."""
        await asyncio.to_thread(self._remove, product_id)

    def _fetch(self, ids: Sequence[str]) -> dict[str, Entity]:
        conn = self._connect()
        try:
            found: dict[str, Entity] = {}
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                part = ids[start:start + 500]
                # Only "?" placeholders are formatted into the statement.
                marks = ",".join("?" * len(part))
                sql = f"SELECT id, version, name, price, deleted FROM products WHERE id IN ({marks})"  # noqa: S608, E501
                for pid, version, name, price, deleted in conn.execute(sql, tuple(part)):
                    doc = None if deleted else {"name": name, "price": price, "version": version}
                    found[pid] = Entity(pid, version, doc)
            return found
        finally:
            conn.close()

    async def fetch(self, ids: Sequence[str]) -> Mapping[str, Entity]:
        return await asyncio.to_thread(self._fetch, list(ids))


class ElasticsearchBulkError(RuntimeError):
    """Elasticsearch refused a bulk request or some of its items; the flush is retried.

    ``reasons`` holds up to ten item errors (``"<_id>: <type>: <reason>"``).
    """

    def __init__(self, message: str, *, status: int, reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.reasons = list(reasons)


class ElasticsearchSink:
    """Indexes the current version of each changed entity, one ``_bulk`` request per flush.

    Rows staged for this sink are entity IDs. ``async with`` (or :meth:`start` / :meth:`stop`)
    keeps one HTTP session open; a sink that was not started opens a session per flush. The
    index is created (with ``mappings`` if given) before the first request, unless it exists.
    """

    def __init__(
        self,
        url: str,
        index: str,
        source: EntitySource,
        *,
        mappings: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        # The URL-breaking part of Elasticsearch's index-name rules; it checks the rest itself.
        if (not index or index != index.lower() or index.startswith(("_", "-", "+"))
                or any(c in index for c in '/\\#? ,"')):
            raise ValueError(f"bad index name {index!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url = url.rstrip("/")
        self.index = index
        self._source = source
        self._mappings = mappings
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._start_lock = asyncio.Lock()
        self._index_ready = False
        self.stale_skipped = 0  # items refused because a newer version was indexed already

    async def start(self) -> None:
        """Open the HTTP session and create the index unless it exists (idempotent)."""
        async with self._start_lock:
            if self._session is not None:
                return
            session = aiohttp.ClientSession(headers=self._headers)
            try:
                await self._create_index(session)
            except BaseException:
                await session.close()
                raise
            self._session = session
            logger.info("elasticsearch sink started url=%s index=%s", self.url, self.index)

    async def stop(self) -> None:
        """Close the HTTP session (idempotent)."""
        if (session := self._session) is None:
            return
        self._session = None
        await session.close()
        logger.info("elasticsearch sink stopped url=%s index=%s", self.url, self.index)

    async def __aenter__(self) -> ElasticsearchSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _create_index(self, session: aiohttp.ClientSession) -> None:
        if self._index_ready:
            return
        body = {"mappings": dict(self._mappings)} if self._mappings else {}
        async with (
            asyncio.timeout(self._timeout),
            session.put(f"{self.url}/{self.index}", json=body) as resp,
        ):
            answer = await resp.json(content_type=None)
            kind = answer.get("error", {}).get("type") if isinstance(answer, dict) else None
            if resp.status == 200 or (
                resp.status == 400 and kind == "resource_already_exists_exception"
            ):
                self._index_ready = True
                return
            raise ElasticsearchBulkError(f"cannot create index {self.index}: {answer}",
                                         status=resp.status)

    def _bulk_body(self, ids: Sequence[str], current: Mapping[str, Entity]) -> bytes:
        lines: list[bytes] = []
        for entity_id in ids:
            entity = current.get(entity_id)
            meta: dict[str, Any] = {"_index": self.index, "_id": entity_id}
            if entity is None:  # never existed: nothing versioned to protect
                lines.append(orjson.dumps({"delete": meta}))
                continue
            meta |= {"version": entity.version, "version_type": "external_gte"}
            if entity.document is None:
                lines.append(orjson.dumps({"delete": meta}))
            else:
                lines.append(orjson.dumps({"index": meta}))
                lines.append(orjson.dumps(dict(entity.document)))
        return b"\n".join(lines) + b"\n"

    async def flush(self, rows: Sequence[str]) -> None:
        """Index the current version of every entity in ``rows`` (duplicates are sent once).

        Raises:
            ElasticsearchBulkError: the request or an item failed (other than "a newer version
                is indexed already" and "nothing to delete"); the framework retries.
        """
        ids = list(dict.fromkeys(rows))
        if not ids:
            return
        if (session := self._session) is not None:
            answer = await self._bulk(session, ids)
        else:
            # Not started (a runner that does not manage sink lifecycles): a session for this
            # flush only, so nothing is left open when the process ends.
            async with aiohttp.ClientSession(headers=self._headers) as session:
                await self._create_index(session)
                answer = await self._bulk(session, ids)
        self._check_items(answer)
        logger.debug("elasticsearch bulk index=%s entities=%d", self.index, len(ids))

    async def _bulk(self, session: aiohttp.ClientSession, ids: list[str]) -> dict[str, Any]:
        # Read the source of truth right before the request: the fresher, the fewer 409s.
        current = await self._source.fetch(ids)
        body = self._bulk_body(ids, current)
        async with (
            asyncio.timeout(self._timeout),
            session.post(f"{self.url}/_bulk", data=body,
                         headers={"Content-Type": "application/x-ndjson"}) as resp,
        ):
            answer = await resp.json(content_type=None)
            if resp.status != 200 or not isinstance(answer, dict):
                raise ElasticsearchBulkError(f"bulk request failed: {answer}",
                                             status=resp.status)
            return answer

    def _check_items(self, answer: Mapping[str, Any]) -> None:
        if not answer.get("errors"):
            return
        reasons: list[str] = []
        for item in answer.get("items", []):
            (result,) = item.values()
            error = result.get("error")
            if error is None:
                continue
            if error.get("type") == "version_conflict_engine_exception":
                self.stale_skipped += 1  # a newer version is there already: converged
                continue
            reasons.append(f"{result.get('_id')}: {error.get('type')}: {error.get('reason')}")
        if reasons:
            raise ElasticsearchBulkError(
                f"{len(reasons)} bulk items failed, first: {reasons[0]}",
                status=200, reasons=reasons[:10],
            )


def build_app(
    nodes: Sequence[str],
    state_dir: str,
    elastic_url: str,
    catalog: EntitySource,
    *,
    index: str = "products",
    category: str = "product-changes",
    headers: Mapping[str, str] | None = None,
    config: ProcessorConfig | None = None,
) -> tuple[App, ElasticsearchSink]:
    """The example app: each "product changed" event re-indexes that product's current version.

    Events without a ``product_id`` go to ``<category>.dead``.
    """
    cfg = replace(config or ProcessorConfig(), on_error=ErrorPolicy.DEAD_LETTER)
    the_app = App("elastic-products", nodes=nodes, state_dir=state_dir, config=cfg)
    sink = the_app.add_sink("elastic", ElasticsearchSink(
        elastic_url, index, catalog, headers=headers,
        mappings={"properties": {"name": {"type": "text"}, "price": {"type": "long"},
                                 "version": {"type": "long"}}},
    ))

    @the_app.processor(category)
    def on_change(ctx: Context, event: dict[str, Any]) -> None:
        # Only the ID: the sink reads the current version when it flushes the batch.
        ctx.to_sink("elastic", entity_id_of(event))

    return the_app, sink


def _from_env() -> tuple[App, ElasticsearchSink]:
    env = os.environ
    headers = {}
    if api_key := env.get("ELASTIC_API_KEY"):
        headers["Authorization"] = f"ApiKey {api_key}"
    return build_app(
        [n.strip() for n in env.get("CHUKCHA_NODES", "http://127.0.0.1:8080").split(",")
         if n.strip()],
        env.get("CHUKCHA_STATE_DIR", "./elastic-products-state"),
        env.get("ELASTIC_URL", "http://127.0.0.1:9200"),
        ProductCatalog(Path(env.get("PRODUCTS_DB", "./products.sqlite3"))),
        index=env.get("ELASTIC_INDEX", "products"),
        category=env.get("CHUKCHA_CATEGORY", "product-changes"),
        headers=headers,
    )


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
