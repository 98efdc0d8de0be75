"""The runner starts the app's sinks before reading and closes them in reverse order when the app
stops: after a graceful stop, on a processor error, and when a later sink fails to start."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import orjson
import pytest

from chukcha import App, Client, Context, Node
from chukcha.errors import ProcessorError


class ManagedSink:
    """An async context manager sink; records its lifecycle in a shared log."""

    def __init__(self, name: str, log: list[str], *, fail_stop: bool = False) -> None:
        self.name, self.log, self.fail_stop = name, log, fail_stop
        self.open = False
        self.exit_error: type[BaseException] | None = None

    async def __aenter__(self) -> ManagedSink:
        self.open = True
        self.log.append(f"{self.name} enter")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.open = False
        self.exit_error = exc_type
        self.log.append(f"{self.name} exit")
        if self.fail_stop:
            raise RuntimeError(f"{self.name} cannot close")

    async def flush(self, rows: Sequence[Any]) -> None:
        assert self.open, f"{self.name} flushed while not open"
        self.log.append(f"{self.name} flush {len(rows)}")


class StartStopSink:
    """A sink with start()/stop() (like ClickHouseSink's explicit API)."""

    def __init__(self, name: str, log: list[str], *, fail_start: bool = False) -> None:
        self.name, self.log, self.fail_start = name, log, fail_start
        self.open = False

    async def start(self) -> None:
        if self.fail_start:
            raise ConnectionRefusedError(f"{self.name} unreachable")
        self.open = True
        self.log.append(f"{self.name} start")

    async def stop(self) -> None:
        self.open = False
        self.log.append(f"{self.name} stop")

    async def flush(self, rows: Sequence[Any]) -> None:
        assert self.open, f"{self.name} flushed while not open"
        self.log.append(f"{self.name} flush {len(rows)}")


class FlushOnlySink:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def flush(self, rows: Sequence[Any]) -> None:
        self.log.append(f"plain flush {len(rows)}")


def sink_app(url: str, state: Any, sinks: dict[str, Any]) -> App:
    app = App("sinky", nodes=[url], state_dir=state)
    for name, sink in sinks.items():
        app.add_sink(name, sink)

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        if order.get("explode"):
            raise RuntimeError("boom")
        for name in sinks:
            ctx.to_sink(name, order["id"])
        ctx.emit("receipts", {"n": 1})

    return app


async def wait_receipts(client: Client, ids: set[str]) -> None:
    seen: set[str] = set()
    consumer = client.consumer("receipts")
    try:
        async with asyncio.timeout(30):
            while not ids <= seen:
                for batch in await consumer.read():
                    seen.update(orjson.loads(m)["id"] for m in batch.messages())
    finally:
        await consumer.stop()


async def test_sinks_started_before_reading_and_closed_in_reverse_order(
    node: Node, tmp_path: Any
) -> None:
    log: list[str] = []
    first, second = ManagedSink("a", log), StartStopSink("b", log)
    plain = FlushOnlySink(log)
    # The same object under two names is started and closed once.
    app = sink_app(node.url, tmp_path / "state", {"a": first, "b": second, "c": plain,
                                                  "a2": first})
    async with Client([node.url]) as client:
        await client.send("orders", [{"id": "x"}, {"id": "y"}])
        stop = asyncio.Event()
        task = asyncio.create_task(app.run_async(stop))
        await wait_receipts(client, {"x/0", "y/0"})
        assert log[:2] == ["a enter", "b start"]  # open while the app runs
        assert first.open and second.open
        stop.set()
        await asyncio.wait_for(task, 30)
    assert log[-2:] == ["b stop", "a exit"]
    assert first.exit_error is None
    flushes = log[2:-2]  # every flush happened while the sinks were open
    rows: dict[str, int] = {}
    for entry in flushes:
        sink, what, n = entry.split(" ")
        assert what == "flush"
        rows[sink] = rows.get(sink, 0) + int(n)
    assert rows == {"a": 4, "b": 2, "plain": 2}  # "a" got the rows of "a" and "a2"
    assert log.count("a enter") == log.count("a exit") == 1


async def test_sinks_closed_in_reverse_order_when_the_app_fails(
    node: Node, tmp_path: Any
) -> None:
    log: list[str] = []
    first = ManagedSink("a", log, fail_stop=True)  # its failing close must not hide the cause
    second = StartStopSink("b", log)
    app = sink_app(node.url, tmp_path / "state", {"a": first, "b": second})
    async with Client([node.url]) as client:
        await client.send("orders", [{"id": "x", "explode": True}])
        with pytest.raises(ProcessorError, match="boom"):
            await asyncio.wait_for(app.run_async(asyncio.Event()), 30)
    assert log == ["a enter", "b start", "b stop", "a exit"]
    assert first.exit_error is ProcessorError  # __aexit__ is told why the app stopped


async def test_a_sink_that_fails_to_start_stops_the_app_and_closes_the_others(
    node: Node, tmp_path: Any
) -> None:
    log: list[str] = []
    first, broken = ManagedSink("a", log), StartStopSink("b", log, fail_start=True)
    app = sink_app(node.url, tmp_path / "state", {"a": first, "b": broken})
    with pytest.raises(ConnectionRefusedError, match="b unreachable"):
        await asyncio.wait_for(app.run_async(asyncio.Event()), 30)
    assert log == ["a enter", "a exit"]
    assert first.exit_error is ConnectionRefusedError


async def test_a_sink_close_error_is_raised_after_a_clean_stop(
    node: Node, tmp_path: Any
) -> None:
    log: list[str] = []
    first, second = StartStopSink("a", log), ManagedSink("b", log, fail_stop=True)
    app = sink_app(node.url, tmp_path / "state", {"a": first, "b": second})
    stop = asyncio.Event()
    stop.set()  # stop at once: start, then close
    with pytest.raises(RuntimeError, match="b cannot close"):
        await asyncio.wait_for(app.run_async(stop), 30)
    assert log == ["a start", "b enter", "b exit", "a stop"]  # "a" is still closed
