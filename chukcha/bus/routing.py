"""What the node's HTTP server serves and within which bounds: the route table (:class:`Router`),
the resource limits (:class:`ServerLimits`) and the one place an exception becomes an answer
(:func:`error_response`). The server itself is :mod:`chukcha.bus.server`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from chukcha.bus.web import Check, FastHandler, Handler, LaterHandler, Request, Response
from chukcha.errors import BodyTooLargeError, ChukchaError

__all__ = ["Observer", "Router", "ServerLimits", "error_response"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds on what clients may hold (``chukcha node --help`` lists the flags).

    Attributes:
        max_connections: open connections at most; at the cap the longest-idle keep-alive
            connection is closed for a newcomer, and with none idle the newcomer is answered
            503 and closed.
        header_timeout: seconds from a request's first byte to the end of its headers.
        body_timeout: longest pause (seconds) between two pieces of a request body.
        keepalive_timeout: an idle keep-alive connection is closed after this many seconds.
        send_timeout: a connection whose client takes no byte of its answer for this long is
            closed.
        max_header_size: bytes of request line and headers at most (431 above).
        max_body_size: request body at most (400 and close above; the node sets its batch
            limit here).
        memory_budget: bytes held at once for request bodies being received and answers
            waiting for slow clients (bodies and answers up to 64 KiB are not counted). When a
            new body or answer does not fit, connections stalled for ``stall_grace`` seconds or
            more are closed (longest stalled first); a body that still does not fit is answered
            503, an answer waits.
        stall_grace: how long a connection must have stalled before the budget may close it.
    """

    max_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    max_header_size: int = 64 << 10
    max_body_size: int = 4 << 20
    memory_budget: int = 96 << 20
    stall_grace: float = 1.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout",
                     "stall_grace"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_header_size < 1024 or self.max_body_size < 1:
            raise ValueError("max_header_size must be at least 1024 and max_body_size positive")
        if self.memory_budget < self.max_body_size:
            raise ValueError("memory_budget must be at least max_body_size")

    @property
    def tick(self) -> float:
        """How often a connection checks its timeouts."""
        return max(0.02, min(1.0, self.header_timeout / 4, self.body_timeout / 4,
                             self.send_timeout / 4, self.stall_grace / 2))


Observer = Callable[[str, int, float], None]
"""Told of every answer: the route (``other`` for an unknown path), the status, the seconds."""


class Router:
    """Paths to handlers (any method, as the Go server), the checks every request passes and
    the observers told of every answer (metrics)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.fast_routes: dict[str, FastHandler] = {}
        self.later_routes: dict[str, LaterHandler] = {}
        self.checks: list[Check] = []
        # The checks let every request through that has none of these (lower-case) headers:
        # the fast path does not call them for it. None: they are called for every request.
        self.checks_only_with: frozenset[str] | None = frozenset()
        self.observers: list[Observer] = []
        self.fallback: Handler | None = None  # for paths without a route (else 404)
        # A front worker's hand-over (chukcha.bus.handover): offered the bytes that start a
        # request on a connection with nothing in flight; True: the connection is no longer ours.
        self.handover: Callable[[asyncio.Transport, bytes], bool] | None = None

    def add_routes(self, routes: Mapping[str, Handler]) -> None:
        for path, handler in routes.items():
            if path in self.routes:
                raise ValueError(f"route {path} is defined twice")
            self.routes[path] = handler

    def add_fast_routes(self, routes: Mapping[str, FastHandler]) -> None:
        """Synchronous fast paths of routes added before (see :data:`~chukcha.bus.web.FastHandler`):
        tried first, inside the parser's callback, when the connection has no answer pending."""
        for path, handler in routes.items():
            if path not in self.routes:
                raise ValueError(f"fast route {path} has no route")
            self.fast_routes[path] = handler

    def add_later_routes(self, routes: Mapping[str, LaterHandler]) -> None:
        """Routes answered later without a task (a front worker's coalesced writes): tried
        inside the parser's callback when the connection has no answer pending and the router
        has no checks; a future is the answer to come, ``None`` runs the route's handler."""
        for path, handler in routes.items():
            if path not in self.routes:
                raise ValueError(f"later route {path} has no route")
            self.later_routes[path] = handler

    def add_check(self, check: Check, *, only_with: frozenset[str] | None = None) -> None:
        """A check every request passes before its handler (an answer refuses it).
        ``only_with``: the check lets every request without one of these (lower-case)
        headers through, so the fast path need not call it for such a request."""
        self.checks.append(check)
        if only_with is None or self.checks_only_with is None:
            self.checks_only_with = None
        else:
            self.checks_only_with |= only_with

    def add_observer(self, observer: Observer) -> None:
        self.observers.append(observer)


def error_response(exc: BaseException, request: Request | None) -> Response:
    """The plain-text answer for an exception (the server's one mapping point)."""
    if isinstance(exc, ChukchaError):
        if request is not None:
            logger.debug("%s %s -> %d %s", request.method, request.path_qs, exc.http_status, exc)
        resp = Response(status=exc.http_status, text=f"{exc}\n")
        if isinstance(exc, BodyTooLargeError):
            resp.force_close()
        return resp
    where = f"{request.method} {request.path_qs}" if request is not None else "request"
    logger.error("%s failed", where, exc_info=exc)
    return Response(status=500, text=f"internal error: {type(exc).__name__}: {exc}\n")

