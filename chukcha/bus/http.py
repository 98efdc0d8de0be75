"""The HTTP API of a node (``PROTOCOL.md``), served by :mod:`chukcha.bus.server`.

Handlers are thin: they parse parameters and call the :class:`~chukcha.bus.chunks.ChunkStore`.
Errors become responses in exactly one place, :func:`chukcha.bus.server.error_response`. Like
the Go server we ignore the HTTP method. Other components (replication, consumer groups) plug in
through the small protocols below and add their own routes to the node's
:class:`~chukcha.bus.server.Router`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

from chukcha.bus import web
from chukcha.bus.chunks import INLINE_WRITE_LIMIT, STREAM_READ_OVER, ChunkStore, FileSlice
from chukcha.bus.web import Handler
from chukcha.errors import BadRequestError, BodyTooLargeError
from chukcha.protocol import (
    MAX_INT_PARAM,
    check_messages,
    parse_chunk_name,
    parse_uint,
    validate_category,
)

__all__ = [
    "MAX_READ_WAIT",
    "AckHandler",
    "BusApi",
    "Fence",
    "Handler",
    "ReplicaWaiter",
    "bool_param",
    "float_param",
    "int_param",
    "str_param",
]

logger = logging.getLogger(__name__)

_JSON: Final = "application/json"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})
_POOLED_READ_OVER: Final = 64 << 10
"""Read answers that may be bigger than this are read into reused buffers."""
_POOLED_READ_BUFFERS: Final = 16
"""Buffers (of ``STREAM_READ_OVER`` bytes) kept for reuse."""
MAX_READ_WAIT: Final = 60.0
"""Longest ``wait`` (seconds) a long-polling ``/read`` may ask for."""


class ReplicaWaiter(Protocol):
    """Waits until ``count`` other nodes hold ``category/chunk`` up to ``end`` bytes."""

    async def wait_replicas(self, category: str, chunk: str, end: int, count: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Fence:
    """``/ack?...&partition=P&epoch=E`` (extension): the ack of a partitioned group's instance,
    applied only while its claim of partition ``P`` in etcd still has epoch ``E``. The claim is
    the one of the app named by ``group=``; an ack without a group (a partition's changelog,
    which no group reads) names the app with ``app=A`` instead."""

    partition: int
    epoch: int
    app: str | None = None


class AckHandler(Protocol):
    """Applies ``/ack`` (the consumer-group extension plugs in here)."""

    async def ack(
        self, category: str, chunk: str, size: int, group: str | None, *,
        fence: Fence | None = None,
    ) -> None: ...


def str_param(request: web.Request, name: str) -> str:
    """A required query parameter."""
    value = request.query.get(name)
    if value is None or value == "":
        raise BadRequestError(f"missing parameter {name!r}")
    return value


def int_param(
    request: web.Request, name: str, default: int | None = None, *, maximum: int = MAX_INT_PARAM
) -> int:
    """A non-negative integer query parameter, at most ``maximum`` (required unless ``default``
    is given)."""
    value = request.query.get(name)
    if value is None or value == "":
        if default is None:
            raise BadRequestError(f"missing parameter {name!r}")
        return default
    return parse_uint(name, value, maximum)


def bool_param(request: web.Request, name: str) -> bool:
    """An optional flag: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    value = request.query.get(name, "").lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequestError(f"parameter {name!r} must be 1 or 0 (true or false), got {value!r}")


def float_param(
    request: web.Request, name: str, default: float, *, maximum: float
) -> float:
    """An optional non-negative number of seconds, at most ``maximum``."""
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise BadRequestError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not 0 <= number <= maximum:
        raise BadRequestError(f"parameter {name!r} must be between 0 and {maximum}")
    return number


