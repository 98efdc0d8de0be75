"""Processors: ``App``, ``@app.processor(category)``, ``Context``, the runner and the tester."""

from chukcha.processors.base import App, Handler, Sink
from chukcha.processors.config import ErrorPolicy, ProcessorConfig
from chukcha.processors.engine import Context, EventPosition, Table

__all__ = [
    "App",
    "Context",
    "ErrorPolicy",
    "EventPosition",
    "Handler",
    "ProcessorConfig",
    "Sink",
    "Table",
]
