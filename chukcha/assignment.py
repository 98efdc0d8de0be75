"""Which instance of an app owns which partition: a pure, deterministic assignment.

Every instance of an app computes :func:`assign` from the same inputs (the partition count, the
live instances, the current claims it sees in etcd) and so reaches the same answer without
talking to the others; etcd's transactions make the claims themselves exclusive, so a moment of
disagreement can delay a move but never give a partition two owners.

The assignment is:

- **complete**: every partition ``0 .. partitions-1`` has exactly one owner, a live instance;
- **balanced**: owners hold ``partitions // n`` or ``partitions // n + 1`` partitions;
- **minimal in moves**: a partition keeps its current (live) owner unless that owner holds more
  than its share; the larger shares go to the instances that hold most now, so the number of
  partitions that change owner is the least any balanced assignment allows
  (:func:`minimal_moves`);
- **sticky**: a fixed point (assigning the result again moves nothing), and with no current
  claims (all instances restarted) the result depends only on the set of instance names, through
  a rendezvous hash (:func:`affinity`): the same instances get the same partitions back.

No I/O, no clock, no randomness: property-tested in ``tests/test_assignment.py``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping

__all__ = ["affinity", "assign", "minimal_moves", "moved"]


def affinity(instance: str, partition: int) -> int:
    """The rendezvous-hash score of ``instance`` for ``partition`` (higher: preferred).

    BLAKE2b (8-byte digest, big-endian) of ``"<instance>/<partition>"``: stable across
    processes, versions and languages (never Python's salted ``hash``).
    """
    digest = hashlib.blake2b(f"{instance}/{partition}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _rank(instance: str, partition: int) -> tuple[int, int]:
    return -affinity(instance, partition), partition


def _live_current(
    partitions: int, members: list[str], current: Mapping[int, str]
) -> dict[str, list[int]]:
    held: dict[str, list[int]] = {m: [] for m in members}
    for p, owner in current.items():
        if 0 <= p < partitions and owner in held:
            held[owner].append(p)
    return held


def _shares(partitions: int, held: dict[str, list[int]]) -> dict[str, int]:
    """Each member's share: ``q`` or ``q + 1``; the ``+1`` goes to those holding most now (ties:
    by name), which is what keeps the number of moves minimal."""
    members = list(held)
    q, extra = divmod(partitions, len(members))
    by_holdings = sorted(members, key=lambda m: (-len(held[m]), m))
    return {m: q + (1 if i < extra else 0) for i, m in enumerate(by_holdings)}


def assign(
    partitions: int, members: Iterable[str], current: Mapping[int, str] | None = None
) -> dict[int, str]:
    """The owner of each partition.

    Args:
        partitions: how many partitions the app has (``>= 1``).
        members: the live instances (order and duplicates do not matter).
        current: the current owner of some partitions; owners that are not ``members`` (gone)
            and partitions out of range are ignored.

    Returns:
        ``{partition: instance}`` for every partition, or ``{}`` without members.
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    names = sorted(set(members))
    if not names:
        return {}
    held = _live_current(partitions, names, current or {})
    shares = _shares(partitions, held)
    result: dict[int, str] = {}
    room: dict[str, int] = {}
    for m in names:
        # An owner over its share keeps the partitions it prefers most (by affinity), so that
        # what it gives up tends to be what another instance prefers.
        keep = sorted(held[m], key=functools.partial(_rank, m))[: shares[m]]
        for p in keep:
            result[p] = m
        room[m] = shares[m] - len(keep)
    for p in range(partitions):
        if p in result:
            continue
        owner = max((m for m in names if room[m] > 0), key=lambda m: (affinity(m, p), m))
        result[p] = owner
        room[owner] -= 1
    return result


def moved(before: Mapping[int, str], after: Mapping[int, str]) -> set[int]:
    """Partitions that had an owner in ``before`` and have another one in ``after``."""
    return {p for p, owner in before.items() if p in after and after[p] != owner}


def minimal_moves(partitions: int, members: Iterable[str], current: Mapping[int, str]) -> int:
    """The least number of partitions with a live owner that any balanced assignment must move:
    what every member holds beyond its share, with the larger shares given to the larger
    holders."""
    names = sorted(set(members))
    if not names:
        return 0
    held = _live_current(partitions, names, current)
    shares = _shares(partitions, held)
    return sum(max(0, len(held[m]) - shares[m]) for m in names)
