"""A thin blocking wrapper around :class:`~chukcha.client.Client`, for scripts.

.. code-block:: python

    with SyncClient(["http://127.0.0.1:8080"]) as c:
        c.send("orders", [{"customer": "ann", "amount": 5}])
        with c.consumer("orders", group="report") as consumer:
            for batch in consumer.read(timeout=1.0):
                ...
                consumer.commit({batch.owner: batch.position})

It runs a private event loop in the calling thread (``asyncio.Runner``), so it cannot be used
from inside a running event loop: there, use the asyncio :class:`Client`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from chukcha.client.client import Client
from chukcha.client.consumer import Batch, Consumer, Position
from chukcha.client.events import Event, event_list
from chukcha.protocol import ChunkInfo

__all__ = ["SyncClient", "SyncConsumer"]

T = TypeVar("T")


class SyncClient:
    """Blocking :class:`Client`: the same arguments, the same methods, without ``await``."""

    def __init__(self, nodes: str | Sequence[str], **kwargs: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("SyncClient cannot run inside an event loop; use Client")
        self._runner = asyncio.Runner()
        self._client = self._runner.run(_make(nodes, kwargs))
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("client is closed")
        return self._runner.run(coro)

    def send(self, category: str, events: Event | Iterable[Event], **kwargs: Any) -> list[str]:
        """:meth:`Client.send`: write with failover; returns the event IDs."""
        return self._run(self._client.send(category, event_list(events), **kwargs))

    def send_to(
        self, node_url: str, category: str, events: Event | Iterable[Event], **kwargs: Any
    ) -> list[str]:
        return self._run(self._client.send_to(node_url, category, event_list(events),
                                              **kwargs))

    def list_categories(self) -> list[str]:
        return self._run(self._client.list_categories())

    def list_chunks(self, category: str) -> list[ChunkInfo]:
        return self._run(self._client.list_chunks(category))

    def consumer(
        self,
        category: str,
        *,
        group: str | None = None,
        positions: Mapping[str, Position] | None = None,
        **kwargs: Any,
    ) -> SyncConsumer:
        consumer = self._client.consumer(category, group=group, positions=positions, **kwargs)
        return SyncConsumer(self, consumer)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._runner.run(self._client.close())
        finally:
            self._closed = True
            self._runner.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncConsumer:
    """Blocking :class:`Consumer`."""

    def __init__(self, client: SyncClient, consumer: Consumer) -> None:
        self._client = client
        self._consumer = consumer

    @property
    def caught_up(self) -> bool:
        return self._consumer.caught_up

    def positions(self) -> dict[str, Position]:
        return self._consumer.positions()

    def read(self, timeout: float | None = None) -> list[Batch]:
        return self._client._run(self._consumer.read(timeout))  # noqa: SLF001 - same module

    def commit(self, positions: Mapping[str, Position]) -> None:
        self._client._run(self._consumer.commit(positions))  # noqa: SLF001

    def __iter__(self) -> Iterator[Batch]:
        """Every batch, following forever."""
        while True:
            yield from self.read()

    def close(self) -> None:
        self._client._run(self._consumer.stop())  # noqa: SLF001

    def __enter__(self) -> SyncConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _make(nodes: str | Sequence[str], kwargs: dict[str, Any]) -> Client:
    client = Client(nodes, **kwargs)
    await client.start()
    return client
