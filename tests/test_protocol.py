"""Pure wire-format functions: message framing, chunk names, Go durations (hypothesis)."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chukcha.errors import BadRequestError, MessageTooLargeError, WriteRejectedError
from chukcha.protocol import (
    ChunkName,
    check_messages,
    chunk_file_name,
    count_newlines,
    cut_to_last_newline,
    format_go_duration,
    parse_chunk_name,
    parse_go_duration,
    split_messages,
    validate_category,
)


def naive_check(body: bytes, max_message: int) -> type[Exception] | None:
    """The obvious per-line reference for check_messages."""
    if not body:
        return WriteRejectedError
    if not body.endswith(b"\n"):
        return WriteRejectedError
    if any(len(line) > max_message for line in body[:-1].split(b"\n")):
        return MessageTooLargeError
    return None


def outcome(body: bytes, max_message: int) -> type[Exception] | None:
    try:
        check_messages(body, max_message)
    except WriteRejectedError as exc:
        return type(exc)
    return None


@given(st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")),
       st.integers(min_value=1, max_value=40))
def test_check_messages_agrees_with_a_per_line_reference(body: bytes, max_message: int) -> None:
    assert outcome(body, max_message) == naive_check(body, max_message)


@given(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=40),
       st.integers(min_value=1, max_value=50))
def test_check_messages_on_structured_bodies(lengths: list[int], max_message: int) -> None:
    body = b"".join(b"m" * n + b"\n" for n in lengths)
    expected = MessageTooLargeError if max(lengths) > max_message else None
    assert outcome(body, max_message) == expected
    assert outcome(memoryview(body), max_message) == expected  # type: ignore[arg-type]
    assert outcome(body[:-1] + b"x", max_message) is WriteRejectedError


@given(st.lists(st.binary(max_size=300), max_size=200), st.integers(min_value=0, max_value=40))
def test_count_newlines_agrees_with_bytes_count(pieces: list[bytes], skip: int) -> None:
    # Bodies on both sides of the vectorised threshold (16 KiB), as bytes, bytearray and views.
    data = b"\n".join(pieces) * (1 + len(pieces) % 3) * (60 if skip % 2 else 1)
    expected = data.count(b"\n")
    assert count_newlines(data) == expected
    assert count_newlines(bytearray(data)) == expected
    assert count_newlines(memoryview(data)[skip:]) == data[skip:].count(b"\n")


def test_check_messages_limits_exactly() -> None:
    check_messages(b"x" * 10 + b"\n", 10)
    with pytest.raises(MessageTooLargeError):
        check_messages(b"x" * 11 + b"\n", 10)
    with pytest.raises(MessageTooLargeError):
        check_messages(b"a\n" + b"x" * 11 + b"\nb\n", 10)
    with pytest.raises(WriteRejectedError, match="newline"):
        check_messages(b"a\nb", 10)
    with pytest.raises(WriteRejectedError, match="empty"):
        check_messages(b"", 10)


@given(st.binary(max_size=200))
def test_cut_to_last_newline(data: bytes) -> None:
    n = cut_to_last_newline(data)
    assert data[:n] == (data[: data.rfind(b"\n") + 1] if b"\n" in data else b"")
    assert b"\n" not in data[n:]
    assert n == 0 or data[n - 1] == 0x0A


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=20))
def test_split_messages_round_trips(messages: list[bytes]) -> None:
    framed = b"".join(m + b"\n" for m in messages)
    assert split_messages(framed) == messages


_instances = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,30}", fullmatch=True).filter(
    lambda s: not s.endswith(".")
)


@given(_instances, st.integers(min_value=0, max_value=10**9 - 1))
def test_chunk_names_round_trip_and_sort_like_indexes(instance: str, index: int) -> None:
    name = chunk_file_name(instance, index)
    assert parse_chunk_name(name) == ChunkName(instance, index)
    assert str(ChunkName(instance, index)) == name
    if index > 0:
        assert chunk_file_name(instance, index - 1) < name  # zero padding: string order


@pytest.mark.parametrize("name", [
    "", "chunk000000000", "-chunk000000000", "a-chunk", "a-chunkx", "a-chunk-1", "a-chunk 1",
    "../a-chunk000000000", "a/b-chunk000000000", "a\\b-chunk000000000", "a\x00-chunk000000000",
    "a-chunk000000000.acknowledged", "/abs/a-chunk000000000", "..-chunk000000000",
])
def test_bad_chunk_names(name: str) -> None:
    with pytest.raises(BadRequestError, match="invalid chunk name"):
        parse_chunk_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "/abs", "a\x00", "..a", "a..b",
                                  ".hidden", "trailing.", " pad", "a\nb"])
def test_bad_categories(name: str) -> None:
    with pytest.raises(BadRequestError):
        validate_category(name)


@pytest.mark.parametrize("name", ["orders", "orders.dead", "a-b_c", "UPPER", "x" * 200])
def test_good_categories(name: str) -> None:
    assert validate_category(name) == name


# --- Go durations -------------------------------------------------------------------------

GO_EXAMPLES = [  # Go's time.Duration.String() output for these values
    (0.0, "0s"), (1e-9, "1ns"), (1.5e-6, "1.5\u00b5s"), (0.05, "50ms"), (1.5, "1.5s"),
    (600.0, "10m0s"), (5400.0, "1h30m0s"), (9900.5, "2h45m0.5s"), (-2.5, "-2.5s"),
    (86400.0, "24h0m0s"),
]


@pytest.mark.parametrize(("seconds", "text"), GO_EXAMPLES)
def test_go_duration_examples(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "s", ".s", "1x", "1h 2m", " 1s", "--1s", "1.2.3s",
                                  "1e3s", "10 s", "h1", "9223372036854775808ns"])
def test_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_go_duration(text)


_UNITS_NS = {"ns": 1, "us": 1_000, "\u00b5s": 1_000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
             "h": 3600 * 10**9}


@given(st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 999),
                          st.sampled_from(sorted(_UNITS_NS))), min_size=1, max_size=4),
       st.booleans())
def test_go_duration_parse_matches_exact_arithmetic(
    terms: list[tuple[int, int, str]], negative: bool
) -> None:
    text = ("-" if negative else "") + "".join(f"{w}.{f:03d}{u}" for w, f, u in terms)
    exact_ns: Fraction = sum(
        (Fraction(w * 1000 + f, 1000) * _UNITS_NS[u] for w, f, u in terms), Fraction(0)
    )
    # Go truncates fractions of a nanosecond in each term.
    expected_ns = sum(int(Fraction(w * 1000 + f, 1000) * _UNITS_NS[u]) for w, f, u in terms)
    assert abs(exact_ns - expected_ns) < len(terms)
    assert parse_go_duration(text) == (-expected_ns if negative else expected_ns) / 1e9


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_go_duration_round_trips(ns: int) -> None:
    seconds = ns / 1e9
    text = format_go_duration(seconds)
    back = parse_go_duration(text)
    assert abs(back - seconds) <= 1e-9
    assert format_go_duration(back) == text  # the text is canonical


def test_count_newlines_leaves_the_environment_alone() -> None:
    """A library function must not change the process's environment: a user's processor that
    counts a big body must keep its own BLAS threading (the node sets it for itself)."""
    script = (
        "import os\n"
        "before = dict(os.environ)\n"
        "from chukcha.protocol import count_newlines\n"
        "assert count_newlines(b'x\\n' * 100_000) == 100_000\n"
        "changed = {k: os.environ.get(k) for k in set(os.environ) ^ set(before)}\n"
        "print(sorted(changed))\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
