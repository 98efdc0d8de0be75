"""A node's Prometheus metrics (``/metrics``, through ``prometheus-client``).

Most families are read at scrape time from the counters the components keep anyway (the chunk
store's :class:`~chukcha.bus.chunks.Traffic`, the groups' ack counts, the replicator's links),
so they cost nothing per request. Only the HTTP families are recorded per request, by
:meth:`NodeMetrics.observe` (two clock reads, a bisect and three integer increments,
about 1 us; ``bench/bench_metrics.py`` measures the whole cost).

Families (counters end in ``_total``; ``category``, ``group`` and ``peer`` labels as named):

=========================================== ===== ==========================================
``chukcha_node_info{instance,cluster}``      gauge 1; the node's name and cluster mode
``chukcha_write_requests_total{category}``   count writes accepted
``chukcha_written_bytes_total{category}``    count bytes written into own chunks
``chukcha_written_messages_total{category}`` count messages written into own chunks
``chukcha_read_requests_total{category}``    count ``/read`` requests served (clients and peers)
``chukcha_read_bytes_total{category}``       count bytes sent by ``/read``
``chukcha_read_messages_total{category}``    count messages sent by ``/read`` (a message read
                                                   twice counts twice; clients and peers)
``chukcha_replicated_bytes_total{category}`` count bytes downloaded from peers into this node
``chukcha_chunks{category,complete}``        gauge live chunks held here
``chukcha_chunk_bytes{category}``            gauge bytes in live chunks held here
``chukcha_chunks_acknowledged_total``        count chunks tombstoned here (any reason)
``chukcha_acks_total{category,group}``       count ``/ack`` accepted (group ``""``: a plain
                                                   ack that deleted at once, Go behaviour)
``chukcha_retention_deleted_chunks_total``   count chunks deleted by retention
``chukcha_retained_acked_chunks{category}``  gauge acknowledged chunks kept for replay
``chukcha_consumer_lag_chunks{category,group}`` gauge unacked chunks (:mod:`chukcha.bus.lag`)
``chukcha_consumer_lag_bytes{category,group}``  gauge their bytes
``chukcha_consumer_lag_seconds{category,group}`` gauge age of the oldest unacked message
``chukcha_replication_peer_up{peer}``        gauge 1 while the peer's events stream is up
``chukcha_replication_lag_bytes{peer}``      gauge peer's bytes (as last listed) not here yet
``chukcha_replication_lag_seconds{peer}``    gauge how long the lag has been non-zero (as seen
                                                   at scrapes; 0 when none)
``chukcha_replication_downloaded_bytes_total{peer}`` count bytes downloaded from the peer
``chukcha_http_requests_total{endpoint,status}`` count requests by route and status
``chukcha_http_request_duration_seconds{endpoint}`` histogram request latency by route
=========================================== ===== ==========================================

The two ``chukcha_chunks_acknowledged_total`` and ``chukcha_retention_deleted_chunks_total``
families carry a ``category`` label. Messages read are the newlines in what ``/read`` sent,
counted as it is sent (``bytes.count``, one C loop over bytes already in memory; a streamed
answer over 1 MiB counts each piece as it goes out, so an answer cut short by the
client counts what it got).

Each node has its own :class:`~prometheus_client.CollectorRegistry` (several nodes can run in
one process, as in the tests); nothing is registered in the global one.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.groups import ConsumerGroups
from chukcha.bus.http import Handler
from chukcha.bus.lag import GroupLag, LagMeter
from chukcha.bus.replicator import Replicator

__all__ = ["LATENCY_BUCKETS", "NodeMetrics"]

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                          1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BOUNDS: Final = (*(str(float(b)) for b in LATENCY_BUCKETS), "+Inf")
_OTHER: Final = "other"


class _Snapshot:
    """What the scrape-time collector reports; refreshed (async parts) before each scrape."""

    def __init__(self) -> None:
        self.lags: list[GroupLag] = []


class NodeMetrics:
    """The node's registry, its per-request HTTP observer and the ``/metrics`` route."""

    def __init__(
        self,
        instance: str,
        mode: str,
        *,
        store: ChunkStore,
        groups: ConsumerGroups,
        replicator: Callable[[], Replicator | None],
        lag: LagMeter,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lag = lag
        self._snapshot = _Snapshot()
        # Per-route request counts and latency buckets, kept as plain integers: no lock and no
        # label lookup per request (prometheus-client's Counter and Histogram cost ~2 us).
        self._routes: dict[str, _RouteStats] = {}
        self.registry.register(
            _NodeCollector(instance, mode, store=store, groups=groups, replicator=replicator,
                           snapshot=self._snapshot)
        )
        self.registry.register(_HttpCollector(self._routes))

    def routes(self) -> dict[str, Handler]:
        return {"/metrics": self.serve}

    async def render(self) -> bytes:
        """The exposition text (refreshes the parts that need I/O first)."""
        self._snapshot.lags = await self._lag.lags()
        return generate_latest(self.registry)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        body = await self.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count and time one answered request by its route (``other`` for unknown paths);
        the server calls it for every answer (``Router.add_observer``)."""
        stats = self._routes.get(endpoint)
        if stats is None:
            stats = self._routes[endpoint] = _RouteStats()
        stats.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        stats.seconds += seconds
        stats.statuses[status] = stats.statuses.get(status, 0) + 1


class _RouteStats:
    """Requests of one route: by status, and a latency histogram (non-cumulative buckets, the
    last one for slower than every bound)."""

    __slots__ = ("buckets", "seconds", "statuses")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.statuses: dict[int, int] = {}


class _HttpCollector(Collector):
    def __init__(self, routes: dict[str, _RouteStats]) -> None:
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("chukcha_http_requests", "HTTP requests by route and "
                                       "status", labels=["endpoint", "status"])
        latency = HistogramMetricFamily("chukcha_http_request_duration_seconds",
                                        "HTTP request latency by route", labels=["endpoint"])
        for endpoint, stats in sorted(self._routes.items()):
            for status, n in sorted(stats.statuses.items()):
                requests.add_metric([endpoint, str(status)], n)
            cumulative = list(itertools.accumulate(stats.buckets))
            latency.add_metric([endpoint], list(zip(_BOUNDS, cumulative, strict=True)),
                               sum_value=stats.seconds)
        yield requests
        yield latency


class _NodeCollector(Collector):
    """Everything read at scrape time."""

    def __init__(
        self,
        instance: str,
        mode: str,
        *,
        store: ChunkStore,
        groups: ConsumerGroups,
        replicator: Callable[[], Replicator | None],
        snapshot: _Snapshot,
    ) -> None:
        self._instance = instance
        self._mode = mode
        self._store = store
        self._groups = groups
        self._replicator = replicator
        self._snapshot = snapshot
        self._lagging_since: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("chukcha_node_info", "This node", labels=["instance", "cluster"])
        info.add_metric([self._instance, self._mode], 1)
        yield info
        yield from self._traffic()
        yield from self._chunks()
        yield from self._acks()
        yield from self._consumer_lag()
        yield from self._replication()

    def _traffic(self) -> Iterator[Metric]:
        families = {
            "writes": CounterMetricFamily("chukcha_write_requests", "Writes accepted",
                                          labels=["category"]),
            "bytes_written": CounterMetricFamily("chukcha_written_bytes",
                                                 "Bytes written into own chunks",
                                                 labels=["category"]),
            "messages_written": CounterMetricFamily("chukcha_written_messages",
                                                    "Messages written into own chunks",
                                                    labels=["category"]),
            "reads": CounterMetricFamily("chukcha_read_requests", "/read requests served",
                                         labels=["category"]),
            "bytes_read": CounterMetricFamily("chukcha_read_bytes", "Bytes sent by /read",
                                              labels=["category"]),
            "messages_read": CounterMetricFamily("chukcha_read_messages",
                                                 "Messages sent by /read", labels=["category"]),
            "bytes_replicated": CounterMetricFamily("chukcha_replicated_bytes",
                                                    "Bytes downloaded from peers",
                                                    labels=["category"]),
            "chunks_acked": CounterMetricFamily("chukcha_chunks_acknowledged",
                                                "Chunks tombstoned here (any reason)",
                                                labels=["category"]),
            "fsyncs": CounterMetricFamily(
                "chukcha_write_fsyncs", "fsyncs that answered durable writes (sync=1, "
                "--sync-each-write); with group commit one covers many writes",
                labels=["category"]),
            "fsynced_writes": CounterMetricFamily(
                "chukcha_fsynced_writes", "Durable writes answered after their fsync "
                "(divided by chukcha_write_fsyncs: writes per fsync)", labels=["category"]),
            "fsync_seconds": CounterMetricFamily(
                "chukcha_group_fsync_seconds", "Time the group fsyncs took (from their start "
                "to the answers)", labels=["category"]),
        }
        for category, traffic in sorted(self._store.traffic().items()):
            for attr, family in families.items():
                family.add_metric([category], getattr(traffic, attr))
        yield from families.values()

    def _chunks(self) -> Iterator[Metric]:
        count = GaugeMetricFamily("chukcha_chunks", "Live chunks held here",
                                  labels=["category", "complete"])
        size = GaugeMetricFamily("chukcha_chunk_bytes", "Bytes in live chunks held here",
                                 labels=["category"])
        for category in self._store.categories():
            chunks = self._store.list_chunks(category)
            done = sum(1 for c in chunks if c.complete)
            count.add_metric([category, "true"], done)
            count.add_metric([category, "false"], len(chunks) - done)
            size.add_metric([category], sum(c.size for c in chunks))
        yield count
        yield size

    def _acks(self) -> Iterator[Metric]:
        acks = CounterMetricFamily("chukcha_acks", "/ack requests accepted",
                                   labels=["category", "group"])
        for (category, group), n in sorted(self._groups.acks.items()):
            acks.add_metric([category, group], n)
        yield acks
        deleted = CounterMetricFamily("chukcha_retention_deleted_chunks",
                                      "Chunks deleted by retention", labels=["category"])
        for category, n in sorted(self._groups.retention_deleted.items()):
            deleted.add_metric([category], n)
        yield deleted
        kept = GaugeMetricFamily("chukcha_retained_acked_chunks",
                                 "Acknowledged chunks kept for replay (--retain-acked)",
                                 labels=["category"])
        for category, n in sorted(self._groups.retain.counts().items()):
            kept.add_metric([category], n)
        yield kept

    def _consumer_lag(self) -> Iterator[Metric]:
        labels = ["category", "group"]
        chunks = GaugeMetricFamily("chukcha_consumer_lag_chunks", "Unacknowledged chunks",
                                   labels=labels)
        size = GaugeMetricFamily("chukcha_consumer_lag_bytes", "Bytes in unacknowledged chunks",
                                 labels=labels)
        age = GaugeMetricFamily("chukcha_consumer_lag_seconds",
                                "Age of the oldest unacknowledged message", labels=labels)
        for lag in self._snapshot.lags:
            chunks.add_metric([lag.category, lag.group], lag.chunks)
            size.add_metric([lag.category, lag.group], lag.bytes)
            age.add_metric([lag.category, lag.group], lag.oldest_age or 0.0)
        yield chunks
        yield size
        yield age

    def _replication(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("chukcha_replication_peer_up", "Peer events stream connected",
                               labels=["peer"])
        lag = GaugeMetricFamily("chukcha_replication_lag_bytes",
                                "Peer bytes (as last listed) not here yet", labels=["peer"])
        seconds = GaugeMetricFamily("chukcha_replication_lag_seconds",
                                    "How long the replication lag has been non-zero",
                                    labels=["peer"])
        down = CounterMetricFamily("chukcha_replication_downloaded_bytes",
                                   "Bytes downloaded from the peer", labels=["peer"])
        replicator = self._replicator()
        now = time.monotonic()
        for peer in replicator.status() if replicator is not None else []:
            name = peer["instance"]
            up.add_metric([name], 1 if peer["up"] else 0)
            lag.add_metric([name], peer["lag_bytes"])
            if peer["lag_bytes"] > 0:
                since = self._lagging_since.setdefault(name, now)
            else:
                self._lagging_since.pop(name, None)
                since = now
            seconds.add_metric([name], now - since)
            down.add_metric([name], peer["bytes_replicated"])
        yield up
        yield lag
        yield seconds
        yield down
