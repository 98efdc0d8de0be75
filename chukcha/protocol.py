"""The wire format: names, limits, message framing, durations. Pure functions, no I/O.

See ``PROTOCOL.md``: chunk files are ``<instance>-chunk<9-digit index>``, a write body is one or
more ``\\n``-terminated messages, and reads are cut back to the last ``\\n``.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from chukcha.errors import BadRequestError, MessageTooLargeError, WriteRejectedError

__all__ = [
    "ACK_SUFFIX",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_ROTATE_INTERVAL",
    "MAX_INT_PARAM",
    "MAX_MESSAGE_SIZE",
    "MAX_READ_SIZE",
    "ChunkInfo",
    "ChunkName",
    "check_messages",
    "chunk_file_name",
    "count_newlines",
    "cut_to_last_newline",
    "format_go_duration",
    "parse_chunk_name",
    "parse_go_duration",
    "parse_uint",
    "prepare_count_newlines",
    "split_messages",
    "validate_category",
    "validate_instance",
]

MAX_MESSAGE_SIZE: Final = 1 << 20
"""One message is at most 1 MiB, not counting its terminating ``\\n``."""
DEFAULT_MAX_BATCH_SIZE: Final = 4 << 20
"""Default limit of one write body."""
MAX_READ_SIZE: Final = 16 << 20
"""Largest ``max_size`` a ``/read`` may ask for."""
DEFAULT_MAX_CHUNK_SIZE: Final = 20 << 20
DEFAULT_ROTATE_INTERVAL: Final = 600.0
ACK_SUFFIX: Final = ".acknowledged"
MAX_INT_PARAM: Final = (1 << 63) - 1
"""Largest value of an integer request parameter (offsets, sizes, byte limits, counts): Go's
``int64``, and what the consumer-group registry (JSON) and etcd can hold. A larger one is a 400
before anything changes."""

_CHUNK_RE: Final = re.compile(r"chunk([0-9]{1,18})")
_FORBIDDEN: Final = re.compile(r"[/\\\x00-\x1f\x7f]")


def _validate_name(kind: str, name: str) -> str:
    # Names become directory and file names, so the rules are about paths: nothing that a path
    # join could resolve elsewhere ("..", separators, absolute paths), nothing hidden, no NUL or
    # control characters. The Go server also forbids "." anywhere; we accept a dot inside a
    # name (never first, never "..") so that dead-letter categories like "orders.dead" work.
    if not name:
        raise BadRequestError(f"{kind} must not be empty")
    if len(name.encode()) > 200:
        raise BadRequestError(f"{kind} is longer than 200 bytes")
    if _FORBIDDEN.search(name):
        raise BadRequestError(f"{kind} {name!r} contains '/', '\\' or a control character")
    if name.startswith(".") or ".." in name or name.endswith("."):
        raise BadRequestError(f"{kind} {name!r} must not start or end with '.' or contain '..'")
    if name != name.strip():
        raise BadRequestError(f"{kind} {name!r} must not start or end with white space")
    return name


def parse_uint(name: str, value: str, maximum: int = MAX_INT_PARAM) -> int:
    """The non-negative integer parameter ``name`` = ``value`` (decimal digits), at most
    ``maximum``.

    Raises:
        BadRequestError: not digits, or out of range (checked on the text first: Python refuses
            to convert more than 4,300 digits).
    """
    if not value.isascii() or not value.isdigit():
        raise BadRequestError(f"parameter {name!r} must be a non-negative integer, got "
                              f"{value[:40]!r}")
    digits = value.lstrip("0")
    if len(digits) > len(str(maximum)) or (digits and int(digits) > maximum):
        raise BadRequestError(f"parameter {name!r} must be between 0 and {maximum}, got "
                              f"{value[:40]}{'...' if len(value) > 40 else ''}")
    return int(digits or "0")


def validate_category(name: str) -> str:
    """Return ``name`` if it is a valid category, else raise :class:`BadRequestError`."""
    return _validate_name("category", name)


def validate_instance(name: str) -> str:
    """Return ``name`` if it is a valid instance (node) name."""
    return _validate_name("instance", name)


@dataclass(frozen=True, slots=True, order=True)
class ChunkName:
    """A parsed chunk file name; orders by (instance, index), which is the order of the name
    strings for the 9-digit names this node writes.

    ``text`` is the name as it was parsed (on disk, or from a peer): a Go data directory may
    hold names whose index is not 9 digits (``moscow-chunk1``), which are kept as they are.
    """

    instance: str
    index: int
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.text or chunk_file_name(self.instance, self.index)


def chunk_file_name(instance: str, index: int) -> str:
    """``<instance>-chunk<index padded to 9 digits>``; padding keeps string order = index order."""
    return f"{instance}-chunk{index:09d}"


def parse_chunk_name(name: str) -> ChunkName:
    """Parse and validate a chunk name from a request or a directory listing.

    Raises:
        BadRequestError: the name is not ``<instance>-chunk<digits>`` with a valid instance.
    """
    instance, sep, rest = name.rpartition("-")
    if not sep or _CHUNK_RE.fullmatch(rest) is None:
        raise BadRequestError(f"invalid chunk name {name!r}: expected <instance>-chunk<digits>")
    try:
        validate_instance(instance)
    except BadRequestError as exc:
        raise BadRequestError(f"invalid chunk name {name!r}: {exc}") from None
    return ChunkName(instance, int(rest[5:]), name)


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One entry of ``/listChunks``."""

    name: str
    complete: bool
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "complete": self.complete, "size": self.size}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ChunkInfo:
        return cls(name=str(obj["name"]), complete=bool(obj["complete"]), size=int(obj["size"]))


