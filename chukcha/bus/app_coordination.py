"""The instances of an app in etcd: registration, partition claims with epochs, hand-over.

Part of the one etcd layer (with :mod:`chukcha.bus.coordination`, whose session base it shares):
nothing else talks to etcd. Layout under ``chukcha/<cluster>/apps/<app>/``:

- ``partitions`` = the app's partition count, written by the first instance (no lease); an
  instance started with another count is refused (:class:`~chukcha.errors.AppConfigError`).
- ``members/<instance>`` = ``{"incarnation": ..., "pid": ...}`` under the instance's lease,
  kept alive every TTL/3.
- ``claims/<partition:04d>`` = the owner's instance name, under the owner's lease. The claim's
  etcd ``mod_revision`` is its **epoch**: a new claim (or an adoption) always has a larger one.
  A node checks an ack's epoch against it in a transaction (:func:`claim_key`).
- ``standbys/<partition:04d>/<instance>`` (``standbys=N``) = ``""``, or ``"ready"`` once its
  copy has caught up (:meth:`AppInstances.standby_ready`), under that instance's lease:
  it follows the partition's changelog (:meth:`PartitionListener.follow`). Each instance puts
  and deletes only its own keys, as :func:`chukcha.assignment.assign_standbys` says (not the
  owner, balanced, sticky), and, with standbys, the instance a partition is about to move to
  also follows it until ready: the owner hands it over only then (or after
  ``HANDOVER_WAIT`` s), so a rebalance too starts from a warm copy; a partition that loses its
  owner goes to one of its standbys, a ``ready`` one first
  (:func:`chukcha.assignment.assign`), which then only applies the changelog's tail. That side
  is :class:`chukcha.bus.app_standbys.Standbys`; the keys as data are
  :mod:`chukcha.bus.app_view`.

Every instance watches the prefix and computes the same target with
:func:`chukcha.assignment.assign` (live members, current claims). An instance then *releases*
the partitions the target gives to others (orderly: :meth:`PartitionListener.revoking` finishes
the batch and commits, then the claim is deleted if its epoch is unchanged) and *claims* the free
ones the target gives to it (a transaction that succeeds only if nobody holds the claim), so a
partition never has two owners and the new owner starts only after the old one let go. A killed
instance's lease expires after its TTL and its claims vanish with it; the others then claim them.

An instance restarted under the same name while its previous incarnation's lease is still
alive *adopts* that incarnation's claims in one transaction (member key and claims re-put under
the new lease: new epochs, so anything the old incarnation still does is fenced), then revokes the
old lease: a quick restart keeps its partitions. If the old incarnation was in fact alive (two
processes given one name), it sees its member key taken and stops with an error.

Ownership is only used while it can be proven: when the lease has not been renewed for its TTL
(minus a margin) the instance calls :meth:`PartitionListener.lost` for every partition and
processes nothing until etcd answers again (then it resumes those its lease still holds); a
take-over in progress then (catching up or restoring, maybe waiting for nodes) is cancelled
and cleaned up like a lost partition instead of holding that up (:func:`assigned_unless`).

An error of the listener never ends the session: a partition whose :meth:`~PartitionListener.
assigned` fails (a restore that finds no node answering...) is cleaned up
(:meth:`~PartitionListener.lost`), its claim released, and claimed again (a new epoch) after a
backoff of ``LISTENER_RETRY_FIRST`` s doubling up to ``LISTENER_RETRY_MAX`` s, each failure
logged with its reason, for as long as it fails, shown meanwhile by a
``failing/<partition:04d>/<instance>`` key (:mod:`chukcha.bus.app_retries`); a
:meth:`~PartitionListener.revoking` that fails a :meth:`~PartitionListener.revoking` that fails
is logged, cleaned up the same way and the claim released anyway (as after a crash, the next
owner starts from what the bus holds). Any other error of the session fails the instance
(:meth:`AppInstances.wait_failed`) instead of leaving it registered and idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

import orjson

from chukcha.assignment import assign
from chukcha.bus.app_listener import (
    NoListener,
    PartitionListener,
    TakeOverCancelledError,
    assigned_unless,
)
from chukcha.bus.app_retries import (
    FAILING_ADVICE,
    LISTENER_RETRY_FIRST,
    LISTENER_RETRY_MAX,
    Retries,
)
from chukcha.bus.app_standbys import HANDOVER_WAIT, Standbys, Wakeups
from chukcha.bus.app_view import AppView, Claim, app_prefix, claim_key, claim_key_from
from chukcha.bus.config import ETCD_EXTRA_MISSING, etcd_installed, parse_etcd_endpoint
from chukcha.bus.coordination import (
    DEFAULT_LEASE_TTL,
    ClientKeys,
    EtcdWatcher,
    etcd_client,
    etcd_errors,
)
from chukcha.bus.tasks import log_task_crash, run_until_first_ends
from chukcha.errors import (
    AppConfigError,
    CoordinationError,
    CoordinationTimeoutError,
    InstanceTakenOverError,
)
from chukcha.protocol import validate_instance

__all__ = [
    "FAILING_ADVICE",
    "HANDOVER_WAIT",
    "LISTENER_RETRY_FIRST",
    "LISTENER_RETRY_MAX",
    "AppInstances",
    "AppView",
    "Claim",
    "PartitionListener",
    "app_prefix",
    "claim_key",
    "etcd_cluster_id",
    "read_app",
]

logger = logging.getLogger(__name__)

_RPC_TIMEOUT: Final = 5
class AppInstances(EtcdWatcher):
    """One instance of an app in etcd: registers, claims its share of partitions, hands over.

    :meth:`start` returns at once (the session is established and retried in the background);
    :meth:`owned` is what this instance may process now, with each partition's epoch;
    :meth:`stop` hands every partition over in order and leaves. :meth:`wait_failed` returns the
    error that made the instance give up for good (another process took its name, another
    partition count), if one does.
    """

    _what = "app"

    def __init__(
        self,
        endpoints: tuple[str, ...],
        cluster: str,
        app: str,
        instance: str,
        partitions: int,
        *,
        listener: PartitionListener | None = None,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        retry_interval: float = 0.2,
        standbys: int = 0,
    ) -> None:
        if not 1 <= partitions <= 1024:
            raise ValueError("partitions must be in 1..1024")
        if standbys < 0:
            raise ValueError("standbys must be >= 0")
        if lease_ttl < 1:
            raise ValueError("lease_ttl must be at least 1 s")
        super().__init__(endpoints, app_prefix(cluster, app), validate_instance(instance),
                         retry_interval)
        self.app = app
        self.partitions = partitions
        self.standbys = standbys
        self._listener: PartitionListener = listener or NoListener()
        self._ttl = lease_ttl
        self._margin = min(1.0, lease_ttl * 0.2)
        self._incarnation = uuid.uuid4().hex
        self.view = AppView()
        self._lease_id: int | None = None
        self._registered_at = 0  # the etcd revision of our member key's last write by us
        self._valid_until = 0.0  # monotonic time until which our lease is proven alive
        self._active: dict[int, int] = {}  # partition -> epoch handed to the listener
        self._changed = asyncio.Event()
        self._wakeups = Wakeups(self._changed)  # reconciles due later (retries, hand-overs)
        self._retries = Retries(app, self._instance, self._prefix, self._wakeups)
        self._standby = Standbys(app, self._instance, self._prefix, standbys,
                                 follow=self._listener.follow, wakeups=self._wakeups,
                                 changed=self._changed)
        self._renewed = asyncio.Event()
        self._failed: asyncio.Future[BaseException] | None = None
        self._stack: contextlib.AsyncExitStack | None = None  # what stop undoes
        self._busy = asyncio.Lock()  # one reconcile (or stop) at a time
        self._abandon = asyncio.Event()  # set: a take-over in progress is cancelled
        self._losing = 0  # _lose_all calls under way (waiting for _busy, or stopping)
        self._giving_up = asyncio.Event()  # set while _losing: every proof is refused

    # --- public view ---------------------------------------------------------------------

    def owned(self) -> Mapping[int, int]:
        """Partitions this instance may process now -> their epoch."""
        return dict(self._active)

    def failing(self) -> dict[int, int]:
        """Partitions whose start failed here and that are retried -> failures in a row."""
        return self._retries.failing()

    @property
    def member_key(self) -> bytes:
        return self._prefix + b"members/" + self._instance.encode()

    async def wait_failed(self) -> BaseException:
        """Wait until the instance gives up for good; returns why."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return await self._failed

    def _fail(self, exc: BaseException) -> None:
        logger.error("app=%s instance=%s: %s", self.app, self._instance, exc)
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        if not self._failed.done():
            self._failed.set_result(exc)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the session (in the background) and the lease expiry watch. Idempotent."""
        if self._stack is not None:
            return
        # One exit stack: stop = start reversed, each step run even when a later one raised.
        stack = self._stack = contextlib.AsyncExitStack()
        stack.push_async_callback(self._revoke_lease)  # leave: member key and claims go
        stack.push_async_callback(self._hand_over_all)
        stack.callback(self._standby.forget, ())
        stack.callback(self._wakeups.cancel_all)
        await super().start()
        stack.push_async_callback(super().stop)
        expiry = asyncio.create_task(self._expiry_loop(), name=f"app-lease-{self._instance}")
        expiry.add_done_callback(functools.partial(log_task_crash, what="app lease"))
        stack.push_async_callback(_cancel, expiry)

    async def stop(self) -> None:
        """Hand every partition over in order (the listener finishes and commits each), then
        leave: revoking the lease deletes the member key and every claim at once. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _hand_over_all(self) -> None:
        async with self._busy:
            for p in sorted(self._active):
                await self._hand_over(p)
                logger.info("app=%s instance=%s partition %d released (stopping)",
                            self.app, self._instance, p)

    async def _revoke_lease(self) -> None:
        lease, self._lease_id = self._lease_id, None
        if lease is None:
            return
        client = self._client()
        try:
            async with asyncio.timeout(2):
                await client.revoke_lease(lease)
        except etcd_errors() as exc:
            logger.info("app=%s instance=%s could not revoke its lease (%s): its claims "
                        "expire after %d s", self.app, self._instance, exc, self._ttl)
        finally:
            with contextlib.suppress(*etcd_errors()):
                await client.close()

    # --- the session ---------------------------------------------------------------------

    def _kept(self) -> str:
        return f"partitions {sorted(self._active)} while the lease lasts"

    async def _session(self, client: Any) -> None:
        await self._check_partitions(client)
        await self._register(client)
        watch = await self._watch(client)
        logger.info("app=%s instance=%s joined (lease ttl %d s, %d partitions)", self.app,
                    self._instance, self._ttl, self.partitions)
        self._changed.set()
        tasks = [
            asyncio.create_task(self._keepalive_loop(client), name="app-keepalive"),
            asyncio.create_task(self._watch_loop(watch), name="app-watch"),
            asyncio.create_task(self._reconcile_loop(client), name="app-reconcile"),
        ]
        try:
            await run_until_first_ends(tasks)
        except etcd_errors():
            raise  # the session is established again
        except Exception as exc:
            # Not etcd's doing and not retried here: give up visibly rather than stay
            # registered doing nothing.
            if not isinstance(exc, InstanceTakenOverError):
                await self._lose_all(f"the etcd session failed: {exc!r}")
                self._fail(exc)
            raise

    async def _check_partitions(self, client: Any) -> None:
        key = self._prefix + b"partitions"
        ok, responses = await client.transaction(
            compare=[client.transactions.version(key) == 0],
            success=[client.transactions.put(key, str(self.partitions).encode())],
            failure=[client.transactions.get(key)],
        )
        if ok:
            return
        stored = int(responses[0][0][0]) if responses and responses[0] else self.partitions
        if stored != self.partitions:
            exc = AppConfigError(
                f"app {self.app!r} has {stored} partitions in etcd, this instance was started "
                f"with {self.partitions}: start it with partitions={stored} (changing the count "
                "of a running app needs a migration)"
            )
            self._fail(exc)
            raise exc

    async def _register(self, client: Any) -> None:
        value = orjson.dumps({"incarnation": self._incarnation, "pid": os.getpid()})
        tx = client.transactions
        if self._lease_id is not None:
            started = time.monotonic()
            reply = await client.refresh_lease(self._lease_id)
            if reply is not None and reply.TTL > 0:
                # Our lease survived the outage, so did our member key and claims.
                self._proven(started, reply.TTL)
                return
            logger.warning("app=%s instance=%s lease expired while etcd was away; its "
                           "partitions are gone, joining again", self.app, self._instance)
            self._lease_id = None
        started = time.monotonic()
        lease = await client.lease(self._ttl)
        member = await client.get(self.member_key)
        compare = [tx.version(self.member_key) == 0] if member is None else [
            tx.mod(self.member_key) == member.mod_revision]
        ops = [tx.put(self.member_key, value, lease=lease.id)]
        adopted: list[int] = []
        if member is not None:
            # A previous incarnation under our name: adopt its claims (new epochs fence it).
            for kv in await client.get_prefix(self._prefix + b"claims/"):
                if kv.lease == member.lease:
                    compare.append(tx.mod(kv.key) == kv.mod_revision)
                    ops.append(tx.put(kv.key, kv.value, lease=lease.id))
                    adopted.append(int(kv.key.rsplit(b"/", 1)[1]))
        ops.append(tx.get(self.member_key))
        ok, responses = await client.transaction(compare=compare, success=ops, failure=[])
        if not ok:
            with contextlib.suppress(*etcd_errors()):
                await client.revoke_lease(lease.id)
            raise CoordinationError("registration raced with another change; retrying")
        self._registered_at = responses[-1][0][1].mod_revision
        self._lease_id = lease.id
        self._proven(started, self._ttl)
        if member is not None:
            logger.info("app=%s instance=%s took over from its previous incarnation "
                        "(adopted partitions %s)", self.app, self._instance, sorted(adopted))
            with contextlib.suppress(*etcd_errors()):
                await client.revoke_lease(member.lease)

    def _proven(self, started: float, ttl: int) -> None:
        was = self._provable()
        self._valid_until = started + ttl
        if not was:
            self._renewed.set()
            self._changed.set()

    async def prove(self, give_up: asyncio.Event) -> bool:
        """True once this instance's lease is proven alive (at once when it is now), False
        when ``give_up`` is set first: what a partition's owner checks before anything leaves
        it for the bus as the owner (emits, changelog records), so that an instance paused past
        its lease (SIGSTOP, a stalled machine) does not send its batch after resuming.

        False at once, too, while every partition is being stopped (:meth:`_lose_all`): the
        caller may hold what that stop needs (the runner commits under the lock that
        :meth:`PartitionListener.lost` takes), and neither a renewal (the keep-alive joins
        again only after the stop) nor ``give_up`` (its partition's turn comes after) could
        end the wait then."""
        while not self._giving_up.is_set():
            if self._provable():
                return True
            if give_up.is_set():
                return False
            waits = [asyncio.ensure_future(self._renewed.wait()),
                     asyncio.ensure_future(give_up.wait()),
                     asyncio.ensure_future(self._giving_up.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return False

    def _provable(self) -> bool:
        return self._lease_id is not None and time.monotonic() < self._valid_until - self._margin

    async def _resync(self, client: Any) -> None:
        view = AppView()
        resp = await client.get_prefix(self._prefix)
        for kv in resp:
            view.apply(self._prefix, kv.key, kv.value, kv.mod_revision, kv.lease)
        self.view = view
        self.revision = resp.header.revision
        self.synced = True

    async def _watch_loop(self, watch: Any) -> None:
        async for event in watch:
            kv = event.kv
            self.revision = max(self.revision, kv.mod_revision)
            value = kv.value if event.kind == "PUT" else None
            self.view.apply(self._prefix, kv.key, value, kv.mod_revision, kv.lease)
            # Another process under our name: a newer write of our member key by another
            # incarnation (our own re-registration after a lost lease keeps our incarnation;
            # comparing leases would race with the write's answer).
            if (kv.key == self.member_key and value is not None
                    and kv.mod_revision > self._registered_at
                    and self.view.members.get(self._instance, {}).get("incarnation")
                    != self._incarnation):
                exc = InstanceTakenOverError(
                    f"another process registered as instance {self._instance!r} of app "
                    f"{self.app!r}: this one stops (give each instance its own name)")
                await self._lose_all("instance taken over")
                self._fail(exc)
                raise exc
            self._changed.set()
        raise CoordinationError("etcd watch ended")

    async def _keepalive_loop(self, client: Any) -> None:
        while True:
            await asyncio.sleep(max(self._ttl / 3, 0.3))  # the keep-alive period
            lease = self._lease_id
            started = time.monotonic()
            reply = await client.refresh_lease(lease) if lease is not None else None
            if reply is None or reply.TTL <= 0:
                logger.warning("app=%s instance=%s lease expired; joining again", self.app,
                               self._instance)
                await self._lose_all("lease expired")
                self._lease_id = None
                await self._register(client)
                self._changed.set()
            else:
                self._proven(started, reply.TTL)

    async def _expiry_loop(self) -> None:
        """Stop every partition when the lease can no longer be proven alive."""
        while True:
            if self._active and not self._provable():
                await self._lose_all(f"lease not renewed for {self._ttl - self._margin:.1f} s")
            self._renewed.clear()
            if self._provable():
                delay = self._valid_until - self._margin - time.monotonic()
                # Woken early by nothing: a renewal only moves the deadline later.
                await asyncio.sleep(max(delay, 0.01))
            else:
                await self._renewed.wait()

    async def _lose_all(self, why: str) -> None:
        self._abandon.set()  # a take-over in progress holds the lock: cancel it
        # A commit waiting for a proof (maybe holding what a stop needs) gives up now.
        self._losing += 1
        self._giving_up.set()
        try:
            async with self._busy:
                self._abandon.clear()
                if self._active:
                    logger.warning("app=%s instance=%s stops partitions %s: %s", self.app,
                                   self._instance, sorted(self._active), why)
                for p in sorted(self._active):
                    del self._active[p]
                    await self._lost(p)
        finally:
            self._losing -= 1
            if not self._losing:
                self._giving_up.clear()

    # --- reconciling the claims with the target ------------------------------------------

    async def _reconcile_loop(self, client: Any) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            async with self._busy:
                with contextlib.suppress(TakeOverCancelledError):
                    await self._reconcile(client)

    async def _reconcile(self, client: Any) -> None:
        view, lease = self.view, self._lease_id
        mine = {p: c.epoch for p, c in view.claims.items() if lease and c.lease == lease}
        for p, epoch in sorted(self._active.items()):
            if mine.get(p) != epoch:
                del self._active[p]
                logger.warning("app=%s instance=%s partition %d lost (epoch %d): its claim is "
                               "gone or changed", self.app, self._instance, p, epoch)
                await self._lost(p)
        self._standby.forget(self._active)
        if not self._provable():
            return
        for p, epoch in sorted(mine.items()):
            if p not in self._active:
                if self._retries.failed_epoch(p) == epoch:
                    await self._drop_claim(client, p, epoch)  # its start failed: never resumed
                else:
                    await self._take(client, p, epoch, "resumed")
        target = assign(self.partitions, view.members, view.owners(), view.standbys,
                        view.ready)
        await self._retries.forget_others(ClientKeys(client), target, self._active)
        for p in sorted(self._active):
            to = target.get(p)
            if to != self._instance and not self._standby.wait_for_copy(view, p, to):
                await self._release(client, p, to)
        for p in range(self.partitions):
            if (target.get(p) == self._instance and p not in view.claims
                    and self._retries.due(p)):
                await self._claim(client, p)
        await self._standby.reconcile(ClientKeys(client), view, target,
                                      partitions=self.partitions,
                                      active=self._active, lease=self._lease_id)

    def standby_ready(self, partition: int) -> None:
        """This instance's copy of ``partition`` has caught up (the listener says so): its
        standby key says ``ready`` from the next reconcile on."""
        self._standby.ready(partition)

    async def _take(self, client: Any, partition: int, epoch: int, how: str) -> None:
        self._active[partition] = epoch
        logger.info("app=%s instance=%s partition %d %s (epoch %d)", self.app, self._instance,
                    partition, how, epoch)
        error: Exception | None = None
        try:
            taken = await assigned_unless(self._listener, partition, epoch, self._abandon)
        except Exception as exc:  # noqa: BLE001 - the listener's error: retried, logged below
            error = exc
        else:
            if not taken:
                if self._active.get(partition) == epoch:
                    del self._active[partition]
                logger.warning("app=%s instance=%s partition %d take-over cancelled (epoch "
                               "%d): ownership can no longer be proven", self.app,
                               self._instance, partition, epoch)
                await self._lost(partition)
                self._standby.tell_again(partition)
                raise TakeOverCancelledError
        if error is None:
            await self._retries.started(ClientKeys(client), partition)
            return
        self._retries.failed(partition, epoch, error)
        if self._active.get(partition) == epoch:
            del self._active[partition]
        await self._lost(partition)
        self._standby.tell_again(partition)
        await self._drop_claim(client, partition, epoch)
        await self._retries.publish(ClientKeys(client), partition, self._lease_id)

    async def _lost(self, partition: int) -> None:
        """:meth:`PartitionListener.lost`, whose errors are logged (it only cleans up)."""
        try:
            await self._listener.lost(partition)
        except Exception:
            logger.exception("app=%s instance=%s partition %d: stopping it failed", self.app,
                             self._instance, partition)

    async def _hand_over(self, partition: int) -> None:
        """:meth:`PartitionListener.revoking` and forget the partition; when it fails the
        partition is stopped as if lost (its claim is released all the same: like after a
        crash, the next owner starts from what the bus holds)."""
        try:
            await self._listener.revoking(partition)
        except Exception:
            logger.exception("app=%s instance=%s partition %d: handing it over failed; "
                             "releasing it anyway, the next owner starts from what the bus "
                             "holds", self.app, self._instance, partition)
            self._active.pop(partition, None)
            await self._lost(partition)
        self._active.pop(partition, None)

    async def _drop_claim(self, client: Any, partition: int, epoch: int) -> None:
        """Delete our claim of ``partition`` if it still has ``epoch``."""
        key = claim_key_from(self._prefix, partition)
        tx = client.transactions
        await client.transaction(compare=[tx.mod(key) == epoch], success=[tx.delete(key)],
                                 failure=[])
        claim = self.view.claims.get(partition)
        if claim is not None and claim.epoch == epoch:
            del self.view.claims[partition]

    async def _claim(self, client: Any, partition: int) -> None:
        key = claim_key_from(self._prefix, partition)
        tx = client.transactions
        ok, responses = await client.transaction(
            compare=[tx.version(key) == 0],
            success=[tx.put(key, self._instance.encode(), lease=self._lease_id),
                     tx.get(key)],
            failure=[],
        )
        if not ok:
            return  # someone else got it first; the watch tells us who
        meta = responses[1][0][1]
        self.view.claims[partition] = Claim(partition, self._instance, meta.mod_revision,
                                            meta.lease)
        await self._take(client, partition, meta.mod_revision, "claimed")

    async def _release(self, client: Any, partition: int, to: str | None) -> None:
        epoch = self._active[partition]
        started = time.monotonic()
        await self._hand_over(partition)
        await self._drop_claim(client, partition, epoch)
        logger.info("app=%s instance=%s partition %d released to %s (epoch %d, hand-over "
                    "took %.3f s)", self.app, self._instance, partition, to, epoch,
                    time.monotonic() - started)


async def read_app(endpoints: tuple[str, ...], cluster: str, app: str) -> AppView:
    """What etcd holds about ``app`` now (members, claims with epochs, partition count)."""
    if not etcd_installed():
        raise CoordinationError(ETCD_EXTRA_MISSING)
    host, port = parse_etcd_endpoint(endpoints[0])
    prefix = app_prefix(cluster, app)
    view = AppView()
    async with etcd_client(host, port) as client:
        for kv in await client.get_prefix(prefix):
            view.apply(prefix, kv.key, kv.value, kv.mod_revision, kv.lease)
    return view


async def etcd_cluster_id(endpoints: tuple[str, ...]) -> str:
    """The ID of the etcd cluster at ``endpoints`` (16 hex digits; the first that answers):
    what tells two etcd clusters apart when their instances use the same ``--cluster`` name.
    Raises :class:`CoordinationTimeoutError` when none answers (:class:`CoordinationError`
    without the etcd extra)."""
    if not etcd_installed():
        raise CoordinationError(ETCD_EXTRA_MISSING)
    errors: list[str] = []
    for endpoint in endpoints:
        host, port = parse_etcd_endpoint(endpoint)
        try:
            async with asyncio.timeout(_RPC_TIMEOUT), \
                    etcd_client(host, port) as client:
                # Any answer's header names the cluster; this range is empty.
                resp = await client.get_prefix(b"chukcha/.cluster-id/")
        except etcd_errors() as exc:
            errors.append(f"{endpoint}: {exc!r}")
            continue
        return f"{resp.header.cluster_id:016x}"
    raise CoordinationTimeoutError(f"no etcd endpoint answered: {'; '.join(errors)}")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])
