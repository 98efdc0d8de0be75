"""An app instance's partitions whose start failed: the backoff before claiming each again, the
``failing/<partition:04d>/<instance>`` key that shows it (``chukcha app status``), and the log.

Used by :class:`~chukcha.bus.app_coordination.AppInstances`, which owns the etcd session: this
module only says which of this instance's ``failing`` keys to put (under its lease) and delete,
through :class:`~chukcha.bus.app_view.OwnKeys`; it never sees the etcd client. A partition whose
start fails is retried after :data:`LISTENER_RETRY_FIRST` s, doubling up to
:data:`LISTENER_RETRY_MAX` s, for as long as it fails and the assignment gives it to this instance:
the causes seen (no node answering a restore, too few for its quorum) are the bus's and would fail
on any instance, so the partition is not pushed onto another one (a user who knows the cause is
local stops this instance, and another takes the partition). Meanwhile the key says how many times
in a row, since when and why; from the :data:`FAILING_ADVICE`-th failure on, each log line also says
what that means and what to do. The key goes when the partition starts, when it is no longer this
instance's to take (and with the lease).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from typing import Final, NamedTuple

import orjson

from chukcha.bus.app_standbys import Wakeups
from chukcha.bus.app_view import OwnKeys, failing_key_from

__all__ = ["FAILING_ADVICE", "LISTENER_RETRY_FIRST", "LISTENER_RETRY_MAX", "Retries"]

logger = logging.getLogger(__name__)

LISTENER_RETRY_FIRST: Final = 0.5
"""Seconds before a partition whose start failed is claimed again (doubling each failure)."""
LISTENER_RETRY_MAX: Final = 30.0
"""The longest wait between two tries to start a partition."""
FAILING_ADVICE: Final = 3
"""From this many failed starts of a partition in a row on, the log says what to do."""


class _Retry(NamedTuple):
    failures: int  # in a row
    not_before: float  # monotonic: not claimed again before
    epoch: int  # of the failed claim (never resumed)
    since: float  # unix time of the first failure in a row
    error: str  # "Type: message" of the last failure


class Retries:
    """The partitions whose start failed on this instance, and their ``failing`` keys."""

    def __init__(self, app: str, instance: str, prefix: bytes, wakeups: Wakeups) -> None:
        self.app = app
        self._instance = instance
        self._prefix = prefix
        self._wakeups = wakeups
        self._failed: dict[int, _Retry] = {}

    def failed_epoch(self, partition: int) -> int | None:
        """The epoch of the claim of ``partition`` whose start failed last (never resumed)."""
        retry = self._failed.get(partition)
        return retry.epoch if retry is not None else None

    def failing(self) -> dict[int, int]:
        """The partitions whose start failed and that are retried here -> the failures in a
        row (what the app's ``/metrics`` shows)."""
        return {p: retry.failures for p, retry in self._failed.items()}

    def due(self, partition: int) -> bool:
        """Whether ``partition`` may be claimed now (its backoff, if any, is over)."""
        retry = self._failed.get(partition)
        return retry is None or time.monotonic() >= retry.not_before

    def failed(self, partition: int, epoch: int, error: Exception) -> None:
        """Starting ``partition`` at ``epoch`` failed: log it (with advice once it keeps
        failing), and wake the reconcile when it may be claimed again."""
        before = self._failed.get(partition)
        failures = before.failures + 1 if before is not None else 1
        delay = min(LISTENER_RETRY_FIRST * 2 ** (failures - 1), LISTENER_RETRY_MAX)
        why = f"{type(error).__name__}: {error}"
        self._failed[partition] = _Retry(failures, time.monotonic() + delay, epoch,
                                         before.since if before is not None else time.time(),
                                         why)
        advice = "" if failures < FAILING_ADVICE else (
            f"; the partition stays unprocessed (its input waits on the bus) until the cause "
            f"is fixed (retried every {LISTENER_RETRY_MAX:g} s at most; `chukcha app status "
            f"{self.app} --etcd URL` shows it); stopping this instance hands it to another")
        logger.error("app=%s instance=%s partition %d could not start (epoch %d, failure %d in "
                     "a row): %s; releasing it, retrying in %.1f s%s", self.app,
                     self._instance, partition, epoch, failures, why, delay, advice,
                     exc_info=error if failures == 1 else None)
        self._wakeups.after("retry", partition, delay)

    async def publish(self, keys: OwnKeys, partition: int, lease: int | None) -> None:
        """Put the ``failing`` key of ``partition`` (under ``lease``; none without one: a key
        without a lease would outlive the instance)."""
        retry = self._failed.get(partition)
        if retry is not None and lease is not None:
            await keys.put(self._key(partition), orjson.dumps(
                {"failures": retry.failures, "since": retry.since, "error": retry.error}),
                lease)

    async def started(self, keys: OwnKeys, partition: int) -> None:
        """``partition`` started: forget its failures and delete its key."""
        if self._failed.pop(partition, None) is not None:
            self._wakeups.cancel("retry", partition)
            logger.info("app=%s instance=%s partition %d started after its earlier failures",
                        self.app, self._instance, partition)
            await keys.delete(self._key(partition))

    async def forget_others(self, keys: OwnKeys, target: Mapping[int, str],
                            active: Collection[int]) -> None:
        """Stop retrying the partitions the assignment no longer gives to this instance (their
        new owner tries)."""
        for p in sorted(self._failed):
            to = target.get(p)
            if to != self._instance and p not in active:
                del self._failed[p]
                self._wakeups.cancel("retry", p)
                await keys.delete(self._key(p))
                logger.info("app=%s instance=%s partition %d goes to %s: no longer retried "
                            "here", self.app, self._instance, p, to)

    def _key(self, partition: int) -> bytes:
        return failing_key_from(self._prefix, partition, self._instance)
