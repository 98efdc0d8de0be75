"""Chukcha for Python: a persistent, distributed event bus and exactly-once processors.

The names below are imported on first use, so that ``import chukcha`` (and every ``chukcha``
command) does not pay for the node, etcd and LevelDB modules it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chukcha.bus.config import NodeConfig
    from chukcha.bus.node import Node
    from chukcha.client import Client
    from chukcha.errors import ChukchaError
    from chukcha.processors import App, Context

__all__ = ["App", "ChukchaError", "Client", "Context", "Node", "NodeConfig"]

_WHERE = {
    "App": "chukcha.processors",
    "ChukchaError": "chukcha.errors",
    "Client": "chukcha.client",
    "Context": "chukcha.processors",
    "Node": "chukcha.bus.node",
    "NodeConfig": "chukcha.bus.config",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'chukcha' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
