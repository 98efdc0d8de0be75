"""Dedup configuration (retention)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["DedupConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DedupConfig:
    """Retention of the event-ID index.

    An ID is forgotten when it is older than ``max_age`` seconds, or, oldest first, when more
    than ``max_count`` IDs are kept. Retention must exceed how late a duplicate can arrive: the
    producer's retry window, plus replication lag, plus how long a processor may be down, plus
    how far apart two copies of one event can be processed (the copies on two owners' streams
    are read independently: one stream with a backlog is processed hours after the other). A
    duplicate that arrives after its ID was pruned is applied again.

    Pruning by age comes first. The IDs of the batch being committed are never pruned (the
    index may exceed ``max_count`` for one batch larger than it). When the count limit forces
    out IDs younger than ``min_age``, a WARNING is logged (at most once a minute, with counts)
    and counted (``DedupIndex.pruned_young``): ``max_count`` is too small for the event rate;
    size it as peak events/s x the lateness window.

    The whole index is mirrored in memory (about 150 bytes per ID), so a lookup never reads the
    disk; ``max_count`` bounds that memory.

    Attributes:
        max_count: most IDs kept (default 1,000,000).
        max_age: seconds an ID is kept (default 7 days).
        min_age: IDs younger than this (seconds, default 1 h; capped at ``max_age``) pruned by
            the count limit are warned about.
    """

    max_count: int = 1_000_000
    max_age: float = 7 * 24 * 3600.0
    min_age: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_count <= 0:
            raise ValueError("dedup max_count must be positive")
        if self.max_age <= 0:
            raise ValueError("dedup max_age must be positive")
        if self.min_age < 0:
            raise ValueError("dedup min_age must not be negative")
