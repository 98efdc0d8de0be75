"""A front worker's coalesced writes to the writer (``--workers N``, :mod:`chukcha.bus.front`).

Single writes with the same parameters and credentials that arrive in the same loop iteration,
or while one is on its way to the writer, go as one write (the first at the end of the
iteration, the others when it returns) (each body was validated on its own; a write lands
whole in one chunk, so every client gets the answer the batch got). Callers get a future of
their answer (the server sends it when it comes: ``Router.add_later_routes``).

A batch that would go with fewer writes than its key's recent batches held waits for that many,
at most :data:`HOLD` (1 ms). Why: the writer's cost is per batch (a request parsed, appended,
answered, and a wake-up on each side: 40-50 us of its CPU on the 2-core box), and closed-loop
clients answered together write again a little apart, so with many fronts each batch held 1-3
writes. Measured with 8 workers (7 fronts, 64 connections, ``bench/bench_vs_go.py``, side by
side): 5.8 writes per batch against 2.8, the writer's CPU 9.5 against 16.9 us per write (its
ceiling on one core ~105k writes/s against ~59k), the rate and p99 unchanged on 2 cores. The
expectation decays by half a write per batch, so after the load drops a few batches wait.

The writes travel as HTTP/1.1 over keep-alive connections to the writer's private unix
socket, each a plain :class:`asyncio.Protocol` (:class:`_WriterLink`): the request is written
and its answer parsed in ``data_received``, which answers the batch and sends the next one. No
task, coroutine or stream per write: a relay round trip through asyncio streams cost about as
much CPU as the write itself, which is what made small batches (8 connections) slower through a
front than straight to the writer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, cast

from chukcha.bus import web
from chukcha.errors import WriterUnavailableError

__all__ = ["HOLD", "KEPT_EXPECTATIONS", "Answer", "WriteCoalescer", "response_of"]

logger = logging.getLogger(__name__)

_POOL: Final = 64
_EMPTY_OK_START: Final = b"HTTP/1.1 200 OK\r\nDate: "
_EMPTY_OK_END: Final = b"\r\nContent-Length: 0\r\n\r\n"
_KEEP_ANSWER_HEADERS: Final = ("www-authenticate", "retry-after")
HOLD: Final = 0.001
"""Longest a batch waits for as many writes as its key's recent batches held (module doc)."""
KEPT_EXPECTATIONS: Final = 4096
"""Keys whose recent batches' size is kept at most (a key is a write's query string and
forwarded headers: a client may send a new one with each write)."""