class _LocalAcks:
    """Without consumer groups: an ack tombstones the chunk (the Go behaviour)."""

    def __init__(self, store: ChunkStore) -> None:
        self._store = store

    async def ack(
        self, category: str, chunk: str, size: int, group: str | None, *,
        fence: Fence | None = None,
    ) -> None:
        if fence is not None:
            raise BadRequestError("a fenced ack (partition, epoch) needs consumer groups on a "
                                  "node started with --etcd")
        await self._store.ack(category, chunk, size)


class BusApi:
    """The data endpoints: ``/write``, ``/read``, ``/ack``, ``/listChunks``, ``/listCategories``."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        max_batch_size: int,
        max_message_size: int,
        replicas: ReplicaWaiter | None = None,
        acks: AckHandler | None = None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch_size
        self._max_message = max_message_size
        self.replicas = replicas
        self.acks: AckHandler = acks or _LocalAcks(store)
        self._buffers: list[bytearray] = []  # read answers' buffers, to reuse (see read)

    def routes(self) -> dict[str, Handler]:
        return {
            "/write": self.write,
            "/read": self.read,
            "/ack": self.ack,
            "/listChunks": self.list_chunks,
            "/listCategories": self.list_categories,
        }

    def fast_routes(self) -> dict[str, web.FastHandler]:
        return {"/write": self.write_now, "/read": self.read_now}

    def _body(self, request: web.Request) -> bytes | bytearray:
        # The server read the whole body (bounded by its body limit, which the node sets to
        # the batch limit, and with a 400 and a closed connection above it).
        body = request.body
        if len(body) > self._max_batch:
            raise BodyTooLargeError(self._max_batch)
        return body

    def write_now(self, request: web.Request) -> web.Response | web.Later | None:
        """``/write``'s fast path: a write without ``min_sync_replicas`` that the store takes
        without waiting (:meth:`ChunkStore.write_now`, a big body too), or gathered with the
        other small writes of this loop iteration (:meth:`ChunkStore.write_later`; a
        ``sync=1`` one is answered once a group fsync covers it); else ``None``. Bad
        parameters and bodies are refused here exactly as :meth:`write` refuses them."""
        qs = request.query_string
        sync = False
        if qs.startswith("category=") and "&" not in qs and "%" not in qs and "+" not in qs:
            category = qs[9:]  # what request.query holds for it (every client's write)
        else:
            query = request.query
            if len(query) == 2 and "sync" in query:  # a durable write (or sync=0)
                category = query.get("category", "")
                if not category or not self._store.has_category(category):
                    return None  # validated, and created, by the handler
                sync = bool_param(request, "sync")  # a bad value: the handler's 400
            elif len(query) != 1:  # more than the category (min_sync_replicas...) or none
                return None  # validated, and waited for, by the handler
            else:
                category = query.get("category", "")
        if not category or not self._store.has_category(category):
            return None  # its first write validates and creates it
        body = request.body
        n = len(body)
        if n > self._max_batch:
            raise BodyTooLargeError(self._max_batch)
        if not n or body[-1] != 0x0A or n > self._max_message + 1:
            check_messages(body, self._max_message)  # refuses it, or checks each message
        if request.deferrable and n <= INLINE_WRITE_LIMIT:
            # Gathered with this loop iteration's other small writes (a big one is written now).
            return web.LATER if self._store.write_later(category, body, request.done,
                                                        sync=sync) else None
        if sync or self._store.write_now(category, body) is None:
            return None
        return web.Response()

    async def write(self, request: web.Request) -> web.StreamResponse:
        category = str_param(request, "category")
        if not self._store.has_category(category):  # known ones were validated when created
            validate_category(category)
        min_sync = int_param(request, "min_sync_replicas", 0)
        sync = bool_param(request, "sync")
        if min_sync > 0 and self.replicas is None:
            # Refused before anything is written: waiting could never help a standalone node.
            raise BadRequestError(
                f"min_sync_replicas={min_sync} but this node has no peers to replicate to"
            )
        body = self._body(request)
        check_messages(body, self._max_message)
        result = await self._store.write(category, body, sync=sync)
        if min_sync > 0 and self.replicas is not None:
            await self.replicas.wait_replicas(category, result.chunk, result.end, min_sync)
        return web.Response()

    def read_now(self, request: web.Request) -> web.Response | None:
        """``/read``'s fast path: a read of a live chunk here, not a long poll, of at most
        64 KiB already in the page cache (:meth:`ChunkStore.read_now`); else ``None``. An
        unknown category or chunk goes to :meth:`read`, so every error is the handler's."""
        query = request.query
        wait = query.get("wait")
        if wait and wait != "0":
            return None  # a long poll (or a bad wait): the handler
        category = query.get("category")
        chunk = query.get("chunk")
        if not category or not chunk or self._store.chunk_size(category, chunk) is None:
            return None
        # Both names are known here, so valid: the handler would refuse nothing before these.
        found = self._store.read_now(category, chunk, int_param(request, "off"),
                                     int_param(request, "max_size"))
        if found is None:
            return None
        return web.Response(body=found, content_type="application/octet-stream")

    async def read(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        chunk = str_param(request, "chunk")
        parse_chunk_name(chunk)
        off = int_param(request, "off")
        max_size = int_param(request, "max_size")
        wait = float_param(request, "wait", 0.0, maximum=MAX_READ_WAIT)
        if wait > 0:
            # Extension: a long poll. With nothing at `off` yet, answer when data arrives, the
            # chunk becomes complete, or `wait` seconds pass; an empty 200 still means "no more".
            data = await self._store.read_wait(category, chunk, off, max_size, wait)
            await request.hold_memory(len(data))
        else:
            size = self._store.chunk_size(category, chunk)
            if size is not None and off < size <= off + STREAM_READ_OVER:
                # Counted before the bytes are read: a client slow to take its answer must not
                # make the node hold unbounded memory (ServerLimits.memory_budget). Bigger
                # answers are sent from the file piece by piece (a FileSlice).
                await request.hold_memory(min(max_size, size - off))
            buf: bytearray | None = None
            if size is not None and min(max_size, size - off) > _POOLED_READ_OVER:
                buf = self._buffers.pop() if self._buffers else bytearray(STREAM_READ_OVER)
            try:
                found = await self._store.read_slice(category, chunk, off, max_size, buf)
            except BaseException:
                self._give_back(buf)
                raise
            if isinstance(found, FileSlice):
                self._give_back(buf)
                return web.FileResponse(found.fd, found.offset, found.length, found.sent)
            if buf is not None and isinstance(found, memoryview) and found.obj is buf:
                # Read into a reused buffer: a 1 MiB answer no longer costs a fresh 1 MiB
                # allocation (page faults, zeroing: ~15 % of a bulk read's CPU in perf).
                return web.Response(body=found, content_type="application/octet-stream",
                                    release=functools.partial(self._give_back, buf))
            self._give_back(buf)
            data = found
        return web.Response(body=data, content_type="application/octet-stream")

    def _give_back(self, buf: bytearray | None) -> None:
        if buf is not None and len(self._buffers) < _POOLED_READ_BUFFERS:
            self._buffers.append(buf)

    async def ack(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        chunk = str_param(request, "chunk")
        parse_chunk_name(chunk)
        size = int_param(request, "size")
        group = request.query.get("group") or None
        fence = None
        if "partition" in request.query or "epoch" in request.query:
            fence = Fence(int_param(request, "partition", maximum=1023),
                          int_param(request, "epoch"), request.query.get("app") or None)
        await self.acks.ack(category, chunk, size, group, fence=fence)
        return web.Response()

    async def list_chunks(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        chunks = self._store.list_chunks(category)
        # The Go server answers `null` for none; `[]` decodes the same in Go and is kinder to
        # everyone else.
        body = orjson.dumps([c.to_json() for c in chunks])
        return web.Response(body=body, content_type=_JSON)

    async def list_categories(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self._store.categories()), content_type=_JSON)
