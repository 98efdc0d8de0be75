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

**Standbys** (:func:`assign_standbys`): each partition also gets up to ``n`` standby instances
(never its owner) that follow its changelog; balanced (every instance follows at most
``ceil(slots / members)`` partitions when that is possible), sticky (a live standby keeps its
partitions), and :func:`assign` gives a partition that has lost its owner to one of its
standbys when one has room, preferring one whose copy is ``ready`` (caught up), then any
standby, then the normal choice, so a failover finds the state already there.

No I/O, no clock, no randomness: property-tested in ``tests/test_assignment.py``.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterable, Mapping

__all__ = ["affinity", "assign", "assign_standbys", "minimal_moves", "moved"]


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


def _shares(partitions: int, held: dict[str, list[int]],
            warm: Mapping[str, tuple[int, int]] | None = None) -> dict[str, int]:
    """Each member's share: ``q`` or ``q + 1``; the ``+1`` goes to those holding most now (ties:
    those with a ready copy of more partitions without an owner, then those that are standbys
    of more of them, then by name), which is what keeps the number of moves minimal."""
    members = list(held)
    q, extra = divmod(partitions, len(members))
    warm = warm or {}
    by_holdings = sorted(members, key=lambda m: (-len(held[m]), *(-n for n in warm.get(m, (0, 0))),
                                                 m))
    return {m: q + (1 if i < extra else 0) for i, m in enumerate(by_holdings)}


def assign(
    partitions: int, members: Iterable[str], current: Mapping[int, str] | None = None,
    standbys: Mapping[int, Collection[str]] | None = None,
    ready: Mapping[int, Collection[str]] | None = None,
) -> dict[int, str]:
    """The owner of each partition.

    Args:
        partitions: how many partitions the app has (``>= 1``).
        members: the live instances (order and duplicates do not matter).
        current: the current owner of some partitions; owners that are not ``members`` (gone)
            and partitions out of range are ignored.
        standbys: each partition's standby instances: a partition without a live owner goes
            to one of them if one has room (the rest of the result is unchanged by them).
        ready: each partition's standbys whose copy has caught up: preferred over the other
            standbys (the partitions that have one are placed first, so that a standby's room
            goes to the partition it can take over at once).

    Returns:
        ``{partition: instance}`` for every partition, or ``{}`` without members.
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    names = sorted(set(members))
    if not names:
        return {}
    held = _live_current(partitions, names, current or {})
    owned = {p for ps in held.values() for p in ps}
    standbys, ready = standbys or {}, ready or {}
    warm_count: dict[str, tuple[int, int]] = {}
    for p in range(partitions):
        if p not in owned:
            for m in set(standbys.get(p, ())) | set(ready.get(p, ())):
                r, w = warm_count.get(m, (0, 0))
                warm_count[m] = (r + (m in ready.get(p, ())), w + 1)
    shares = _shares(partitions, held, warm_count)
    result: dict[int, str] = {}
    room: dict[str, int] = {}
    for m in names:
        # An owner over its share keeps the partitions it prefers most (by affinity), so that
        # what it gives up tends to be what another instance prefers.
        keep = sorted(held[m], key=functools.partial(_rank, m))[: shares[m]]
        for p in keep:
            result[p] = m
        room[m] = shares[m] - len(keep)
    # A partition without a live owner goes to a standby whose copy is ready, else to any
    # standby, else to whoever has room; partition by partition in each of these passes.
    for candidates in (ready, standbys, None):
        for p in range(partitions):
            if p in result:
                continue
            allowed = names if candidates is None else candidates.get(p, ())
            free = [m for m in allowed if room.get(m, 0) > 0]
            if free:
                owner = max(free, key=lambda m: (affinity(m, p), m))
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


def assign_standbys(
    partitions: int, members: Iterable[str], owners: Mapping[int, str], n: int,
    current: Mapping[int, Collection[str]] | None = None,
) -> dict[int, list[str]]:
    """Up to ``n`` standby instances for each partition.

    Args:
        partitions: how many partitions the app has.
        members: the live instances.
        owners: each partition's owner (normally :func:`assign`'s result): never its standby.
        n: standbys wanted per partition (``min(n, len(members) - 1)`` are given).
        current: the current standbys (kept while live, not the owner and within the cap).

    Returns:
        ``{partition: sorted standby names}`` for the partitions that get any.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    names = sorted(set(members))
    k = min(n, len(names) - 1)
    if k <= 0:
        return {}
    cap = -(-partitions * k // len(names))  # ceil: the most any member should follow
    load = dict.fromkeys(names, 0)
    result: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for p in range(partitions):
        for m in sorted((current or {}).get(p, ()), key=functools.partial(_rank_for, p)):
            if (m in load and m != owners.get(p) and m not in result[p]
                    and len(result[p]) < k and load[m] < cap):
                result[p].append(m)
                load[m] += 1
    for p in range(partitions):
        while len(result[p]) < k:
            m = min((m for m in names if m != owners.get(p) and m not in result[p]),
                    key=lambda m: (load[m], -affinity(m, p), m))
            result[p].append(m)
            load[m] += 1
    _even_out(result, load, owners)
    return {p: sorted(v) for p, v in result.items() if v}


def _even_out(result: dict[int, list[str]], load: dict[str, int],
              owners: Mapping[int, str]) -> None:
    """Move standby places from the most loaded members to the least loaded ones while that
    is allowed (not the owner, not already a standby of that partition); each move lowers the
    spread, so this ends."""
    while True:
        low = min(load, key=lambda m: (load[m], m))
        moved_one = False
        for high in sorted(load, key=lambda m: (-load[m], m)):
            if load[high] - load[low] <= 1:
                break
            for p in sorted(result, key=functools.partial(_rank_for_member, high)):
                got = result[p]
                if high in got and low not in got and owners.get(p) != low:
                    got[got.index(high)] = low
                    load[high] -= 1
                    load[low] += 1
                    moved_one = True
                    break
            if moved_one:
                break
        if not moved_one:
            return


def _rank_for_member(instance: str, partition: int) -> tuple[int, int]:
    return affinity(instance, partition), partition


def _rank_for(partition: int, instance: str) -> tuple[int, int]:
    return _rank(instance, partition)