def check_messages(
    body: bytes | bytearray | memoryview, max_message: int = MAX_MESSAGE_SIZE
) -> None:
    """Validate a write body: non-empty, ends with ``\\n``, no message over ``max_message``.

    Runs in C-speed steps of about ``max_message`` bytes (``rfind`` per window), never a Python
    loop per message: any window of ``max_message + 1`` bytes must hold a ``\\n``.
    """
    data = body if isinstance(body, bytes | bytearray) else bytes(body)
    n = len(data)
    if n == 0:
        raise WriteRejectedError("empty write body")
    if data[-1] != 0x0A:
        raise WriteRejectedError("write body must end with a newline")
    window = max_message + 1
    pos = 0
    while n - pos > window:
        nl = data.rfind(b"\n", pos, pos + window)
        if nl < 0:
            raise MessageTooLargeError(max_message)
        pos = nl + 1


_VECTOR_COUNT_OVER: Final = 16 << 10
"""Bodies and answers of at least this many bytes have their newlines counted by numpy."""


def count_newlines(data: bytes | bytearray | memoryview) -> int:
    """The number of ``\\n`` in ``data`` (messages of a write or a read, for the metrics).

    CPython's ``bytes.count`` of one byte is a plain byte loop: about 1 ms per MiB here, as
    much as the Go server's whole CPU per MiB written, and in a profile of bulk writes and
    reads it was the largest single cost (a quarter of the node's CPU). numpy's compare and
    count runs at memory speed (about 0.2 ms per MiB) and reads a ``memoryview`` without a
    copy; small pieces keep ``bytes.count`` (numpy's per-call cost is larger there).
    """
    np = _numpy() if len(data) >= _VECTOR_COUNT_OVER else None
    if np is None:
        if isinstance(data, memoryview):
            return data.tobytes().count(b"\n")
        return data.count(b"\n")
    # The comparison goes into a reused array (per thread): a fresh 1 MiB temporary per call
    # cost page faults and unmapping, in perf as much as the comparison itself. 256 KiB at a
    # time: faster than 1 MiB (it stays in the cache; 0.09 vs 0.13 ms per MiB) and a quarter
    # of the memory in each thread that counts.
    scratch = getattr(_SCRATCH, "array", None)
    if scratch is None:
        scratch = _SCRATCH.array = np.empty(_SCRATCH_SIZE, dtype=np.bool_)
    octets = np.frombuffer(data, dtype=np.uint8)
    total = 0
    for start in range(0, len(octets), _SCRATCH_SIZE):
        part = octets[start:start + _SCRATCH_SIZE]
        out = scratch[:len(part)]
        np.equal(part, 0x0A, out=out)
        total += int(np.count_nonzero(out))
    return total


def prepare_count_newlines() -> None:
    """Import now what :func:`count_newlines` needs for big pieces (once; cheap after).
    ``ChunkStore`` calls it on the event loop before it hands a big write to a worker thread
    that counts it: else that thread's first count imports numpy while holding the import
    lock, and a count on the loop meanwhile waits for it (blocking the loop)."""
    _numpy()


_SCRATCH: Final = threading.local()
_SCRATCH_SIZE: Final = 256 << 10


@functools.cache
def _numpy() -> Any:
    """numpy, imported once on first use (only nodes that see big bodies pay for the import),
    or ``None`` where it is not installed (an environment older than the dependency). The node
    keeps numpy's BLAS to one thread for itself (``chukcha node``); a library function does
    not change the process's environment."""
    try:
        import numpy  # noqa: PLC0415 - see the docstring
    except ImportError:
        return None
    return numpy


def cut_to_last_newline(data: bytes | bytearray | memoryview) -> int:
    """Length of the longest prefix of ``data`` that ends with ``\\n`` (0 if none)."""
    buf = data if isinstance(data, bytes | bytearray) else bytes(data)
    return buf.rfind(b"\n") + 1


def split_messages(data: bytes) -> list[bytes]:
    """Split whole ``\\n``-terminated messages (without their newlines)."""
    if not data:
        return []
    return data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")


_DURATION_RE: Final = re.compile(r"([0-9]*)(?:\.([0-9]*))?(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_UNIT_NS: Final = {
    "ns": 1, "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000, "ms": 1_000_000,
    "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000,
}
_MAX_DURATION_NS: Final = (1 << 63) - 1


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.Duration`` string (``50ms``, ``10s``, ``1h30m``, ``0``) into seconds.

    Like Go's ``time.ParseDuration``: a sequence of decimal numbers with a unit each, an optional
    sign, ``0`` alone without a unit; computed in whole nanoseconds (the limit is Go's, about
    292 years).

    Raises:
        ValueError: not Go duration syntax, or out of range.
    """
    s = text
    negative = s[:1] == "-"
    if s[:1] in ("-", "+"):
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None or not (m.group(1) or m.group(2)):
            raise ValueError(f"invalid duration {text!r} (use Go syntax such as 50ms, 10s, 1h30m)")
        unit = _UNIT_NS[m.group(3)]
        frac = m.group(2) or ""
        total += int(m.group(1) or "0") * unit
        if frac:
            total += int(frac) * unit // 10 ** len(frac)
        if total > _MAX_DURATION_NS:
            raise ValueError(f"duration {text!r} is out of range")
        pos = m.end()
    return (-total if negative else total) / 1e9


def format_go_duration(seconds: float) -> str:
    """Format seconds in Go ``time.Duration.String()`` syntax (``10m0s``, ``1h30m0s``, ``50ms``).

    Works in whole nanoseconds like Go, so ``parse_go_duration(format_go_duration(x))`` gives
    ``x`` back to the nanosecond.
    """
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        # Below a second Go picks the largest unit that keeps an integer part.
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _decimal(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _decimal(rest, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")
