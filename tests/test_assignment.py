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

from chukcha.assignment import affinity, assign, assign_standbys, minimal_moves, moved

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


@given(situations(), st.integers(0, 3), st.data())
def test_standbys_are_never_the_owner_balanced_and_sticky(
    s: tuple[int, list[str], dict[int, str]], n: int, data: st.DataObject,
) -> None:
    partitions, members, current = s
    owners = assign(partitions, members, current)
    old = data.draw(st.dictionaries(st.integers(0, partitions - 1),
                                    st.lists(names, max_size=3, unique=True)))
    standbys = assign_standbys(partitions, members, owners, n, old)
    k = min(n, len(members) - 1)
    for p in range(partitions):
        got = standbys.get(p, [])
        assert len(got) == len(set(got)) == k
        assert owners[p] not in got
        assert set(got) <= set(members)
    if k:
        load = Counter(m for got in standbys.values() for m in got)
        counts = [load.get(m, 0) for m in members]
        assert max(counts) - min(counts) <= max(1, k)  # near even, the owner rule allowing
    # Sticky: given its own result, nothing moves.
    assert assign_standbys(partitions, members, owners, n, standbys) == standbys


@given(situations(), st.data())
def test_standbys_do_not_change_the_shares_after_a_loss(
    s: tuple[int, list[str], dict[int, str]], data: st.DataObject,
) -> None:
    partitions, members, current = s
    if len(members) < 2:
        return
    owners = assign(partitions, members, current)
    standbys = assign_standbys(partitions, members, owners, 1)
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    after = assign(partitions, rest, owners, standbys)
    plain = assign(partitions, rest, owners)
    assert sorted(Counter(after.values()).values()) == sorted(Counter(plain.values()).values())
    # Only the lost owner's partitions move.
    assert {p for p in range(partitions) if after[p] != owners[p]} == {
        p for p, o in owners.items() if o == gone}


def test_a_partition_that_lost_its_owner_goes_to_its_standby() -> None:
    owners = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c", 5: "c"}
    standbys = {0: ["c"], 1: ["b"], 2: ["a"], 3: ["c"], 4: ["b"], 5: ["a"]}
    # a is gone: b and c take one each, each the one it follows.
    assert assign(6, ["b", "c"], owners, standbys) == {**owners, 0: "c", 1: "b"}
    swapped = {**standbys, 0: ["b"], 1: ["c"]}
    assert assign(6, ["b", "c"], owners, swapped) == {**owners, 0: "b", 1: "c"}
    # Room decides first: with both following partition 0 and 1 at b, b still takes one only.
    both_b = {**standbys, 0: ["b"], 1: ["b"]}
    result = assign(6, ["b", "c"], owners, both_b)
    assert Counter(result.values()) == {"b": 3, "c": 3}


def test_a_lost_partition_prefers_a_ready_standby_then_any_standby() -> None:
    owners = {0: "a", 1: "b", 2: "c"}
    both = {0: ["b", "c"]}
    # a is gone; b and c follow partition 0, only one copy is caught up: that one takes it,
    # whichever name sorts first (the share's +1 goes to it too).
    for ready in ("b", "c"):
        result = assign(3, ["b", "c"], owners, both, {0: [ready]})
        assert result[0] == ready, (ready, result)
    # No copy ready: still a standby rather than an instance without a copy.
    assert assign(4, ["b", "c", "d"], {**owners, 3: "d"}, {0: ["c"]}, {})[0] == "c"
    # No live standby: the normal assignment.
    plain = assign(3, ["b", "c"], owners)
    assert assign(3, ["b", "c"], owners, {0: ["x"]}, {0: ["x"]}) == plain


def test_ready_standbys_are_served_first() -> None:
    # a held 0 and 1 and is gone; b follows both, ready for 1 only, and has room for one: it
    # takes 1 (a caught-up copy) and c takes 0, where taking the partitions in order would have
    # given b partition 0 (its copy still catching up) and c partition 1 (b's ready copy unused).
    owners = {0: "a", 1: "a", 2: "b", 3: "c"}
    result = assign(4, ["b", "c"], owners, {0: ["b"], 1: ["b"]}, {1: ["b"]})
    assert result == {0: "c", 1: "b", 2: "b", 3: "c"}


@given(situations(), st.data())
def test_ready_standbys_do_not_change_the_shares_after_a_loss(
    s: tuple[int, list[str], dict[int, str]], data: st.DataObject,
) -> None:
    partitions, members, current = s
    if len(members) < 2:
        return
    owners = assign(partitions, members, current)
    standbys = assign_standbys(partitions, members, owners, 2)
    ready = {p: [m for m in ms if data.draw(st.booleans())] for p, ms in standbys.items()}
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    after = assign(partitions, rest, owners, standbys, ready)
    plain = assign(partitions, rest, owners)
    assert sorted(Counter(after.values()).values()) == sorted(Counter(plain.values()).values())
    assert {p for p in range(partitions) if after[p] != owners[p]} == {
        p for p, o in owners.items() if o == gone}
    assert assign(partitions, rest, after, standbys, ready) == after  # a fixed point
