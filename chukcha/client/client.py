"""The asyncio client: writes with failover, producers, consumers, listings.

``async with Client(["http://127.0.0.1:8080", "http://127.0.0.1:8081"]) as c:``

A write goes to the node that answered last (the first one at start). When it fails or times
out, the *same bytes* (so the same event IDs) are sent to the next node, and so on; the caller
gets :class:`~chukcha.errors.NodeUnavailableError` only when every node has failed, with each
node's error in ``errors``. A 4xx answer is not retried: the request itself is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

import aiohttp

from chukcha.client.consumer import Consumer, ConsumerConfig, Position
from chukcha.client.events import Event, encode_events, event_list, split_bodies
from chukcha.client.http import DEFAULT_TIMEOUT, NodeApi, normalize_url
from chukcha.client.keyed import KeyedProducer, KeyFn, route
from chukcha.client.producer import Producer, ProducerConfig
from chukcha.errors import ClientError, NodeUnavailableError
from chukcha.partitioning import MAX_PARTITIONS, partition_category
from chukcha.protocol import DEFAULT_MAX_BATCH_SIZE, MAX_MESSAGE_SIZE, ChunkInfo, validate_category

__all__ = ["Client", "parse_nodes"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def parse_nodes(nodes: str | Sequence[str]) -> list[str]:
    """Node URLs from a list or a comma-separated string; ``host:port`` gets ``http://``."""
    items = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    urls: list[str] = []
    for item in items:
        if item.strip():
            url = normalize_url(item)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no node URLs given")
    return urls


