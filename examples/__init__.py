"""Runnable examples: the orders processor and idempotent sinks."""
