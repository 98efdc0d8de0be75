"""An app instance's standby side: its own ``standbys/<partition>/<instance>`` keys, what its
listener follows, and the owner's wait for the copy of the instance a partition moves to.

Used by :class:`~chukcha.bus.app_coordination.AppInstances`, which owns the etcd session: this
module only says which of this instance's standby keys to put and delete, through
:class:`~chukcha.bus.app_view.OwnKeys`; it never sees the etcd client. Each instance puts and
deletes only its own keys, as :func:`chukcha.assignment.assign_standbys` says (not the owner,
balanced, sticky), and, with standbys, the instance a partition is about to move to also follows it
until ready: the owner hands it over only then (or after :data:`HANDOVER_WAIT` s), so a rebalance
too starts from a warm copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Final

from chukcha.assignment import assign_standbys
from chukcha.bus.app_view import AppView, OwnKeys

__all__ = ["FOLLOW_RETRY", "HANDOVER_WAIT", "Standbys", "Wakeups"]

logger = logging.getLogger(__name__)

HANDOVER_WAIT: Final = 60
"""Seconds an owner (with standbys) waits for the copy of the instance a partition moves to."""
FOLLOW_RETRY: Final = 1.0
"""Seconds before telling the listener again what to follow after it failed."""


class Wakeups:
    """Reconciles due later: one pending wake-up per reason and partition, all cancelled at
    stop (none outlives the instance)."""

    def __init__(self, changed: asyncio.Event) -> None:
        self._changed = changed
        self._handles: dict[tuple[str, int], asyncio.TimerHandle] = {}

    def after(self, why: str, partition: int, delay: float) -> None:
        """Reconcile again in ``delay`` s (replacing a pending wake-up for the same reason)."""
        self.cancel(why, partition)
        self._handles[why, partition] = asyncio.get_running_loop().call_later(
            delay, self._woken, why, partition)

    def _woken(self, why: str, partition: int) -> None:
        self._handles.pop((why, partition), None)
        self._changed.set()

    def cancel(self, why: str, partition: int) -> None:
        handle = self._handles.pop((why, partition), None)
        if handle is not None:
            handle.cancel()

    def cancel_all(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()


class Standbys:
    """This instance's standby keys (``count`` standbys per partition) and what it follows."""

    def __init__(self, app: str, instance: str, prefix: bytes, count: int, *,
                 follow: Callable[[frozenset[int]], Awaitable[None]], wakeups: Wakeups,
                 changed: asyncio.Event) -> None:
        self.app = app
        self.count = count
        self._instance = instance
        self._prefix = prefix
        self._follow = follow
        self._wakeups = wakeups
        self._changed = changed
        self._following: frozenset[int] = frozenset()  # told to the listener last
        self._ready: set[int] = set()  # partitions whose copy here has caught up
        self._handing: dict[int, tuple[str | None, float]] = {}  # waits for a ready copy
        self._follow_failed = False

    def ready(self, partition: int) -> None:
        """This instance's copy of ``partition`` has caught up: its standby key says
        ``ready`` from the next reconcile on."""
        if partition in self._following and partition not in self._ready:
            self._ready.add(partition)
            self._changed.set()

    def tell_again(self, partition: int) -> None:
        """A take-over of ``partition`` here failed or was cancelled (it stopped following
        it): its copy is not ready any more, and the listener is told again what to follow."""
        self._ready.discard(partition)
        self._follow_failed = True

    def forget(self, active: Collection[int]) -> None:
        """Stop waiting to hand over partitions no longer ``active`` here."""
        for p in set(self._handing) - set(active):
            self._handing.pop(p)
            self._wakeups.cancel("handover", p)

    def wait_for_copy(self, view: AppView, partition: int, to: str | None) -> bool:
        """Whether to keep ``partition`` a little longer: with standbys, until the instance it
        moves to says its copy is ready (at most :data:`HANDOVER_WAIT` s)."""
        if not self.count or to is None or to in view.ready.get(partition, ()):
            self._handing.pop(partition, None)
            self._wakeups.cancel("handover", partition)
            return False
        now = time.monotonic()
        waited_for, since = self._handing.get(partition, (None, now))
        if waited_for != to:
            since = now
            self._handing[partition] = (to, now)
            self._wakeups.after("handover", partition, HANDOVER_WAIT)
            logger.info("app=%s instance=%s partition %d goes to %s once its copy is ready",
                        self.app, self._instance, partition, to)
        if now - since < HANDOVER_WAIT:
            return True
        logger.warning("app=%s instance=%s partition %d: %s's copy not ready after %d s; "
                       "handing over anyway", self.app, self._instance, partition, to,
                       HANDOVER_WAIT)
        self._handing.pop(partition, None)
        self._wakeups.cancel("handover", partition)
        return False

    async def reconcile(self, keys: OwnKeys, view: AppView, target: Mapping[int, str], *,
                        partitions: int, active: Collection[int], lease: int | None) -> None:
        """Put and delete our own standby keys as :func:`assign_standbys` says (and for the
        partitions about to move here, so that they come warm), then tell the listener what to
        follow (never a partition it owns)."""
        me = self._instance
        want = assign_standbys(partitions, view.members, target, self.count,
                               view.standbys) if self.count else {}
        mine = {p for p, ms in want.items() if me in ms}
        if self.count:
            mine |= {p for p, owner in target.items() if owner == me and p not in active
                     and p in view.claims and view.claims[p].owner != me}
        self._ready &= mine - set(active)
        for p in sorted(mine):
            ready = p in self._ready
            if me not in view.standbys.get(p, ()) or ready != (me in view.ready.get(p, ())):
                await keys.put(self._key(p), b"ready" if ready else b"", lease)
                view.standbys.setdefault(p, set()).add(me)
                if ready:
                    view.ready.setdefault(p, set()).add(me)
        have = {p for p, ms in view.standbys.items() if me in ms}
        for p in sorted(have - mine):
            await keys.delete(self._key(p))
            view.standbys.get(p, set()).discard(me)
            view.ready.get(p, set()).discard(me)
        following = frozenset(mine - set(active))
        if following != self._following or self._follow_failed:
            self._following = following
            logger.info("app=%s instance=%s standby of partitions %s", self.app,
                        self._instance, sorted(following))
            try:
                await self._follow(following)
            except Exception:
                self._follow_failed = True
                self._wakeups.after("follow", -1, FOLLOW_RETRY)
                logger.exception("app=%s instance=%s following partitions %s failed (retrying)",
                                 self.app, self._instance, sorted(following))
            else:
                self._follow_failed = False

    def _key(self, partition: int) -> bytes:
        return self._prefix + f"standbys/{partition:04d}/{self._instance}".encode()