class Client:
    """A client of a Chukcha cluster (or of one node).

    Args:
        nodes: node URLs (``http://host:port`` or ``host:port``), or one comma-separated string.
        timeout: seconds one request may take before the next node is tried.
        max_batch_bytes: largest write body; bigger sends are split (default 4 MiB, the node's
            default limit).
        session: an aiohttp session to use (not closed by the client); by default the client
            makes its own.
        token: sent as ``Authorization: Bearer <token>`` with every request (nodes started
            with ``--auth-token-file``).
        ssl: the TLS context for ``https://`` nodes (default: the system's trust store).
    """

    def __init__(
        self,
        nodes: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_SIZE,
        session: aiohttp.ClientSession | None = None,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self._nodes = parse_nodes(nodes)
        self._token = token
        self._ssl = ssl
        if max_batch_bytes <= MAX_MESSAGE_SIZE:
            raise ValueError(f"max_batch_bytes must be over {MAX_MESSAGE_SIZE}")
        self._timeout = timeout
        self._max_batch = max_batch_bytes
        self._session = session
        self._own_session = session is None
        self._api_obj: NodeApi | None = None
        self._preferred = 0
        # Weak: a stopped producer or consumer is forgotten; a running one is kept alive by
        # its own tasks.
        self._producers: weakref.WeakSet[Producer] = weakref.WeakSet()
        self._consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()
        self._partition_counts: dict[str, int] = {}
        self._closed = False

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    @property
    def api(self) -> NodeApi:
        """The low-level per-node API (one request to one node, no failover)."""
        if self._closed:
            raise RuntimeError("client is closed")
        if self._api_obj is None:
            if self._session is None:
                # Long polls hold a connection each; the default pool of 100 is plenty.
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300,
                                                   ssl=self._ssl or True)
                )
            self._api_obj = NodeApi(self._session, timeout=self._timeout, token=self._token)
        return self._api_obj

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        _ = self.api

    async def close(self) -> None:
        """Stop this client's producers (flushing them) and consumers; close the session."""
        if self._closed:
            return
        try:
            for p in list(self._producers):
                await p.stop()
        finally:
            for c in list(self._consumers):
                await c.stop()
            self._closed = True
            if self._own_session and self._session is not None:
                await self._session.close()
            self._session = None
            self._api_obj = None

    stop = close

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_session", None) is not None and self._own_session and not self._closed:
            warnings.warn("Client was not closed", ResourceWarning, stacklevel=1)

    # --- writing ------------------------------------------------------------------------

    async def send(
        self,
        category: str,
        events: Event | Iterable[Event],
        *,
        sync: bool = False,
        min_sync_replicas: int = 0,
        key: KeyFn | None = None,
    ) -> list[str]:
        """Write events (dicts, typed events, str or bytes lines; one such event alone is one
        event) with failover; returns their IDs.

        Every event is encoded (and given an ID) before the first attempt. Bodies over
        ``max_batch_bytes`` are split; each part fails over on its own, so when a later part
        fails the earlier ones are written.

        With ``key`` (``key(event) -> str | int``; bytes are decoded for it) ``category`` must
        be partitioned (:meth:`create_partitions`): each event goes to the partition category
        of its key's hash (every key is computed before anything is written). The partition
        count is asked once per client and category.

        Raises:
            MessageTooLargeError: an event is over 1 MiB (nothing is sent).
            WriteRejectedError: an event is not a dict or bytes, or a line holds a newline.
            RequestRejectedError: a node answered 4xx (e.g. a bad category).
            NodeUnavailableError: every node failed; ``errors`` has each node's error.
        """
        validate_category(category)
        seq = event_list(events)
        lines, ids = encode_events(seq)
        if key is not None:
            count = await self._known_partitions(category)
            for p, part in route(seq, lines, key, count).items():
                for body in split_bodies(part, self._max_batch):
                    await self.write_body(partition_category(category, p), body, sync=sync,
                                          min_sync_replicas=min_sync_replicas)
            return ids
        for body in split_bodies(lines, self._max_batch):
            await self.write_body(category, body, sync=sync, min_sync_replicas=min_sync_replicas)
        return ids

    async def create_partitions(self, category: str, count: int) -> list[str]:
        """Make ``category`` a partitioned category of ``count`` (1..1024) partitions,
        recorded cluster-wide; returns the partitions' category names. The same count again
        is a no-op.

        Raises:
            ValueError: ``count`` outside 1..1024.
            RequestRejectedError: refused by the node, e.g. (HTTP 409) another count while
                the category holds data, or a partition name taken by a category with data.
        """
        validate_category(category)
        if type(count) is not int or not 1 <= count <= MAX_PARTITIONS:
            raise ValueError(f"count must be an integer from 1 to {MAX_PARTITIONS}")
        answer = await self._any(
            f"creating {count} partitions of {category!r}",
            lambda url: self.api.get_json(url, "/partitions",
                                          {"category": category, "count": str(count)}))
        self._partition_counts[category] = int(answer["partitions"])
        return [str(n) for n in answer["names"]]

    async def partitions(self, category: str) -> int:
        """The partition count of ``category`` (0: not partitioned), asked now."""
        validate_category(category)
        answer = await self._any(
            f"reading the partitions of {category!r}",
            lambda url: self.api.get_json(url, "/partitions", {"category": category}))
        count = int(answer["partitions"])
        if count:
            self._partition_counts[category] = count
        return count

    async def _known_partitions(self, category: str) -> int:
        count = self._partition_counts.get(category) or await self.partitions(category)
        if not count:
            raise ValueError(f"category {category!r} is not partitioned: create its "
                             "partitions first (Client.create_partitions, chukcha partitions)")
        return count

    async def send_to(
        self,
        node_url: str,
        category: str,
        events: Event | Iterable[Event],
        *,
        sync: bool = False,
        min_sync_replicas: int = 0,
    ) -> list[str]:
        """:meth:`send`, but to ``node_url`` only, without failover."""
        validate_category(category)
        url = normalize_url(node_url)
        lines, ids = encode_events(events)
        for body in split_bodies(lines, self._max_batch):
            await self.api.write(url, category, body, sync=sync,
                                 min_sync_replicas=min_sync_replicas)
        return ids

    async def write_body(
        self, category: str, body: bytes, *, sync: bool = False, min_sync_replicas: int = 0
    ) -> None:
        """Write one ready body (whole ``\\n``-terminated messages) with failover."""

        async def attempt(url: str) -> None:
            await self.api.write(url, category, body, sync=sync,
                                 min_sync_replicas=min_sync_replicas)

        await self._failover(attempt, f"writing {len(body)} bytes to {category!r}")

    async def _failover(self, attempt: Callable[[str], Awaitable[T]], what: str) -> T:
        errors: dict[str, BaseException] = {}
        n = len(self._nodes)
        first = self._preferred
        for i in range(n):
            index = (first + i) % n
            url = self._nodes[index]
            try:
                result = await attempt(url)
            except ClientError as exc:
                if not exc.retriable:
                    raise
                errors[url] = exc
                if i + 1 < n:
                    logger.warning("%s failed on %s (%s); trying %s", what, url, exc,
                                   self._nodes[(index + 1) % n])
                continue
            if index != self._preferred:
                self._preferred = index
            return result
        detail = "; ".join(str(e) for e in errors.values())
        raise NodeUnavailableError(f"{what} failed on every node: {detail}", errors)

    @overload
    def producer(
        self, category: str, *, key: None = None, max_batch_bytes: int = ...,
        linger: float = ..., max_buffer_bytes: int = ..., max_in_flight: int = ...,
        sync: bool = ..., min_sync_replicas: int = ...,
    ) -> Producer: ...

    @overload
    def producer(
        self, category: str, *, key: KeyFn, max_batch_bytes: int = ...,
        linger: float = ..., max_buffer_bytes: int = ..., max_in_flight: int = ...,
        sync: bool = ..., min_sync_replicas: int = ...,
    ) -> KeyedProducer: ...

    def producer(
        self,
        category: str,
        *,
        key: KeyFn | None = None,
        max_batch_bytes: int = 1 << 20,
        linger: float = 0.005,
        max_buffer_bytes: int = 16 << 20,
        max_in_flight: int = 1,
        sync: bool = False,
        min_sync_replicas: int = 0,
    ) -> Producer | KeyedProducer:
        """A batching producer for ``category``: ``async with client.producer("c") as p:``.
        With ``key`` the partitioned ``category`` is written by key (:meth:`keyed_producer`)."""
        if key is not None:
            return self.keyed_producer(
                category, key, max_batch_bytes=max_batch_bytes, linger=linger,
                max_buffer_bytes=max_buffer_bytes, max_in_flight=max_in_flight, sync=sync,
                min_sync_replicas=min_sync_replicas)
        config = ProducerConfig(
            max_batch_bytes=min(max_batch_bytes, self._max_batch),
            linger=linger,
            max_buffer_bytes=max_buffer_bytes,
            max_in_flight=max_in_flight,
        )

        async def write(cat: str, body: bytes) -> None:
            await self.write_body(cat, body, sync=sync, min_sync_replicas=min_sync_replicas)

        producer = Producer(write, category, config)
        self._producers.add(producer)
        return producer

    def keyed_producer(self, category: str, key: KeyFn, **options: Any) -> KeyedProducer:
        """A producer for the partitioned ``category`` that writes each event into the
        partition of ``key(event)`` (one batching :meth:`producer` per partition, made with
        ``options``): ``async with client.keyed_producer("orders", key=f) as p:``."""
        validate_category(category)
        return KeyedProducer(category, key, lambda: self._known_partitions(category),
                             lambda name: self.producer(name, **options))

    # --- reading ------------------------------------------------------------------------

    def consumer(
        self,
        category: str,
        *,
        group: str | None = None,
        positions: Mapping[str, Position] | None = None,
        max_batch_bytes: int = 1 << 20,
        node: str | None = None,
        config: ConsumerConfig | None = None,
        register: bool = True,
        fence: tuple[int, int] | None = None,
    ) -> Consumer:
        """A consumer of ``category`` reading from one node (``node``, else the first one;
        the others are used when it fails).

        With ``group`` it skips the chunks that group acked and (``register=True``) registers
        the group on the nodes so that :meth:`Consumer.commit` can ack for it; with
        ``register=False`` it only reads as the group: nothing is registered or acked.
        ``fence=(partition, epoch)``: its acks are fenced (an instance of a partitioned app
        that lost the partition gets them refused, :class:`~chukcha.errors.ConsumerError`)."""
        urls = list(self._nodes)
        if node is not None:
            first = normalize_url(node)
            urls = [first, *(u for u in urls if u != first)]
        if config is None:
            config = ConsumerConfig(max_batch_bytes=max_batch_bytes)
        consumer = Consumer(self.api, urls, category, group=group, positions=positions,
                            config=config, on_close=self._consumers.discard,
                            register=register, fence=fence)
        self._consumers.add(consumer)
        return consumer

    async def _any(self, what: str, fn: Callable[[str], Awaitable[T]]) -> T:
        return await self._failover(fn, what)

    async def list_categories(self) -> list[str]:
        return await self._any("listing categories", self.api.list_categories)

    async def list_chunks(self, category: str) -> list[ChunkInfo]:
        validate_category(category)
        return await self._any(f"listing chunks of {category!r}",
                               lambda url: self.api.list_chunks(url, category))

    async def register_group(self, category: str, group: str) -> None:
        """Register a consumer group on every node (until groups live in etcd)."""
        validate_category(category)
        await asyncio.gather(*(self.api.register_group(u, category, group) for u in self._nodes))

    async def unregister_group(self, category: str, group: str) -> bool:
        """Remove consumer group ``group`` of ``category`` with its acks, cluster-wide (the
        node that answers forwards it), so it no longer holds back the deletion of chunks.
        Returns whether it was registered."""
        validate_category(category)
        return await self._any(f"removing group {group!r} of {category!r}",
                               lambda url: self.api.unregister_group(url, category, group))

    async def list_groups(self, category: str) -> dict[str, Any]:
        validate_category(category)
        return await self._any(f"listing groups of {category!r}",
                               lambda url: self.api.list_groups(url, category))

    async def status(self, node: str | None = None) -> dict[str, Any]:
        """``/status`` of ``node`` (default: the first node)."""
        return await self.api.status(normalize_url(node) if node else self._nodes[0])
