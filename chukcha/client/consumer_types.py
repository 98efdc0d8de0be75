"""The consumer's public value types: positions, batches, settings and counters
(:mod:`chukcha.client.consumer` reads with them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chukcha.protocol import MAX_READ_SIZE, parse_chunk_name, split_messages

__all__ = ["Batch", "ConsumerConfig", "ConsumerStats", "Position"]


@dataclass(frozen=True, slots=True)
class Position:
    """Where one owner's stream is read up to: ``offset`` bytes of ``chunk`` consumed."""

    chunk: str
    offset: int

    def __post_init__(self) -> None:
        parse_chunk_name(self.chunk)
        if self.offset < 0:
            raise ValueError("offset must not be negative")

    @property
    def owner(self) -> str:
        return self.chunk.rpartition("-")[0]

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "offset": self.offset}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Position:
        return cls(str(obj["chunk"]), int(obj["offset"]))


@dataclass(frozen=True, slots=True)
class Batch:
    """Whole messages of one stream: ``data`` is ``chunk[offset:end]``."""

    category: str
    owner: str
    chunk: str
    offset: int
    end: int
    data: bytes

    def messages(self) -> list[bytes]:
        """The messages, without their ``\\n``."""
        return split_messages(self.data)

    @property
    def position(self) -> Position:
        """The position right after this batch (what to commit once it is processed)."""
        return Position(self.chunk, self.end)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """Consumer settings.

    Attributes:
        max_batch_bytes: ``max_size`` of one ``/read`` (default 1 MiB; a larger message is
            read whole anyway).
        long_poll: ``wait`` seconds asked of the node for the open chunk (default 10 s).
        relist_interval: how often ``/listChunks`` is asked while idle, to find new owners and
            chunks (default 1 s).
        poll_interval: the pause between reads of an open chunk when the node does not hold
            requests (a Go server), and while a chunk is not replicated yet (default 0.25 s).
        retry_interval: the pause after a failed request (default 1 s).
        copy_ack_timeout: how long registering the group on, or copying a group ack to, a node
            other than the one read from may take (default 2 s).
        read_ahead: how many of an owner's next complete chunks are read (from their start,
            up to ``max_batch_bytes`` each) while the current one is processed (default 8; 0
            turns read-ahead off).
        read_ahead_bytes: at most this many bytes (listed size, up to ``max_batch_bytes`` per
            chunk) are asked for or held by the read-ahead of one owner (default 4 MiB): many
            small chunks are read 8 deep, large ones 4 deep.
    """

    max_batch_bytes: int = 1 << 20
    long_poll: float = 10.0
    relist_interval: float = 1.0
    poll_interval: float = 0.25
    retry_interval: float = 1.0
    copy_ack_timeout: float = 2.0
    read_ahead: int = 8
    read_ahead_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if not 0 <= self.read_ahead <= 64:
            raise ValueError("read_ahead must be between 0 and 64")
        if not 0 <= self.read_ahead_bytes <= 1 << 30:
            raise ValueError("read_ahead_bytes must be between 0 and 1 GiB")
        if not 0 < self.max_batch_bytes <= MAX_READ_SIZE:
            raise ValueError(f"max_batch_bytes must be between 1 and {MAX_READ_SIZE}")
        if self.long_poll < 0 or self.long_poll > 60:
            raise ValueError("long_poll must be between 0 and 60 seconds")
        if min(self.relist_interval, self.poll_interval, self.retry_interval) <= 0:
            raise ValueError("intervals must be positive")


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters of one consumer (for metrics); ``lag_bytes`` is from the last listing."""

    batches: int
    bytes_read: int
    acks: int
    failed_requests: int
    lag_bytes: int
