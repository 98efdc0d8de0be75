"""Dedup configuration (retention)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["DedupConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DedupConfig:
    """Retention of the event-ID index.

    An ID is forgotten when it is older than ``max_age`` seconds or when more than ``max_count``
    newer IDs exist. Retention must exceed how late a duplicate can arrive (the producer's retry
    window plus replication lag plus how long a processor may be down): a duplicate that arrives
    after its ID was pruned is applied again.

    The whole index is mirrored in memory (about 150 bytes per ID), so a lookup never reads the
    disk; ``max_count`` bounds that memory.

    Attributes:
        max_count: most IDs kept (default 1,000,000).
        max_age: seconds an ID is kept (default 7 days).
    """

    max_count: int = 1_000_000
    max_age: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.max_count <= 0:
            raise ValueError("dedup max_count must be positive")
        if self.max_age <= 0:
            raise ValueError("dedup max_age must be positive")
