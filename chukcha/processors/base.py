"""The processor API: :class:`App`, ``@app.processor(category)``, sinks.

An app is a consumer group: ``App("billing", ...)`` reads its categories as group ``billing``
and keeps one state directory shared by all its processors. :class:`App` is a pure definition
(handlers, sinks, key and ID functions, config): this module imports nothing that runs. Running
it is :mod:`chukcha.processors.runner`'s job (``App.run`` hands over to it); the commit protocol
is :mod:`chukcha.processors.checkpoint` over :mod:`chukcha.processors.engine`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from chukcha.codecs import JSON, Codec, CodecSpec, get_codec
from chukcha.partitioning import check_partitions
from chukcha.processors.config import ErrorPolicy, ProcessorConfig
from chukcha.processors.windows import Window
from chukcha.protocol import validate_category

if TYPE_CHECKING:
    import asyncio

    from chukcha.processors.context import Context
    from chukcha.processors.group import GroupConfig
    from chukcha.processors.split import StaticSplit

__all__ = ["App", "EventIdFn", "Handler", "KeyFn", "ProcessorFn", "Sink", "TimerHandler"]

logger = logging.getLogger(__name__)

ProcessorFn = Callable[["Context", Any], "Awaitable[None] | None"]
"""``def cb(ctx, event) -> None`` or ``async def cb(ctx, event) -> None``."""
EventIdFn = Callable[[Any], "str | None"]
"""Returns an event's ID (``None``: derive one from its position)."""
KeyFn = Callable[[Any], "str | int"]
"""Returns an event's key (a string or an integer): it decides the event's partition."""

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound="Sink")


class Sink(Protocol):
    """An external store fed with rows staged by ``ctx.to_sink(name, row)``.

    Only ``flush`` is required. A sink that is also an async context manager (or has
    ``async start()`` and ``async stop()``) is entered when the app starts, before anything is
    read, and closed in reverse registration order when the app stops, also on an error; a
    sink that fails to start stops the app. So a sink can keep one connection for its lifetime.
    The app owns that lifecycle: a sink that is also entered elsewhere must tolerate a second
    start (as ``examples.clickhouse_sink.ClickHouseSink`` does: start and stop are idempotent).
    """

    async def flush(self, rows: Sequence[Any]) -> None:
        """Write ``rows`` idempotently. Raise to make the framework retry the SAME rows (with
        backoff). Called before the state commit (so before the acks)."""
        ...


@dataclass(frozen=True, slots=True)
class Handler:
    """One registered processor."""

    category: str
    fn: ProcessorFn
    is_async: bool
    key: KeyFn | None = None
    """The key function (``None``: the event ID is the key)."""
    codec: Codec = JSON
    """Decodes each line into the event the callback gets (:mod:`chukcha.codecs`)."""
    input_partitions: int | None = None
    """The partition count the input category must have on the bus (``None``: any; an input
    not partitioned like the app is repartitioned)."""


@dataclass(frozen=True, slots=True)
class TimerHandler:
    """A periodic timer (``every`` seconds, ``fn(ctx)``) or the per-key timer handler
    (``every`` is 0, ``fn(ctx, key)``); see :mod:`chukcha.processors.timers`."""

    name: str
    every: float
    fn: Callable[..., Awaitable[None] | None]
    is_async: bool


def default_event_id(event: Any) -> str | None:
    """The ``id`` field of a JSON object (a string or an integer), else ``None``."""
    if type(event) is dict:
        value = event.get("id")
        if type(value) is str:
            return value
        if value is not None and type(value) is int:
            return str(value)
    return None


