"""Replication progress reports: how a replica tells an owner how far it holds its chunks.

:class:`ProgressReporter` (one per :class:`~chukcha.bus.replication_link.PeerLink`) sends
``/replication/ack`` to the owner, which counts it towards ``min_sync_replicas``
(:meth:`~chukcha.bus.replication.ReplicationServer.record`). Downloads queue a report and never
wait for it; only the furthest position per category is sent (downloads are in order), and a
report that could not be sent is retried. :class:`Throttle` bounds how often a catch-up queues
one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

import aiohttp

from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.replication import position_rank

__all__ = ["ProgressReporter", "Throttle"]

logger = logging.getLogger(__name__)

_REPORT_EVERY: Final = 0.05
"""During a catch-up, progress is reported to the owner at most this often (and at its end)."""


class ProgressReporter:
    """Progress reports of one replica (``instance``) to one owner (``peer``)."""

    def __init__(
        self,
        peer: Peer,
        instance: str,
        config: ReplicationConfig,
        session: aiohttp.ClientSession,
    ) -> None:
        self.peer = peer
        self._me = instance
        self._config = config
        self._session = session
        self._reports: dict[str, tuple[str, int]] = {}  # category -> furthest (chunk, size)
        self._report_wake = asyncio.Event()

    def report(self, category: str, chunk: str, size: int) -> None:
        """Queue a progress report for the owner; the reporter task sends the furthest
        position per category (downloads are in order, so holding ``(chunk, size)`` means
        holding everything before it: catching up 2,000 chunks costs a few reports, not 2,000),
        so downloads never wait for it."""
        new = (chunk, size)
        cur = self._reports.get(category)
        if cur is None or position_rank(new) > position_rank(cur):
            self._reports[category] = new
        self._report_wake.set()

    async def report_loop(self) -> None:
        """Send queued reports until cancelled (the owner of the task is the link)."""
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            pending, self._reports = self._reports, {}
            failed = False
            for category, (chunk, size) in pending.items():
                if failed or not await self._send_report_safe(category, chunk, size):
                    failed = True
                    # Keep it (unless a newer report replaced it) and retry: a writer waiting
                    # on min_sync_replicas may depend on exactly this report.
                    self._reports.setdefault(category, (chunk, size))
            if failed:
                self._report_wake.set()
                await asyncio.sleep(self._config.retry_interval)  # retry backoff

    async def _send_report_safe(self, category: str, chunk: str, size: int) -> bool:
        try:
            return await self._send_report(category, chunk, size)
        except Exception:
            # Never let the reporter die: writers waiting on min_sync_replicas depend on it.
            logger.exception("instance=%s reporting %s/%s@%d to %s failed", self._me, category,
                             chunk, size, self.peer.instance)
            return False

    async def _send_report(self, category: str, chunk: str, size: int) -> bool:
        try:
            async with self._session.get(
                f"{self.peer.url}/replication/ack",
                params={"category": category, "chunk": chunk, "instance": self._me,
                        "size": str(size)},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("reporting %s/%s@%d to %s failed: %s", category, chunk, size,
                         self.peer.instance, exc)
            return False


class Throttle:
    """Progress reports of one catch-up: at its end and at most every ``_REPORT_EVERY``
    seconds meanwhile (holding a later position implies every earlier one)."""

    def __init__(self, report: Callable[[str, int], None]) -> None:
        self._report = report
        self._at = time.monotonic()
        self._unsent: tuple[str, int] | None = None

    def progress(self, chunk: str, size: int) -> None:
        self._unsent = (chunk, size)
        now = time.monotonic()
        if now - self._at >= _REPORT_EVERY:
            self._at = now
            self.flush()

    def flush(self) -> None:
        if self._unsent is not None:
            self._report(*self._unsent)
            self._unsent = None
