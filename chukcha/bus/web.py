"""The request and response types of the node's HTTP server (:mod:`chukcha.bus.server`).

Handlers take a :class:`Request` and return a :class:`Response` (or a :class:`StreamResponse`
they wrote themselves). The names and the parts of the API the node uses follow aiohttp's
(``request.query``, ``Response(body=..., text=..., content_type=..., status=...)``,
``json_response``, ``StreamResponse.prepare/write``), so a handler reads the same either way.

A request's body has been read completely (and bounded by the server's body limit) before the
handler runs: ``await request.read()`` never waits on the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, TypeAlias, overload
from urllib.parse import parse_qsl

import orjson

__all__ = [
    "LATER",
    "Check",
    "FastHandler",
    "FileResponse",
    "Handler",
    "Later",
    "LaterHandler",
    "Outcome",
    "Request",
    "Response",
    "StreamResponse",
    "StreamSink",
    "json_response",
]

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"


class StreamSink(Protocol):
    """What a :class:`StreamResponse` writes to (the server's connection)."""

    def start_stream(self, status: int, headers: Mapping[str, str]) -> None: ...

    async def write_stream(self, data: bytes) -> None: ...

    def end_stream(self) -> None: ...

    async def hold_memory(self, n: int) -> None: ...

    def deliver(self, request: Request, outcome: Outcome) -> None: ...


class Headers(dict[str, str]):
    """Request headers by lower-case name; looked up case-insensitively (``get("Origin")``)."""

    __slots__ = ()

    @overload  # type: ignore[override]
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


def parse_query(query_string: str) -> dict[str, str]:
    """``parse_qsl(keep_blank_values=True)``, the first of repeated names kept; a query without
    ``%`` or ``+`` (every Chukcha client's) is split directly, ~5x faster than ``parse_qsl``."""
    query: dict[str, str] = {}
    if not query_string:
        return query
    if "%" in query_string or "+" in query_string:
        for name, value in parse_qsl(query_string, keep_blank_values=True):
            query.setdefault(name, value)
        return query
    for field in query_string.split("&"):
        if field:  # parse_qsl skips empty fields
            name, _, value = field.partition("=")
            if name not in query:
                query[name] = value
    return query


class Request:
    """One parsed HTTP request."""

    __slots__ = ("_conn", "_query", "body", "deferrable", "headers", "keep_alive", "method",
                 "path", "query_string", "remote", "version")

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: Headers,
        body: bytes | bytearray,
        *,
        version: str = "1.1",
        keep_alive: bool = True,
        remote: str = "",
        conn: StreamSink | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers  # the last of repeated headers wins
        self.body = body
        self.version = version
        self.keep_alive = keep_alive
        self.remote = remote
        self._conn = conn
        self._query: dict[str, str] | None = None
        # Whether a fast path may answer it later (:data:`LATER`); the server says so.
        self.deferrable = False

    @property
    def query(self) -> Mapping[str, str]:
        """The query parameters (the first of repeated names wins, as in aiohttp's ``get``)."""
        if self._query is None:
            self._query = parse_query(self.query_string)
        return self._query

    @property
    def host(self) -> str:
        return self.headers.get("host") or ""

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query_string}" if self.query_string else self.path

    @property
    def content_length(self) -> int:
        return len(self.body)

    async def read(self) -> bytes | bytearray:
        """The whole body (already received; a big one in the ``bytearray`` it was received
        into, without a copy)."""
        return self.body

    async def hold_memory(self, n: int) -> None:
        """Count ``n`` bytes of the answer being built against the server's memory budget
        (may wait while slow clients hold it; see ``ServerLimits.memory_budget``)."""
        if self._conn is not None:
            await self._conn.hold_memory(n)

    def done(self, outcome: Outcome = None) -> None:
        """Answer a request whose fast path returned :data:`LATER` (exactly once): ``None``,
        an empty 200; an exception, the answer it becomes; or the answer given."""
        if self._conn is not None:
            self._conn.deliver(self, outcome)

    def sink(self) -> StreamSink:
        if self._conn is None:
            raise RuntimeError("this request has no connection to stream to")
        return self._conn


