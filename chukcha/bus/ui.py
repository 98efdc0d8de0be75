"""A node's web monitor: ``/ui`` (HTML) and ``/ui/data`` (the same as JSON).

Shows this node and its peers (up, replication lag), the categories with their chunks, bytes
and write/read rates over the last minute and the last five minutes, the consumer groups
(apps) with their lag, and, with etcd, the apps' partitions with their owners and epochs.
Rates come from samples of the chunk store's counters taken every :data:`SAMPLE_INTERVAL`
seconds by :meth:`NodeUi.sample_forever` (the node runs it).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from html import escape
from typing import Any, Final

import orjson

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.http import Handler
from chukcha.bus.lag import LagMeter
from chukcha.monitor_html import page, table

__all__ = ["SAMPLE_INTERVAL", "NodeUi"]

SAMPLE_INTERVAL: Final = 5.0
_KEEP: Final = 900.0  # seconds of samples kept (the longest rate window, with room)
_WINDOWS: Final = (60.0, 300.0)


_SPLIT_GROUP: Final = re.compile(r"^(.*)\.\d+of\d+$")


def _app_name(group: str) -> str:
    """The app of a consumer group (a static split's ``<app>.<I>of<N>`` is ``<app>``)."""
    m = _SPLIT_GROUP.match(group)
    return m.group(1) if m else group


class NodeUi:
    """Serves ``/ui`` and ``/ui/data`` from the node's components (read-only)."""

    def __init__(
        self,
        instance: str,
        address: Callable[[], str],
        store: ChunkStore,
        status: Callable[[], dict[str, Any]],
        lag: LagMeter,
        *,
        apps: Callable[[list[str]], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._instance = instance
        self._address = address
        self._store = store
        self._status = status
        self._lag = lag
        self._apps = apps
        self._samples: deque[tuple[float, dict[str, tuple[int, int, int, int]]]] = deque()

    def routes(self) -> dict[str, Handler]:
        return {"/ui": self.html, "/ui/data": self.json}

    def sample(self, now: float | None = None) -> None:
        """Record the store's counters now (for the rates)."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, {
            c: (t.bytes_written, t.messages_written, t.bytes_read, t.messages_read)
            for c, t in self._store.traffic().items()
        }))
        while self._samples and now - self._samples[0][0] > _KEEP:
            self._samples.popleft()

    async def sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _rates(self, category: str, window: float) -> tuple[float, float, float, float] | None:
        """(bytes written/s, messages written/s, bytes read/s, messages read/s) over about
        ``window`` s."""
        if not self._samples:
            return None
        now = time.monotonic()
        traffic = self._store.traffic().get(category)
        if traffic is None:
            return None
        current = (traffic.bytes_written, traffic.messages_written, traffic.bytes_read,
                   traffic.messages_read)
        # The oldest sample within the window (or the oldest there is, early on).
        t0, values = next(((t, v) for t, v in self._samples if now - t <= window),
                          self._samples[-1])
        dt = now - t0
        if dt <= 0:
            return None
        before = values.get(category, (0, 0, 0, 0))
        return tuple((c - b) / dt for c, b in zip(current, before, strict=True))  # type: ignore[return-value]

    async def data(self) -> dict[str, Any]:
        """Everything the page shows."""
        status = self._status()
        categories = []
        for name in self._store.categories():
            chunks = self._store.list_chunks(name)
            rates = {f"{int(w)}s": self._rates(name, w) for w in _WINDOWS}
            categories.append({
                "name": name, "chunks": len(chunks),
                "complete": sum(1 for c in chunks if c.complete),
                "bytes": sum(c.size for c in chunks),
                "rates": {k: None if r is None else {"write_bytes": r[0], "write_messages": r[1],
                                                     "read_bytes": r[2], "read_messages": r[3]}
                          for k, r in rates.items()},
            })
        groups = [x.to_json() for x in await self._lag.lags()]
        names = sorted({_app_name(g["group"]) for g in groups})
        apps = await self._apps(names) if self._apps is not None and names else {}
        return {
            "instance": self._instance, "address": self._address(),
            "cluster": status.get("cluster"), "peers": status.get("peers") or [],
            "subscribers": status.get("subscribers") or [],
            "categories": categories,
            "groups": groups,
            "apps": apps,
        }

    async def json(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(await self.data()),
                            content_type="application/json")

    async def html(self, request: web.Request) -> web.StreamResponse:
        d = await self.data()
        now = time.time()
        peers = table(
            ["peer", "url", "up", "replication lag (bytes)", "last seen"],
            [(p["instance"], p["url"], "up" if p["up"] else "DOWN", p["lag_bytes"],
              f"{now - p['last_seen']:.0f} s ago" if p.get("last_seen") else "never")
             for p in d["peers"]],
            css_id="peers", empty="no peers (a standalone node)",
        )

        def rate(c: dict[str, Any], window: str, key: str) -> str:
            r = c["rates"][window]
            return "-" if r is None else f"{r[key]:,.1f}"

        cats = table(
            ["category", "chunks", "complete", "bytes", "msg/s 1 min", "msg/s 5 min",
             "written B/s 1 min", "read B/s 1 min", "read msg/s 1 min"],
            [(c["name"], c["chunks"], c["complete"], c["bytes"], rate(c, "60s", "write_messages"),
              rate(c, "300s", "write_messages"), rate(c, "60s", "write_bytes"),
              rate(c, "60s", "read_bytes"), rate(c, "60s", "read_messages"))
             for c in d["categories"]],
            css_id="categories", empty="no categories yet",
        )
        groups = table(
            ["category", "group (app)", "unacked chunks", "unacked bytes",
             "oldest unacked"],
            [(g["category"], g["group"], g["chunks"], g["bytes"],
              "-" if g["oldest_age"] is None else f"{g['oldest_age']:.0f} s")
             for g in d["groups"]],
            css_id="groups", empty="no consumer groups registered",
        )
        app_rows = [
            (name, p, claim["owner"], claim["epoch"])
            for name, app in sorted(d["apps"].items())
            for p, claim in sorted(app["claims"].items(), key=lambda kv: int(kv[0]))
        ]
        apps = table(["app", "partition", "owner (instance)", "epoch"], app_rows,
                     css_id="apps", empty="no app instances known (apps register their "
                     "partition owners in etcd; this node has none, or no app runs)")
        main = (
            f'<p>instance <b id="instance">{escape(d["instance"])}</b> at '
            f'{escape(d["address"])}, cluster mode {escape(str(d["cluster"]))}; replicas '
            f'subscribed: {escape(", ".join(d["subscribers"]) or "none")}</p>'
            f"<h2>Cluster members</h2>{peers}<h2>Categories</h2>{cats}"
            f"<h2>Consumer groups and apps</h2>{groups}"
            f"<h2>App partitions and their owners</h2>{apps}"
        )
        return web.Response(body=page(f"chukcha node {d['instance']}", main),
                            content_type="text/html; charset=utf-8")
