"""Processor configuration: one frozen dataclass, composed of the state and dedup settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from chukcha.dedup.base import DedupConfig
from chukcha.state.base import StateConfig

__all__ = ["ErrorPolicy", "ProcessorConfig"]

logger = logging.getLogger(__name__)


class ErrorPolicy(Enum):
    """What happens when a callback raises."""

    STOP = "stop"
    """Stop the app with :class:`~chukcha.errors.ProcessorError`; nothing of the batch is
    committed (it is processed again after a restart)."""
    DEAD_LETTER = "dead_letter"
    """Drop the event's staged changes, send it with the error to ``<category>.dead``, continue."""


@dataclass(frozen=True, slots=True)
class ProcessorConfig:
    """How an :class:`~chukcha.processors.base.App` runs.

    Attributes:
        on_error: :class:`ErrorPolicy` for callbacks that raise (default ``STOP``). Events that
            are not valid JSON are always dead-lettered.
        max_batch_bytes: most bytes read from one stream per batch (default 1 MiB).
        read_timeout: seconds one read waits for data before the loop looks around (pending
            acks, stop requests) (default 1 s).
        retry_initial: first delay (s) before retrying a failed sink flush or outbox send.
        retry_max: the longest delay between retries (the backoff doubles up to it).
        stop_timeout: seconds a graceful stop may take to finish the batch (default 30 s).
        changelog: publish each partition's commits to ``<app>.changelog.p<NNNN>`` on the bus
            before acking the input, and restore an empty state from there
            (:mod:`chukcha.processors.changelog`; default off).
        changelog_min_sync_replicas: how many other nodes must hold a changelog record before
            it counts as published (default 0: the node written to).
        snapshot_every: with the changelog, publish a snapshot of a partition's store every
            this many commits and delete the changelog before it (default 1000; 0: never).
        standbys: with instances through etcd, how many other instances keep a warm copy of
            each partition by following its changelog, so that a failover applies only the
            records after it instead of restoring (default 0; needs ``changelog``).
        state: the state store settings (fsync policy, cache).
        dedup: the event-ID index retention.
        token: sent as ``Authorization: Bearer`` to the nodes (``--auth-token-file`` on them;
            ``chukcha run --token-file`` or ``$CHUKCHA_TOKEN``); never shown in ``repr``.
        tls_ca: CA certificate(s) to trust for ``https://`` nodes (default: the system's).
    """

    on_error: ErrorPolicy = ErrorPolicy.STOP
    max_batch_bytes: int = 1 << 20
    read_timeout: float = 1.0
    retry_initial: float = 0.1
    retry_max: float = 5.0
    stop_timeout: float = 30.0
    changelog: bool = False
    changelog_min_sync_replicas: int = 0
    snapshot_every: int = 1000
    standbys: int = 0
    state: StateConfig = field(default_factory=StateConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.on_error, str):
            object.__setattr__(self, "on_error", ErrorPolicy(self.on_error))
        if self.max_batch_bytes <= 0:
            raise ValueError("max_batch_bytes must be positive")
        if self.read_timeout <= 0 or self.stop_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.changelog_min_sync_replicas < 0 or self.snapshot_every < 0:
            raise ValueError("changelog_min_sync_replicas and snapshot_every must be >= 0")
        if self.standbys < 0:
            raise ValueError("standbys must be >= 0")
        if not 0 < self.retry_initial <= self.retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