class StreamResponse:
    """A response of unknown length written piece by piece (``/replication/events``).

    ``await prepare(request)`` sends the status and headers; ``await write(data)`` sends a piece
    and waits while the client is slow to take it; the handler then returns this object.
    """

    def __init__(self, *, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self._sink: StreamSink | None = None

    @property
    def prepared(self) -> bool:
        return self._sink is not None

    async def prepare(self, request: Request) -> None:
        if self._sink is None:
            self._sink = request.sink()
            self._sink.start_stream(self.status, self.headers)

    async def write(self, data: bytes) -> None:
        if self._sink is None:
            raise RuntimeError("StreamResponse.write before prepare")
        await self._sink.write_stream(data)

    async def write_eof(self) -> None:
        if self._sink is not None:
            self._sink.end_stream()


class Response(StreamResponse):
    """A complete response: status, headers and a body of known length."""

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes | bytearray | memoryview = b"",
        text: str | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        # Called once the server has handed every byte of ``body`` to the kernel (the buffer
        # may then be reused); never called if the connection is lost first.
        self.release = release
        if text is not None:
            self.body: bytes | bytearray | memoryview = text.encode()
            self.content_type = content_type or _TEXT
        else:
            self.body = body
            self.content_type = content_type or ("application/octet-stream" if body else "")
        self.close = False  # close the connection after this response

    def force_close(self) -> None:
        self.close = True


class FileResponse(Response):
    """``length`` bytes of the open file ``fd`` from ``offset``, sent piece by piece as the
    client takes them (the server closes ``fd``). A file that reads short (truncated meanwhile)
    aborts the connection: the client sees a broken answer, never wrong bytes. ``on_sent``
    is called with each piece once it is handed to the transport."""

    def __init__(
        self, fd: int, offset: int, length: int,
        on_sent: Callable[[bytes], None] | None = None,
    ) -> None:
        super().__init__(content_type="application/octet-stream")
        self.fd = fd
        self.offset = offset
        self.length = length
        self.on_sent = on_sent


def json_response(data: Any, *, status: int = 200) -> Response:
    return Response(status=status, body=orjson.dumps(data), content_type=_JSON)


Handler = Callable[[Request], Awaitable[StreamResponse]]
"""A route's handler."""

Check = Callable[[Request], StreamResponse | None]
"""A per-request check run before the handler (authentication, ...): ``None`` lets the request
through, a :class:`Response` answers it instead (for example a 401). Checks are synchronous: they
run for every request, also on the server's fast path, which never waits."""

LaterHandler = Callable[[Request], "asyncio.Future[StreamResponse] | None"]
"""A route answered later without a task (:meth:`Router.add_later_routes
<chukcha.bus.server.Router.add_later_routes>`): the future of its answer (an exception in it is
answered as the handler's would be), else ``None`` and the handler runs."""

Outcome: TypeAlias = "BaseException | StreamResponse | None"
"""What answers a deferred request (:meth:`Request.done`): ``None`` (an empty 200), an exception
(the answer it becomes) or an answer."""


class Later:
    """The type of :data:`LATER`."""

    __slots__ = ()


LATER: Final = Later()
"""What a fast path returns for a request it will answer later, with :meth:`Request.done`
(allowed when ``request.deferrable``): the node gathers the small writes of one event-loop
iteration and writes them at its end with one system call, then answers each."""

FastHandler = Callable[[Request], "Response | Later | None"]
"""A route's synchronous fast path, tried before its :data:`Handler`: the answer when it can be
given without waiting (a small write into the current chunk), :data:`LATER` when it will be given
at the end of this event-loop iteration (see there), else ``None`` and the handler runs (it must
not have changed anything then). It saves a task and its coroutines per request."""

