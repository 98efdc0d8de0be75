"""Properties of the pure partition assignment (:mod:`chukcha.assignment`)."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha.assignment import affinity, assign, minimal_moves, moved

names = st.sampled_from([f"i{n}" for n in range(8)])
member_sets = st.lists(names, min_size=1, max_size=6, unique=True)


@st.composite
def situations(draw: st.DrawFn) -> tuple[int, list[str], dict[int, str]]:
    """A partition count, the live members and current claims (some by members gone)."""
    partitions = draw(st.integers(1, 40))
    members = draw(member_sets)
    owners = st.one_of(st.sampled_from(members), names)  # names may be gone instances
    current = draw(st.dictionaries(st.integers(-2, partitions + 2), owners, max_size=partitions))
    return partitions, members, current


def live(current: dict[int, str], members: list[str], partitions: int) -> dict[int, str]:
    return {p: o for p, o in current.items() if o in members and 0 <= p < partitions}


@given(situations())
def test_every_partition_has_one_live_owner_and_shares_are_balanced(
    s: tuple[int, list[str], dict[int, str]],
) -> None:
    partitions, members, current = s
    result = assign(partitions, members, current)
    assert sorted(result) == list(range(partitions))
    assert set(result.values()) <= set(members)
    counts = Counter(result.values())
    loads = [counts.get(m, 0) for m in members]
    assert max(loads) - min(loads) <= 1


@given(situations())
def test_moves_are_the_minimum_and_a_result_is_a_fixed_point(
    s: tuple[int, list[str], dict[int, str]],
) -> None:
    partitions, members, current = s
    result = assign(partitions, members, current)
    held = live(current, members, partitions)
    assert len(moved(held, result)) == minimal_moves(partitions, members, current)
    assert assign(partitions, members, result) == result
    # The order of the members (and duplicates) changes nothing.
    assert assign(partitions, [*reversed(members), *members], current) == result


@settings(max_examples=60)
@given(st.integers(1, 6), st.lists(names, min_size=1, max_size=3, unique=True), st.data())
def test_minimal_moves_is_what_the_best_balanced_assignment_moves(
    partitions: int, members: list[str], data: st.DataObject
) -> None:
    current = data.draw(st.dictionaries(st.integers(0, partitions - 1),
                                        st.sampled_from(members)))
    best = partitions
    for owners in itertools.product(members, repeat=partitions):
        loads = Counter(owners)
        if max(loads.get(m, 0) for m in members) - min(loads.get(m, 0) for m in members) > 1:
            continue
        best = min(best, len(moved(current, dict(enumerate(owners)))))
    assert minimal_moves(partitions, members, current) == best


@given(st.integers(1, 64), member_sets, names)
def test_a_joining_instance_takes_only_its_fair_share_from_the_others(
    partitions: int, members: list[str], newcomer: str
) -> None:
    before = assign(partitions, members)
    after = assign(partitions, [*members, newcomer], before)
    if newcomer in members:
        assert after == before
        return
    share = partitions // (len(members) + 1)
    taken = moved(before, after)
    assert {after[p] for p in taken} <= {newcomer}
    assert len(taken) in (share, share + 1)
    # An instance leaving: only its partitions move.
    gone = members[0]
    without = assign(partitions, [m for m in [*members, newcomer] if m != gone], after)
    assert moved(after, without) == {p for p, o in after.items() if o == gone}


def test_without_claims_the_result_depends_only_on_the_instances() -> None:
    first = assign(12, ["a", "b", "c"])
    assert assign(12, ["c", "b", "a"], {}) == first
    assert Counter(first.values()) == {"a": 4, "b": 4, "c": 4}
    # Reproducible in another process (no salted hash anywhere).
    code = "from chukcha.assignment import assign; print(sorted(assign(12, ['a','b','c']).items()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == str(sorted(first.items()))


def test_affinity_is_documented_blake2b() -> None:
    # The documented function, computed by hand: another language can reproduce it.
    assert affinity("a", 0) == int.from_bytes(hashlib.blake2b(b"a/0", digest_size=8).digest(),
                                              "big")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        assign(0, ["a"])
    assert assign(3, []) == {}