class App:
    """A group of processors sharing one state (``state_dir``) and one consumer group (``name``).

    Args:
        name: the consumer group; also names the default state directory ``./<name>-state``.
        nodes: node URLs; the app reads from the first one that answers and sends emits to any.
        state_dir: the LevelDB directory (one running instance per directory).
        config: :class:`ProcessorConfig`; ``on_error`` and ``event_id`` are shortcuts.
        on_error: ``"stop"`` or ``"dead_letter"`` (overrides ``config.on_error``).
        event_id: a function ``event -> str | None`` giving an event's ID (default: its ``id``
            field). An event without one gets an ID derived from where it is stored,
            ``"<category>:<chunk>:<offset>"``: redeliveries of that copy are deduplicated, but
            a copy written to a second node is a different event.
        partitions: how many partitions (1..1024, default 1) the state is split into. An
            event's partition is the stable hash of its key (``@app.processor(c, key=fn)``;
            default: its ID), see :mod:`chukcha.partitioning`; each partition keeps its own
            state, dedup IDs, positions and outbox in ``<state_dir>/p0003``. The count of an
            existing state directory cannot change.
        standbys: with instances through etcd, how many other instances follow each
            partition's changelog for a fast failover (overrides ``config.standbys``).

    Raises:
        ValueError: ``partitions`` outside 1..1024, no nodes.
    """

    def __init__(
        self,
        name: str,
        nodes: Sequence[str] = ("http://127.0.0.1:8080",),
        state_dir: str | Path | None = None,
        *,
        config: ProcessorConfig | None = None,
        on_error: str | ErrorPolicy | None = None,
        event_id: EventIdFn | None = None,
        partitions: int = 1,
        standbys: int | None = None,
    ) -> None:
        validate_category(name)
        self.partitions = check_partitions(partitions)
        if not nodes:
            raise ValueError("an app needs at least one node URL")
        self.name = name
        self.nodes = tuple(n if "://" in n else f"http://{n}" for n in nodes)
        self.state_dir = Path(state_dir) if state_dir is not None else Path(f"{name}-state")
        cfg = config or ProcessorConfig()
        if on_error is not None:
            cfg = replace(cfg, on_error=ErrorPolicy(on_error))
        if standbys is not None:
            cfg = replace(cfg, standbys=standbys)
        self.config = cfg
        self.event_id: EventIdFn = event_id or default_event_id
        self._handlers: dict[str, Handler] = {}
        self._sinks: dict[str, Sink] = {}
        self._timers: dict[str, TimerHandler] = {}
        self._windows: dict[str, Window] = {}
        self._views: list[str] = []
        self.key_timer: TimerHandler | None = None
        """The ``@app.on_timer`` handler of ``ctx.schedule``'d timers."""

    def __repr__(self) -> str:
        return (f"App({self.name!r}, categories={sorted(self._handlers)}, "
                f"partitions={self.partitions})")

    @property
    def handlers(self) -> Mapping[str, Handler]:
        return self._handlers

    @property
    def sinks(self) -> Mapping[str, Sink]:
        return self._sinks

    def processor(
        self, category: str, *, key: KeyFn | None = None, codec: CodecSpec = "json",
        input_partitions: int | None = None,
    ) -> Callable[[F], F]:
        """Register ``fn(ctx, event)`` for every event of ``category``.

        ``codec`` (:mod:`chukcha.codecs`) decodes each line: ``"json"`` (default), ``"str"``
        (a line of text), ``"bytes"``, or a class (``msgspec.Struct``, dataclass, attrs,
        pydantic model) whose instances the callback gets, validated. A line that fails to
        decode is dead-lettered to ``<category>.dead`` with the reason, counted
        (``undecodable``) and warned about, whatever ``on_error`` says.

        ``key(event)`` (a string or an integer) decides the event's partition and is
        ``ctx.key``; without it the event ID is the key. All copies of an event must get the
        same key (a function of the event's content), so that dedup stays exact. A key function
        that raises or returns another type is a failure of that event: the error policy
        decides (stop, or dead-letter it).

        The input of an app with several partitions is read from the bus as it is when the
        category is partitioned with the app's count (``Client.create_partitions``); else a
        repartitioning stage copies it by key into the app's own ``<app>.<category>``
        (:mod:`chukcha.processors.repartition`). ``input_partitions=N`` pins the count the
        input must have: the app then refuses to start when the bus says otherwise.
        """
        validate_category(category)
        if input_partitions is not None:
            check_partitions(input_partitions)
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the event, not {type(key).__name__}")
        decoder = get_codec(codec)

        def register(fn: F) -> F:
            if category in self._handlers:
                raise ValueError(f"category {category!r} already has a processor")
            is_async = inspect.iscoroutinefunction(fn)
            self._handlers[category] = Handler(category, fn, is_async, key, decoder,
                                               input_partitions)
            return fn

        return register

    @property
    def timers(self) -> Mapping[str, TimerHandler]:
        """The periodic timers by name."""
        return self._timers

    def timer(self, every: float, *, name: str | None = None) -> Callable[[F], F]:
        """Run ``fn(ctx)`` about every ``every`` seconds, in every partition, with that
        partition's table and emits; committed like an event (see
        :mod:`chukcha.processors.timers`). ``name`` (default: the function's qualified name)
        keys its stored next due time: keep it stable across deployments."""
        value: object = every
        if isinstance(value, bool) or not isinstance(value, int | float) or not every > 0:
            raise ValueError(f"every must be a positive number of seconds, not {every!r}")

        def register(fn: F) -> F:
            timer_name = name or fn.__qualname__
            if timer_name in self._timers:
                raise ValueError(f"timer {timer_name!r} is already registered")
            self._timers[timer_name] = TimerHandler(timer_name, float(every), fn,
                                                    inspect.iscoroutinefunction(fn))
            return fn

        return register

    def window(self, name: str, *, size: float, hop: float | None = None, grace: float = 0.0,
               emit_to: str | None = None) -> Window:
        """A tumbling (or, with ``hop``, hopping) event-time window kept in this app's table;
        see :mod:`chukcha.processors.windows`."""
        if name in self._windows:
            raise ValueError(f"window {name!r} is already defined")
        window = self._windows[name] = Window(name, size=size, hop=hop, grace=grace,
                                              emit_to=emit_to)
        return window

    @property
    def views(self) -> Sequence[str]:
        """The apps whose tables this app looks up (:meth:`view`)."""
        return tuple(self._views)

    def view(self, app: str) -> str:
        """Follow app ``app``'s table (its changelog on the bus: that app runs with
        ``ProcessorConfig(changelog=True)``) for ``ctx.lookup(app, key)`` in callbacks; the
        runner starts the view and waits (up to ``config.stop_timeout`` * 3) until it has
        caught up before processing. See :mod:`chukcha.processors.views`."""
        validate_category(app)
        if app not in self._views:
            self._views.append(app)
        return app

    def on_timer(self, fn: F) -> F:
        """Register ``fn(ctx, key)`` for the timers callbacks set with
        ``ctx.schedule(at, key)``: it runs once per timer, at or soon after ``at``, in the
        partition of the event that scheduled it."""
        if self.key_timer is not None:
            raise ValueError("an on_timer handler is already registered")
        self.key_timer = TimerHandler("@key", 0.0, fn, inspect.iscoroutinefunction(fn))
        return fn

    def add_sink(self, name: str, sink: S) -> S:
        """Register a sink for ``ctx.to_sink(name, row)``; returns ``sink``."""
        if name in self._sinks:
            raise ValueError(f"sink {name!r} is already registered")
        if not callable(getattr(sink, "flush", None)):
            raise TypeError("a sink needs an async flush(rows) method")
        self._sinks[name] = sink
        return sink

    async def run_async(
        self, stop: asyncio.Event | None = None, *, split: StaticSplit | None = None,
        http: str | None = None, group: GroupConfig | None = None,
    ) -> None:
        """Run until ``stop`` is set (or the task is cancelled), then stop gracefully: finish
        the batch, commit, ack, close. ``split``: run only instance ``split.index`` of
        ``split.count``'s share of the partitions (:mod:`chukcha.processors.split`). ``http``:
        ``HOST:PORT`` to serve the app's ``/metrics`` on. ``group``: join the app's instances
        through etcd (:mod:`chukcha.processors.group`). Same as
        :func:`chukcha.processors.runner.run_app_async`.

        Raises:
            ProcessorError: a callback failed under the ``stop`` error policy.
            StateLockedError: another process runs on ``state_dir``.
        """
        # The definition does not import the machinery that runs it; this is the hand-over.
        from chukcha.processors.runner import run_app_async  # noqa: PLC0415

        await run_app_async(self, stop, split=split, http=http, group=group)

    def run(self, *, split: StaticSplit | None = None, http: str | None = None,
            group: GroupConfig | None = None) -> None:
        """Run until SIGINT or SIGTERM (blocking). Same as
        :func:`chukcha.processors.runner.run_app`."""
        from chukcha.processors.runner import run_app  # noqa: PLC0415

        run_app(self, split=split, http=http, group=group)
