"""Chukcha for Python: a persistent, distributed event bus and exactly-once processors."""

from chukcha.bus.config import NodeConfig
from chukcha.bus.node import Node
from chukcha.errors import ChukchaError

__all__ = ["ChukchaError", "Node", "NodeConfig"]
