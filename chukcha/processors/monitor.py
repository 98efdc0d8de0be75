"""A running app's HTTP port (``chukcha run --http HOST:PORT``, ``App.run(http="HOST:PORT")``):
Prometheus ``/metrics``, the web monitor ``/ui`` (partitions, counters, lag, and a query box
that looks up a key in the app's table: Goka's query page) and ``/ui/query?key=K`` (JSON:
``{"key", "found", "value"}``, the committed value).

Everything is read at scrape time from what the engines and checkpoints count anyway:

==================================================== ========= ===============================
``chukcha_app_info{app}``                             gauge     1; ``partitions`` label: count
``chukcha_app_partitions_owned{app}``                 gauge     partitions this instance runs
``chukcha_app_events_applied_total{app,partition}``   counter   events applied (callback ran)
``chukcha_app_events_duplicate_total{app,partition}`` counter   events dropped by the dedup
``chukcha_app_events_dead_lettered_total{...}``       counter   events sent to ``<c>.dead``
``chukcha_app_events_undecodable_total{...}``         counter   of those, undecodable ones
``chukcha_app_commits_total{app,partition}``          counter   commits (write batches)
``chukcha_app_commit_duration_seconds{app}``          histogram write batch + fsync
``chukcha_app_outbox_entries{app,partition}``         gauge     committed emits not sent yet
``chukcha_app_dedup_ids{app,partition}``              gauge     IDs in the dedup index
``chukcha_app_changelog_published_total{...}``        counter   changelog records confirmed
``chukcha_app_changelog_unpublished{...}``            gauge     changelog records not yet
``chukcha_app_lag_bytes{app,category}``               gauge     bytes listed beyond the read
                                                                position (as last listed)
``chukcha_app_partitions_failing{app}``               gauge     partitions whose start failed
                                                                here, retried (through etcd)
``chukcha_app_partition_start_failures{...}``         gauge     of those, failed starts in a
                                                                row (``app,partition``)
==================================================== ========= ===============================

The counters start at zero with each run of the process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from chukcha.client.consumer import Consumer
from chukcha.monitor_html import page, table
from chukcha.processors.checkpoint import COMMIT_BUCKETS, Checkpoint
from chukcha.processors.context import TABLE_PREFIX

__all__ = ["AppMonitor", "parse_http_address"]

logger = logging.getLogger(__name__)

_BOUNDS: Final = (*(str(float(b)) for b in COMMIT_BUCKETS), "+Inf")
_QUERY_SCRIPT: Final = """
document.getElementById("query").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = document.getElementById("key").value;
  const out = document.getElementById("result");
  const r = await fetch("/ui/query?key=" + encodeURIComponent(key));
  const d = await r.json();
  out.textContent = d.found ? JSON.stringify(d.value) : (d.error || "not found");
});
"""


@web.middleware
async def _plain_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """An unhandled error is logged with its traceback and answered 500 with its reason in plain
    text, as the node does (not aiohttp's generic "Server got itself in trouble")."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        logger.exception("app HTTP port: %s %s failed", request.method, request.path_qs)
        return web.Response(status=500, text=f"internal error: {type(exc).__name__}: {exc}\n")
    return response


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` is ``127.0.0.1:PORT``; port 0 picks a free one)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid HTTP address {text!r}: expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1", int(port))


class AppMonitor:
    """Serves an app's ``/metrics`` on its own HTTP port while it runs.

    Args:
        app_name: the app.
        partitions: the app's partition count.
        checkpoints: the checkpoints of the partitions this instance runs (index = partition).
        consumers: returns the app's consumers by stream category (they change as it starts).
        failing: returns the partitions whose start failed on this instance and that it
            retries -> the failures in a row (instances through etcd; none by default).
    """

    def __init__(
        self,
        app_name: str,
        partitions: int,
        checkpoints: Mapping[int, Checkpoint],
        consumers: Callable[[], Mapping[str, Consumer]],
        *,
        failing: Callable[[], Mapping[int, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_AppCollector(app_name, partitions, checkpoints, consumers,
                                             failing))
        self._name = app_name
        self._checkpoints = checkpoints
        self._consumers = consumers
        self.app = web.Application(middlewares=[_plain_errors])
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/ui", self._ui)
        self.app.router.add_get("/ui/query", self._query)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.address = ""

    async def start(self, host: str, port: int) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        server = site._server  # noqa: SLF001 - aiohttp keeps the bound socket here only
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname() if sockets else (host, port)
        self.address = f"{bound[0]}:{bound[1]}"
        logger.info("app HTTP port on http://%s (/metrics, /ui)", self.address)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def lookup(self, key: str) -> tuple[bool, Any]:
        """The committed value of ``key`` in the app's table: ``(found, value)``."""
        # Taken on the loop: through etcd the partitions run here change as they move.
        checkpoints = list(self._checkpoints.values())

        def get() -> tuple[bool, Any]:
            for checkpoint in checkpoints:
                raw = checkpoint.store.get(TABLE_PREFIX + key.encode())
                if raw is not None:
                    return True, orjson.loads(raw)
            return False, None

        return await asyncio.to_thread(get)

    async def _query(self, request: web.Request) -> web.StreamResponse:
        key = request.query.get("key", "")
        if not key:
            return web.json_response({"error": "give ?key=K"}, status=400)
        found, value = await self.lookup(key)
        return web.json_response({"key": key, "found": found, "value": value},
                                 dumps=lambda v: orjson.dumps(v).decode())

    async def _ui(self, request: web.Request) -> web.StreamResponse:
        parts = table(
            ["partition", "applied", "duplicates", "dead-lettered", "commits", "unsent emits"],
            [(i, c.engine.applied, c.engine.duplicates, c.engine.dead_lettered, c.commits,
              len(c.engine.outbox)) for i, c in sorted(self._checkpoints.items())],
            css_id="partitions",
        )
        lag = table(["category", "lag (bytes)"],
                    [(c, consumer.backlog_bytes())
                     for c, consumer in sorted(self._consumers().items())],
                    css_id="lag", empty="not reading yet")
        query = ('<form id="query"><label>look up a key in the table: <input id="key" '
                 'name="key" autocomplete="off"></label> <button id="lookup">look up</button>'
                 '</form><pre id="result"></pre>')
        main = f"<h2>Partitions this instance runs</h2>{parts}<h2>Input lag</h2>{lag}"
        return web.Response(body=page(f"chukcha app {self._name}", main, before_main=query,
                                      extra_script=_QUERY_SCRIPT),
                            content_type="text/html", charset="utf-8")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=generate_latest(self.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp


class _AppCollector(Collector):
    def __init__(
        self,
        app_name: str,
        partitions: int,
        checkpoints: Mapping[int, Checkpoint],
        consumers: Callable[[], Mapping[str, Consumer]],
        failing: Callable[[], Mapping[int, int]],
    ) -> None:
        self._app = app_name
        self._partitions = partitions
        self._checkpoints = checkpoints
        self._consumers = consumers
        self._failing = failing

    def collect(self) -> Iterator[Metric]:
        app = self._app
        info = GaugeMetricFamily("chukcha_app_info", "This app", labels=["app", "partitions"])
        info.add_metric([app, str(self._partitions)], 1)
        yield info
        owned = GaugeMetricFamily("chukcha_app_partitions_owned",
                                  "Partitions this instance runs", labels=["app"])
        owned.add_metric([app], len(self._checkpoints))
        yield owned
        yield from self._per_partition()
        yield self._commit_histogram()
        lag = GaugeMetricFamily("chukcha_app_lag_bytes",
                                "Bytes listed beyond the read position", labels=["app",
                                                                                 "category"])
        for category, consumer in sorted(self._consumers().items()):
            lag.add_metric([app, category], consumer.backlog_bytes())
        yield lag
        yield from self._failing_starts()

    def _failing_starts(self) -> Iterator[Metric]:
        """The partitions that keep failing to start here (``chukcha app status`` shows them
        too): alert on ``chukcha_app_partitions_failing > 0`` for a while, or on
        ``chukcha_app_partition_start_failures >= 3`` (the log's advice starts there)."""
        failing = self._failing()
        count = GaugeMetricFamily("chukcha_app_partitions_failing",
                                  "Partitions whose start failed on this instance, retried with "
                                  "a backoff", labels=["app"])
        count.add_metric([self._app], len(failing))
        yield count
        failures = GaugeMetricFamily("chukcha_app_partition_start_failures",
                                     "Failed starts in a row of a partition retried here",
                                     labels=["app", "partition"])
        for partition, n in sorted(failing.items()):
            failures.add_metric([self._app, str(partition)], n)
        yield failures

    def _per_partition(self) -> Iterator[Metric]:
        labels = ["app", "partition"]
        counters: Sequence[tuple[str, str, Callable[[Checkpoint], float]]] = (
            ("chukcha_app_events_applied", "Events applied", lambda c: c.engine.applied),
            ("chukcha_app_events_duplicate", "Events dropped as duplicates",
             lambda c: c.engine.duplicates),
            ("chukcha_app_events_dead_lettered", "Events dead-lettered",
             lambda c: c.engine.dead_lettered),
            ("chukcha_app_events_undecodable", "Events that could not be decoded",
             lambda c: c.engine.undecodable),
            ("chukcha_app_commits", "Commits", lambda c: c.commits),
        )
        gauges: Sequence[tuple[str, str, Callable[[Checkpoint], float]]] = (
            ("chukcha_app_outbox_entries", "Committed emits not sent yet",
             lambda c: len(c.engine.outbox)),
            ("chukcha_app_dedup_ids", "IDs in the dedup index", lambda c: len(c.engine.dedup)),
        )
        for name, doc, read in counters:
            family = CounterMetricFamily(name, doc, labels=labels)
            for partition, checkpoint in sorted(self._checkpoints.items()):
                family.add_metric([self._app, str(partition)], read(checkpoint))
            yield family
        for name, doc, read in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for partition, checkpoint in sorted(self._checkpoints.items()):
                gauge.add_metric([self._app, str(partition)], read(checkpoint))
            yield gauge
        published = CounterMetricFamily("chukcha_app_changelog_published",
                                        "Changelog records confirmed on the bus", labels=labels)
        pending = GaugeMetricFamily("chukcha_app_changelog_unpublished",
                                    "Committed changelog records not confirmed yet",
                                    labels=labels)
        for partition, checkpoint in sorted(self._checkpoints.items()):
            changelog = checkpoint.changelog
            if changelog is not None:
                published.add_metric([self._app, str(partition)], changelog.published)
                pending.add_metric([self._app, str(partition)], changelog.pending_records)
        yield published
        yield pending

    def _commit_histogram(self) -> Metric:
        family = HistogramMetricFamily("chukcha_app_commit_duration_seconds",
                                       "Commit latency (write batch and fsync)", labels=["app"])
        buckets = [0] * (len(COMMIT_BUCKETS) + 1)
        total = 0.0
        for checkpoint in self._checkpoints.values():
            buckets = [a + b for a, b in zip(buckets, checkpoint.commit_seconds, strict=True)]
            total += checkpoint.commit_seconds_sum
        family.add_metric([self._app], list(zip(_BOUNDS, itertools.accumulate(buckets),
                                                strict=True)), sum_value=total)
        return family
