"""Chukcha for Python: a persistent, distributed event bus and exactly-once processors."""

from chukcha.bus.config import NodeConfig
from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.errors import ChukchaError
from chukcha.processors import App, Context

__all__ = ["App", "ChukchaError", "Client", "Context", "Node", "NodeConfig"]
