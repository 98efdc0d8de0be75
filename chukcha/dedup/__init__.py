"""Event-ID dedup: the index that makes redelivered and duplicated events harmless."""

from chukcha.dedup.base import DedupConfig
from chukcha.dedup.index import DedupIndex, DedupPlan

__all__ = ["DedupConfig", "DedupIndex", "DedupPlan"]
