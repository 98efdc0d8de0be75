"""Keys and partitions: the stable hash and the names of partitions. Pure functions, no I/O.

The partition of a key, in any language::

    partition = int.from_bytes(blake2b(utf8(key), digest_size=8), "big") % partitions

``blake2b`` with an 8-byte digest (RFC 7693, unkeyed, no salt or personalisation), read as an
unsigned big-endian 64-bit integer, modulo the partition count. An integer key is hashed as its
decimal string (``42`` and ``"42"`` are the same key). Go: ``blake2b.New(8, nil)`` from
``golang.org/x/crypto/blake2b`` then ``binary.BigEndian.Uint64(sum) % n``. Never Python's salted
``hash()``: the partition must be the same in every process, language and version.

Partition ``i`` of category ``orders`` is the ordinary category ``orders.p0003`` on the wire
(:func:`partition_category`: a dot, ``p``, the index on 4 digits); an app's partition ``i``
keeps its store in ``<state_dir>/p0003``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from chukcha.protocol import validate_category

__all__ = [
    "HASH_NAME",
    "MAX_PARTITIONS",
    "check_partitions",
    "key_string",
    "parse_partition_category",
    "partition_category",
    "partition_dir_name",
    "partition_of",
]

MAX_PARTITIONS: Final = 1024
"""Partition counts are 1..1024."""
HASH_NAME: Final = "blake2b-64"
"""The name of the hash above, recorded next to a partition count."""

_PARTITION_SUFFIX: Final = re.compile(r"^(.+)\.p([0-9]{4})$")


def check_partitions(partitions: object) -> int:
    """Return ``partitions`` if it is an int in 1..1024, else raise :class:`ValueError`."""
    if type(partitions) is not int or not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(
            f"partitions must be an integer from 1 to {MAX_PARTITIONS}, not {partitions!r}"
        )
    return partitions


def key_string(key: object) -> str:
    """A key as the hash sees it: a string as it is, an int as its decimal digits.

    Raises:
        TypeError: anything else (``bool`` included: ``True`` is not the key ``1``).
    """
    if type(key) is str:
        return key
    if type(key) is int:
        return str(key)
    raise TypeError(f"a key must be a string or an integer, not {type(key).__name__}")


def partition_of(key: str | int, partitions: int) -> int:
    """The partition (``0 <= p < partitions``) of ``key`` (see the module docstring)."""
    if partitions == 1:
        return 0
    digest = hashlib.blake2b(key_string(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def partition_category(category: str, index: int) -> str:
    """The wire name of partition ``index`` of ``category``: ``<category>.p<4 digits>``."""
    if not 0 <= index < MAX_PARTITIONS:
        raise ValueError(f"partition index {index} is outside 0..{MAX_PARTITIONS - 1}")
    return validate_category(f"{category}.p{index:04d}")


def parse_partition_category(name: str) -> tuple[str, int] | None:
    """``("orders", 3)`` for ``"orders.p0003"``; ``None`` for a name that is not one."""
    m = _PARTITION_SUFFIX.match(name)
    if m is None:
        return None
    return m.group(1), int(m.group(2))


def partition_dir_name(index: int) -> str:
    """The directory of partition ``index`` in an app's state directory: ``p0003``."""
    return f"p{index:04d}"
