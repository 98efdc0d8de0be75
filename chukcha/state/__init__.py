"""Processor state: a byte key-value store with atomic commits (LevelDB, or memory in tests)."""

from chukcha.state.base import StateConfig, StateStore
from chukcha.state.leveldb import LevelDBStore
from chukcha.state.memory import MemoryStore

__all__ = ["LevelDBStore", "MemoryStore", "StateConfig", "StateStore"]
