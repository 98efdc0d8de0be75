"""The consumer groups in etcd: each node's mirror of the cluster-wide groups, and its writes.

:class:`EtcdGroups` keeps ``chukcha/<cluster>/groups/<category>/<group>`` (a registration) and
``.../<group>/<chunk>`` = size (its ack; written only while the registration exists, in one
transaction; an ack key without one is ignored), and ``chukcha/<cluster>/partitions/<category>``
= the partition count. It watches the groups prefix with the resilience of the etcd session base
(:mod:`chukcha.bus.coordination`, which, with this module and
:mod:`chukcha.bus.app_coordination`, is the one etcd layer). What the groups mean is
:class:`~chukcha.bus.groups.ConsumerGroups`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from chukcha.bus.coordination import EtcdWatcher
from chukcha.errors import BadRequestError, CoordinationError, StaleEpochError
from chukcha.protocol import parse_uint

__all__ = [
    "EtcdGroups",
    "GroupsListener",
    "GroupsSnapshot",
    "groups_prefix",
    "partitions_prefix",
]

logger = logging.getLogger(__name__)

GroupsSnapshot = dict[str, dict[str, dict[str, int]]]
"""category -> group -> acked chunk -> size: the cluster-wide consumer groups."""
GroupsListener = Callable[[GroupsSnapshot], None]


def groups_prefix(cluster: str) -> bytes:
    """The etcd key prefix of the consumer groups of ``cluster``.

    ``<prefix><category>/<group>`` registers a group; ``<prefix><category>/<group>/<chunk>`` =
    size records its ack of a chunk (deleted once the chunk is tombstoned). Category, group and
    chunk names never hold ``/``.
    """
    return f"chukcha/{cluster}/groups/".encode()


def partitions_prefix(cluster: str) -> bytes:
    """The etcd key prefix of the partitioned categories of ``cluster``:
    ``<prefix><category>`` = the partition count (decimal)."""
    return f"chukcha/{cluster}/partitions/".encode()


class EtcdGroups(EtcdWatcher):
    """Consumer-group registrations and group acks kept in etcd (cluster-wide).

    Every node watches the groups prefix and keeps a mirror (:meth:`snapshot`), handed to the
    listeners after every change. Like :class:`EtcdMembership`, :meth:`start` returns at once;
    while etcd is unreachable the mirror keeps the last known set and, when etcd is back, the
    watch resumes from the last revision seen (a full re-read if that history was compacted).

    The writes (:meth:`register`, :meth:`ack`, ...) and the linearizable :meth:`read` go through
    the watching session and raise :class:`~chukcha.errors.CoordinationError` (or an etcd
    error, see :func:`~chukcha.bus.coordination.etcd_errors`) when there is none: callers keep
    them in an outbox and retry.
    """

    _what = "groups"

    def __init__(
        self,
        endpoints: tuple[str, ...],
        cluster: str,
        instance: str,
        *,
        retry_interval: float = 0.2,
    ) -> None:
        super().__init__(endpoints, groups_prefix(cluster), instance, retry_interval)
        self.cluster = cluster
        self._partitions_prefix = partitions_prefix(cluster)
        self._mirror: GroupsSnapshot = {}
        self._listeners: list[GroupsListener] = []

    def snapshot(self) -> GroupsSnapshot:
        return {c: {g: dict(a) for g, a in gs.items()} for c, gs in self._mirror.items()}

    def add_listener(self, callback: GroupsListener) -> None:
        self._listeners.append(callback)

    # --- writes and reads ----------------------------------------------------------------

    def _key(self, category: str, group: str, chunk: str | None = None) -> bytes:
        tail = f"{category}/{group}" if chunk is None else f"{category}/{group}/{chunk}"
        return self._prefix + tail.encode()

    def _session_client(self) -> Any:
        client = self._live
        if client is None:
            raise CoordinationError("etcd is unreachable")
        return client

    async def register(self, category: str, group: str) -> None:
        await self._session_client().put(self._key(category, group), b"1")

    async def unregister(self, category: str, group: str) -> None:
        """Delete the registration and every ack of ``group``, in one transaction."""
        import aetcd.utils  # noqa: PLC0415 - loaded with the session's client (coordination)

        client = self._session_client()
        key, acks = self._key(category, group), self._key(category, group) + b"/"
        await client.transaction(
            compare=[],
            success=[
                client.transactions.delete(key),
                client.transactions.delete(acks, range_end=aetcd.utils.prefix_range_end(acks)),
            ],
            failure=[],
        )

    async def ack(self, category: str, group: str, chunk: str, size: int) -> bool:
        """Record ``group``'s ack of ``chunk`` if ``group`` is registered (checked in the same
        transaction); returns whether it was. A late ack (say, from an outbox) of a group
        unregistered meanwhile is dropped: it must not bring the group back."""
        client = self._session_client()
        registered = client.transactions.version(self._key(category, group)) > 0
        succeeded, _ = await client.transaction(
            compare=[registered],
            success=[client.transactions.put(self._key(category, group, chunk),
                                             str(size).encode())],
            failure=[],
        )
        return bool(succeeded)

    async def check_epoch(self, claim: bytes, epoch: int) -> None:
        """Check, linearizably (an etcd transaction comparing its ``mod_revision``), that the
        partition claim ``claim`` still has ``epoch``.

        Raises:
            StaleEpochError: the claim is gone or has another epoch (the sender lost it).
        """
        client = self._session_client()
        tx = client.transactions
        succeeded, responses = await client.transaction(
            compare=[tx.mod(claim) == epoch], success=[], failure=[tx.get(claim)])
        if succeeded:
            return
        found = responses[0] if responses else []
        if found:
            value, meta = found[0]
            raise StaleEpochError(
                f"{claim.decode()} is at epoch {meta.mod_revision} (owner "
                f"{value.decode(errors='replace')}), not {epoch}: the sender lost this "
                "partition and must stop processing it")
        raise StaleEpochError(f"{claim.decode()} is not claimed (the ack says epoch {epoch}): "
                              "the sender lost this partition and must stop processing it")

    async def has_claims(self, claims: bytes) -> bool:
        """Whether any partition claim under the prefix ``claims`` exists now (an app that runs
        as instances through etcd)."""
        resp = await self._session_client().get_prefix(claims)
        return any(True for _ in resp)

    async def partitions(self, category: str) -> int:
        """The partition count of ``category`` recorded in etcd (0: none), read now."""
        kv = await self._session_client().get(self._partitions_prefix + category.encode())
        return int(kv.value) if kv is not None else 0

    async def set_partitions(self, category: str, count: int, expected: int) -> bool:
        """Record ``count`` for ``category`` if etcd still holds ``expected`` (0: nothing), in
        one transaction; returns whether it did (else another node changed it meanwhile)."""
        client = self._session_client()
        key, tx = self._partitions_prefix + category.encode(), client.transactions
        compare = [tx.version(key) == 0] if expected == 0 else [
            tx.value(key) == str(expected).encode()]
        succeeded, _ = await client.transaction(
            compare=compare, success=[tx.put(key, str(count).encode())], failure=[])
        return bool(succeeded)

    async def forget(self, category: str, chunk: str, groups: list[str]) -> None:
        """Delete the acks of ``chunk`` (it is tombstoned: they are not needed any more)."""
        client = self._session_client()
        for group in groups:
            await client.delete(self._key(category, group, chunk))

    async def read(self, category: str) -> dict[str, dict[str, int]]:
        """The groups of ``category`` and their acks, read from etcd now (linearizable)."""
        resp = await self._session_client().get_prefix(self._prefix + f"{category}/".encode())
        result: dict[str, dict[str, int]] = {}
        for kv in self._registrations_first(resp):
            self._apply(result, kv.key, kv.value, category)
        return result

    # --- the watching session ------------------------------------------------------------

    def _parse(self, key: bytes) -> tuple[str, str, str | None] | None:
        parts = key[len(self._prefix):].decode(errors="replace").split("/")
        if len(parts) == 2:
            return parts[0], parts[1], None
        if len(parts) == 3:
            return parts[0], parts[1], parts[2]
        logger.warning("ignoring etcd key %r: not a group or a group ack", key)
        return None

    def _registrations_first(self, kvs: Any) -> list[Any]:
        """``kvs`` with the registration keys before the ack keys (``<category>/<group>/<chunk>``),
        so that an ack is applied only to a group that is registered."""
        return sorted(kvs, key=lambda kv: kv.key[len(self._prefix):].count(b"/") > 1)

    def _apply(
        self, groups: dict[str, dict[str, int]], key: bytes, value: bytes | None, only: str
    ) -> None:
        parsed = self._parse(key)
        if parsed is None or parsed[0] != only:
            return
        _, group, chunk = parsed
        if value is None:  # deleted
            if chunk is None:
                groups.pop(group, None)
            elif group in groups:
                groups[group].pop(chunk, None)
            return
        if chunk is None:
            groups.setdefault(group, {})
            return
        acked = groups.get(group)
        if acked is None:
            # An ack without a registration (written before acks were conditional, or left
            # by an unregistration) is litter: it must not make the group look registered.
            return
        try:
            acked[chunk] = parse_uint("size", value.decode())
        except (BadRequestError, UnicodeDecodeError):
            logger.warning("ignoring etcd key %r: size %r is not a number in range", key, value)

    def _kept(self) -> str:
        return "the known consumer groups"

    async def _session(self, client: Any) -> None:
        watch = await self._watch(client)
        logger.info("instance=%s watching consumer groups %s from revision %d",
                    self._instance, self._prefix.decode(), self.revision + 1)
        async for event in watch:
            kv = event.kv
            self.revision = max(self.revision, kv.mod_revision)
            parsed = self._parse(kv.key)
            if parsed is None:
                continue
            cat = self._mirror.setdefault(parsed[0], {})
            self._apply(cat, kv.key, kv.value if event.kind == "PUT" else None, parsed[0])
            if not cat:
                del self._mirror[parsed[0]]
            self._notify()
        raise CoordinationError("etcd watch ended")

    async def _resync(self, client: Any) -> None:
        resp = await client.get_prefix(self._prefix)
        mirror: GroupsSnapshot = {}
        for kv in self._registrations_first(resp):
            parsed = self._parse(kv.key)
            if parsed is not None:
                self._apply(mirror.setdefault(parsed[0], {}), kv.key, kv.value, parsed[0])
        self._mirror = {cat: groups for cat, groups in mirror.items() if groups}
        self.revision = resp.header.revision
        self.synced = True
        self._notify()

    def _notify(self) -> None:
        snapshot = self.snapshot()
        for cb in list(self._listeners):
            try:
                cb(snapshot)
            except Exception:
                logger.exception("consumer groups listener failed")
