"""The whole Chukcha error hierarchy.

Each error carries the HTTP status it maps to (``http_status``); the server maps exceptions to
responses in exactly one middleware (:mod:`chukcha.bus.http`) and the client maps responses back
in exactly one function (:func:`error_from_status`).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyRunningError",
    "AppConfigError",
    "BadRequestError",
    "BodyTooLargeError",
    "ChukchaError",
    "ChunkNotFoundError",
    "ClientError",
    "ConsumerError",
    "CoordinationError",
    "CoordinationTimeoutError",
    "DiskWriteError",
    "DuplicateInstanceError",
    "InstanceTakenOverError",
    "InvalidAckError",
    "MessageTooLargeError",
    "NodeUnavailableError",
    "PartitionsConflictError",
    "ProcessorError",
    "ReadBufferTooSmallError",
    "RemoteNotFoundError",
    "ReplicationError",
    "ReplicationTimeoutError",
    "RequestRejectedError",
    "ServerError",
    "StaleEpochError",
    "StateLayoutError",
    "StateLockedError",
    "UnknownPeerError",
    "WriteRejectedError",
    "WriterUnavailableError",
    "error_from_status",
]


class ChukchaError(Exception):
    """Root of every error raised by Chukcha."""

    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False


# --- request validation (400) -------------------------------------------------------------


class BadRequestError(ChukchaError, ValueError):
    """A request parameter is missing or malformed."""

    http_status = 400


class BodyTooLargeError(BadRequestError):
    """A write body is over the node's batch limit (the connection is closed too)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"write body is over the batch limit of {limit} bytes")
        self.limit = limit


# --- storage (404 / 500) ------------------------------------------------------------------


class ChunkNotFoundError(ChukchaError, LookupError):
    """No such chunk on this node (clients read this as "not replicated yet")."""

    http_status = 404


class WriteRejectedError(ChukchaError, ValueError):
    """A write body was refused as a whole; nothing of it was written."""

    http_status = 500


class MessageTooLargeError(WriteRejectedError):
    """One message of a write body is over the message limit (``size`` when known)."""

    def __init__(self, limit: int, *, size: int | None = None, what: str = "a message") -> None:
        if size is None:
            super().__init__(f"{what} is over the limit of {limit} bytes")
        else:
            super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes")
        self.limit = limit
        self.size = size


class ReadBufferTooSmallError(ChukchaError, ValueError):
    """``max_size`` is smaller than the first message at the requested offset."""

    http_status = 500


class InvalidAckError(ChukchaError, ValueError):
    """An ack that cannot be applied (current write chunk, short size, incomplete chunk)."""

    http_status = 500


class DiskWriteError(ChukchaError, OSError):
    """The chunk file could not be written; the chunk was rolled back to its last good size."""

    http_status = 500
    retriable = True


class AlreadyRunningError(ChukchaError, RuntimeError):
    """Another process holds the data directory's ``running.lock``."""


class StateLockedError(ChukchaError, RuntimeError):
    """Another process holds the processor's state directory."""


class AppConfigError(ChukchaError, ValueError):
    """An app instance's settings contradict its group's (say, another partition count)."""


class DuplicateInstanceError(ChukchaError, RuntimeError):
    """Another live instance of the app (without etcd) processes the same partitions: its
    heartbeat in ``<app>.instances`` is fresh (:mod:`chukcha.processors.presence`)."""


class InstanceTakenOverError(ChukchaError, RuntimeError):
    """Another process registered under this app instance's name; this one must stop."""


class StaleEpochError(ChukchaError):
    """A fenced ack (``partition`` + ``epoch``) came from an owner that lost the partition: the
    claim in etcd has another epoch now. The sender must stop processing that partition."""

    http_status = 409


class PartitionsConflictError(ChukchaError, ValueError):
    """A partition count that cannot be recorded: the category holds data under another
    count, or a partition's name is taken by a category that holds data."""

    http_status = 409


class StateLayoutError(ChukchaError, ValueError):
    """A state directory does not fit the app: another partition count or hash, or not a
    state directory at all. Nothing was changed in it."""


# --- cluster ------------------------------------------------------------------------------


class WriterUnavailableError(ChukchaError):
    """A front worker (``--workers``) cannot reach the node's writer process (it is restarting
    or stopping). Not reachable: nothing was done. Lost after the request was sent: it may have
    been done (a write may have landed), as after any network error; a retried write may then be
    stored twice, which readers of an at-least-once bus already expect."""

    http_status = 503
    retriable = True


class ReplicationError(ChukchaError):
    """Replication from a peer failed; it is retried."""

    retriable = True


class UnknownPeerError(ChukchaError, PermissionError):
    """A replication report names an instance that is not a peer of this node."""

    http_status = 403


class ReplicationTimeoutError(ReplicationError, TimeoutError):
    """Not enough replicas reported holding a write in time (``min_sync_replicas``)."""

    http_status = 500


class CoordinationError(ChukchaError):
    """etcd (or another coordinator) failed."""

    retriable = True


class CoordinationTimeoutError(CoordinationError, TimeoutError):
    """The coordinator did not answer in time."""


# --- client / processors ------------------------------------------------------------------


class ClientError(ChukchaError):
    """A request to a node failed; ``status`` is the HTTP status (0 when there was none)."""

    retriable = True

    def __init__(self, message: str, *, status: int = 0, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class RequestRejectedError(ClientError):
    """The node answered 4xx: the request itself is wrong; another node would answer the same."""

    retriable = False


class RemoteNotFoundError(RequestRejectedError, LookupError):
    """The node answered 404 (for ``/read``: the chunk has not replicated there yet)."""


class ServerError(ClientError):
    """The node answered 5xx."""


class NodeUnavailableError(ClientError, ConnectionError):
    """Every node the client knows failed; ``errors`` holds each node's error."""

    def __init__(self, message: str, errors: dict[str, BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors: dict[str, BaseException] = dict(errors or {})


class ConsumerError(ChukchaError):
    """The consumer could not continue (for example its saved positions are unusable)."""


class ProcessorError(ChukchaError):
    """A processor callback failed under the ``stop`` error policy."""


def error_from_status(status: int, body: str, url: str = "") -> ClientError:
    """Map an HTTP error response back to an exception (the client's one mapping point).

    The returned error is a :class:`ClientError` whose ``status`` says what the node answered;
    4xx answers are not retriable on another node (the request itself is wrong), 5xx are.
    """
    text = body.strip() or f"HTTP {status}"
    cls: type[ClientError]
    if status == 404:
        cls = RemoteNotFoundError
    elif 400 <= status < 500:
        cls = RequestRejectedError
    else:
        cls = ServerError
    return cls(f"{text} (HTTP {status} from {url})" if url else text, status=status, url=url)
