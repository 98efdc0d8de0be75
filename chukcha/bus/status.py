"""``/status`` (extension): this node and how replication from each peer is doing.

```json
{"instance": "a", "address": "127.0.0.1:8080", "cluster": "static",
 "peers": [{"instance": "b", "url": "http://127.0.0.1:8081", "up": true, "lag_bytes": 0,
            "last_seen": 1732345678.5, "bytes_replicated": 1048576}]}
```

``up`` means the peer's events stream is connected; ``lag_bytes`` is how much of the peer's
chunks (as last listed) is not here yet; ``last_seen`` is Unix time (``null``: never).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from chukcha.bus import web
from chukcha.bus.coordination import Membership
from chukcha.bus.http import Handler
from chukcha.bus.replication import ReplicationServer
from chukcha.bus.replicator import Replicator

__all__ = ["StatusApi"]

logger = logging.getLogger(__name__)


class StatusApi:
    """Serves ``/status`` from the replication components (read-only)."""

    def __init__(
        self,
        instance: str,
        address: Callable[[], str],
        *,
        mode: str,
        membership: Membership | None = None,
        replicator: Replicator | None = None,
        server: ReplicationServer | None = None,
    ) -> None:
        self._instance = instance
        self._address = address
        self._mode = mode
        self._membership = membership
        self._replicator = replicator
        self._server = server

    def routes(self) -> dict[str, Handler]:
        return {"/status": self.status}

    def snapshot(self) -> dict[str, Any]:
        """The ``/status`` document."""
        return {
            "instance": self._instance,
            "address": self._address(),
            "cluster": self._mode,
            "coordinator_connected": (
                self._membership.connected if self._membership is not None else None
            ),
            "subscribers": self._server.subscribers() if self._server is not None else [],
            "peers": self._replicator.status() if self._replicator is not None else [],
        }

    async def status(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.snapshot()), content_type="application/json")