@dataclass
class Answer:
    """The writer's answer to a relayed request."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunked: bool = False
    conn: object | None = None  # a streamed answer still reads from it (the stream client's)
    length: int = 0  # of a big answer still to be read from conn


_OK: Final = Answer(200, {})


def response_of(answer: Answer) -> web.Response:
    """The client's answer: the writer's status, body and the headers that matter."""
    if answer.status == 200 and not answer.body and not answer.headers:
        return web.Response()  # a write's answer
    headers = {k.title(): v for k, v in answer.headers.items() if k in _KEEP_ANSWER_HEADERS}
    return web.Response(status=answer.status, body=answer.body,
                        content_type=answer.headers.get("content-type", ""), headers=headers)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and the (lower-case) headers of an answer's head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


Done = Callable[["Answer | BaseException"], None]


class _WriterLink(asyncio.Protocol):
    """One keep-alive connection to the writer's private socket; answers come in order."""

    def __init__(self, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._timeout = timeout
        self._buf = b""
        self._waiting: deque[tuple[Done, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.alive = True

    def send(self, data: bytes, done: Done) -> None:
        assert self.transport is not None  # noqa: S101 - only alive links are used
        self._waiting.append((done, self._loop.time()))
        self.transport.write(data)
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        waited = self._loop.time() - self._waiting[0][1]
        if waited >= self._timeout:
            logger.warning("the writer process did not answer in %.0f s", waited)
            self._fail(WriterUnavailableError(
                f"the node's writer process did not answer in {waited:.0f} s "
                f"(the write may have landed)"))
            return
        self._timer = self._loop.call_later(self._timeout - waited, self._check)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while self._waiting:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end + 4]
            if head.startswith(_EMPTY_OK_START) and head.endswith(_EMPTY_OK_END) \
                    and head.count(b"\r\n") == 4:
                answer = _OK  # a write's answer (status, Date, Content-Length: 0)
                buf = buf[end + 4:]
            else:
                try:
                    status, headers = parse_head(head)
                    length = int(headers.get("content-length", "0"))
                except ValueError as exc:
                    self._fail(WriterUnavailableError(f"a bad answer from the writer: {exc}"))
                    return
                if len(buf) < end + 4 + length:
                    break
                answer = Answer(status, headers, buf[end + 4:end + 4 + length])
                buf = buf[end + 4 + length:]
                if headers.get("connection", "").lower() == "close":
                    self.alive = False
            done, _ = self._waiting.popleft()
            done(answer)
        self._buf = buf

    def _fail(self, exc: BaseException) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for done, _ in waiting:
            done(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(WriterUnavailableError(
            f"the node's writer process closed the connection: {exc!r} "
            f"(a write sent before may have landed)"))

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True, slots=True)
class _Target:
    key: str  # "" for a write of its own (too big to join the batch gathering)
    query: str
    headers: Mapping[str, str]


@dataclass
class _Batch:
    bodies: list[bytes | bytearray] = field(default_factory=list)
    waiters: list[asyncio.Future[web.StreamResponse]] = field(default_factory=list)
    size: int = 0
    # Writes answered through their callback (a front's fast path: Request.done), not a future.
    callbacks: list[Callable[[web.Outcome], None]] = field(default_factory=list)


class WriteCoalescer:
    """Coalesces single writes into writes of the writer (see the module doc)."""

    def __init__(self, path: str, max_batch: int, timeout: float = 90.0,
                 hold: float = HOLD) -> None:
        self._path = path
        self._max = max_batch
        self._timeout = timeout
        self._hold = hold
        self._gathering: dict[str, _Batch] = {}  # key -> the batch to send next
        self._in_flight: set[str] = set()  # keys with a batch on its way to the writer
        self._expect: dict[str, float] = {}  # key -> writes its recent batches held (peak)
        self._held: dict[str, tuple[_Target, asyncio.TimerHandle]] = {}  # waiting batches
        self._idle: list[_WriterLink] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, key: str, query: str, headers: Mapping[str, str],
               body: bytes | bytearray) -> asyncio.Future[web.StreamResponse]:
        """The future answer of a write: ``key`` says which writes may share one (the same
        parameters and credentials)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[web.StreamResponse] = loop.create_future()
        self._add(key, query, headers, body, fut=fut)
        return fut

    def submit_later(self, key: str, query: str, headers: Mapping[str, str],
                     body: bytes | bytearray, done: Callable[[web.Outcome], None]) -> None:
        """:meth:`submit`, answered by calling ``done`` (exactly once) with ``None`` for an
        empty 200, the writer's other answer, or the error: no future, no callback scheduled
        per write (a front's fast path, :meth:`Request.done <chukcha.bus.web.Request.done>`)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._add(key, query, headers, body, done=done)

    def _add(self, key: str, query: str, headers: Mapping[str, str], body: bytes | bytearray,
             *, fut: asyncio.Future[web.StreamResponse] | None = None,
             done: Callable[[web.Outcome], None] | None = None) -> None:
        batch = self._gathering.get(key)
        if batch is not None and batch.size + len(body) > self._max:
            # Too big to join the batch: a write of its own.
            batch = _Batch()
            self._send(_Target("", query, headers), _with(batch, body, fut, done))
            return
        if batch is not None:
            _with(batch, body, fut, done)
            held = self._held.get(key)
            if held is not None and len(batch.bodies) >= self._expect.get(key, 0.0):
                self._release(key)
            return
        self._gathering[key] = _with(_Batch(), body, fut, done)
        if key not in self._in_flight:
            # Sent at the end of this loop iteration: the writes that arrived with it (other
            # connections' in the same epoll round) go in the same batch.
            assert self._loop is not None  # noqa: S101 - set by the callers
            target = _Target(key, query, headers)
            if self._expect.get(key, 0.0) >= 2:
                self._held[key] = (target, self._loop.call_later(self._hold, self._release, key))
            else:
                self._loop.call_soon(self._launch, target)

    def _release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            held[1].cancel()
            assert self._loop is not None  # noqa: S101 - set by the callers
            self._loop.call_soon(self._launch, held[0])

    def _launch(self, target: _Target) -> None:
        batch = self._gathering.pop(target.key, None)
        if batch is not None:
            self._in_flight.add(target.key)
            n = len(batch.bodies)
            expect = max(n, self._expect.get(target.key, 0.0) - 0.5)
            if expect >= 2:
                if len(self._expect) >= KEPT_EXPECTATIONS and target.key not in self._expect:
                    self._expect.clear()  # many keys (a nonce per write...): start over
                self._expect[target.key] = expect
            else:
                # Below 2 an expectation holds nothing back, and decays below 2 again even
                # if kept: as good as none. Not kept, so a key per write keeps nothing.
                self._expect.pop(target.key, None)
            self._send(target, batch)

    def _send(self, target: _Target, batch: _Batch) -> None:
        body = batch.bodies[0] if len(batch.bodies) == 1 else b"".join(batch.bodies)
        head = [f"POST /write?{target.query} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in target.headers.items()]
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        while self._idle:
            link = self._idle.pop()
            if link.alive:
                link.send(data, functools.partial(self._done, target, batch, link))
                return
        assert self._loop is not None  # noqa: S101 - set by submit
        task = self._loop.create_task(self._open_and_send(target, batch, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_and_send(self, target: _Target, batch: _Batch, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, link = await loop.create_unix_connection(
                functools.partial(_WriterLink, self._timeout), self._path)
        except OSError as exc:
            self._done(target, batch, None, WriterUnavailableError(
                f"the node's writer process is not reachable: {exc}"))
            return
        link.send(data, functools.partial(self._done, target, batch, link))

    def _done(self, target: _Target, batch: _Batch, link: _WriterLink | None,
              answer: Answer | BaseException) -> None:
        outcome: web.Outcome
        if isinstance(answer, BaseException):
            self.close()  # the other idle links went to the same (dead or stuck) writer
            for fut in batch.waiters:
                if not fut.done():
                    fut.set_exception(answer)
            outcome = answer
        else:
            if link is not None and link.alive and len(self._idle) < _POOL:
                self._idle.append(link)
            elif link is not None:
                link.close()
            resp = response_of(answer)  # one answer object for all: only read when sent
            for fut in batch.waiters:
                if not fut.done():
                    fut.set_result(resp)
            # An empty 200 (a write's answer) as None: the connection sends its prebuilt head.
            outcome = None if answer is _OK else resp
        for done in batch.callbacks:
            try:
                done(outcome)
            except Exception:
                logger.exception("answering a coalesced write failed")
        if target.key:
            self._in_flight.discard(target.key)
            self._launch(target)  # the batch that gathered meanwhile, if any

    def close(self) -> None:
        for link in self._idle:
            link.close()
        self._idle.clear()


def _with(batch: _Batch, body: bytes | bytearray, fut: asyncio.Future[web.StreamResponse] | None,
          done: Callable[[web.Outcome], None] | None) -> _Batch:
    """``batch`` with one more write, answered by ``fut`` or ``done``."""
    batch.bodies.append(body)
    batch.size += len(body)
    if fut is not None:
        batch.waiters.append(fut)
    if done is not None:
        batch.callbacks.append(done)
    return batch
