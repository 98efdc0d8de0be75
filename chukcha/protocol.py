"""The wire format: names, limits, message framing, durations. Pure functions, no I/O.

See ``PROTOCOL.md``: chunk files are ``<instance>-chunk<9-digit index>``, a write body is one or
more ``\\n``-terminated messages, and reads are cut back to the last ``\\n``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from chukcha.errors import BadRequestError, MessageTooLargeError, WriteRejectedError

__all__ = [
    "ACK_SUFFIX",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_CHUNK_SIZE",
    "DEFAULT_ROTATE_INTERVAL",
    "MAX_MESSAGE_SIZE",
    "MAX_READ_SIZE",
    "ChunkInfo",
    "ChunkName",
    "check_messages",
    "chunk_file_name",
    "cut_to_last_newline",
    "format_go_duration",
    "parse_chunk_name",
    "parse_go_duration",
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


def validate_category(name: str) -> str:
    """Return ``name`` if it is a valid category, else raise :class:`BadRequestError`."""
    return _validate_name("category", name)


def validate_instance(name: str) -> str:
    """Return ``name`` if it is a valid instance (node) name."""
    return _validate_name("instance", name)


@dataclass(frozen=True, slots=True, order=True)
class ChunkName:
    """A parsed chunk file name; orders like the name string does."""

    instance: str
    index: int

    def __str__(self) -> str:
        return chunk_file_name(self.instance, self.index)


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
        raise BadRequestError(f"invalid chunk name {name!r}")
    validate_instance(instance)
    return ChunkName(instance, int(rest[5:]))


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


def cut_to_last_newline(data: bytes | bytearray | memoryview) -> int:
    """Length of the longest prefix of ``data`` that ends with ``\\n`` (0 if none)."""
    buf = data if isinstance(data, bytes | bytearray) else bytes(data)
    return buf.rfind(b"\n") + 1


def split_messages(data: bytes) -> list[bytes]:
    """Split whole ``\\n``-terminated messages (without their newlines)."""
    if not data:
        return []
    return data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")


_DURATION_RE: Final = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


def parse_go_duration(text: str) -> float:
    """Parse a Go ``time.Duration`` string (``50ms``, ``10s``, ``1h30m``, ``0``) into seconds.

    Raises:
        ValueError: not Go duration syntax.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if m is None or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r} (use Go syntax such as 50ms, 10s, 1h30m)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_go_duration(seconds: float) -> str:
    """Format seconds the way ``--help`` shows defaults (``10m0s`` becomes ``10m``)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{int(h)}h" if h else "", f"{int(m)}m" if m else "", f"{s:g}s" if s else ""]
    return "".join(parts)
