"""What an app instance tells about its partitions (:class:`PartitionListener`), and a
take-over that the instance can abandon (:func:`assigned_unless`). No etcd access here (that
is :mod:`chukcha.bus.app_coordination`'s)."""

from __future__ import annotations

import asyncio
from typing import Protocol

__all__ = ["NoListener", "PartitionListener", "TakeOverCancelledError", "assigned_unless"]


class TakeOverCancelledError(Exception):
    """A take-over was cancelled: the reconcile in progress ends (the instance is losing its
    partitions)."""


class PartitionListener(Protocol):
    """What an instance does when it gains or gives up a partition."""

    async def assigned(self, partition: int, epoch: int) -> None:
        """``partition`` is ours from ``epoch`` on: open its store, start processing."""
        ...

    async def revoking(self, partition: int) -> None:
        """``partition`` goes to another instance: finish the batch, commit, stop. The claim is
        released when this returns (the new owner starts only after)."""
        ...

    async def lost(self, partition: int) -> None:
        """``partition`` can no longer be proven ours (lease not renewed, claim gone): stop
        processing it now; its acks would be refused."""
        ...

    async def follow(self, partitions: frozenset[int]) -> None:
        """This instance is (from now on) a standby of exactly ``partitions`` (none of them
        owned here): keep their local stores following their changelogs."""
        ...


class NoListener:
    """A listener that does nothing (an instance that only holds claims)."""

    async def assigned(self, partition: int, epoch: int) -> None:
        return

    async def revoking(self, partition: int) -> None:
        return

    async def lost(self, partition: int) -> None:
        return

    async def follow(self, partitions: frozenset[int]) -> None:
        return



async def assigned_unless(listener: PartitionListener, partition: int, epoch: int,
                          abandon: asyncio.Event) -> bool:
    """``listener.assigned(partition, epoch)``, cancelled when ``abandon`` is set meanwhile
    (the instance has to give up its partitions: a take-over that waits long for nodes must
    not hold that up); False when it was. Its errors are raised. The listener starts the
    partition's loops only at its very end, so a cancelled take-over ran nothing, and it
    writes its store in steps that a cancel lets finish (the store stays consistent)."""
    assigning = asyncio.ensure_future(listener.assigned(partition, epoch))
    abandoned = asyncio.ensure_future(abandon.wait())
    try:
        await asyncio.wait([assigning, abandoned], return_when=asyncio.FIRST_COMPLETED)
    finally:
        abandoned.cancel()
        if not assigning.done():
            assigning.cancel()
            await asyncio.wait([assigning])  # its store writes end first (shielded)
    if assigning.cancelled():
        return False
    assigning.result()
    return True
