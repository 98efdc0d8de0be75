"""What etcd holds about one app, as plain data: the key layout (:func:`app_prefix`,
:func:`claim_key`), its claims (:class:`Claim`) and a mirror of its keys (:class:`AppView`).
No etcd access here (that is :mod:`chukcha.bus.app_coordination`'s: it implements
:class:`OwnKeys`, through which :mod:`chukcha.bus.app_retries` and
:mod:`chukcha.bus.app_standbys` change this instance's keys without seeing the client)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from chukcha.protocol import validate_instance

__all__ = ["AppView", "Claim", "OwnKeys", "app_prefix", "claim_key", "claim_key_from",
           "failing_key_from"]

logger = logging.getLogger(__name__)


class OwnKeys(Protocol):
    """This instance's own keys of an app in etcd (its ``standbys`` and ``failing`` keys), as
    the session of :class:`~chukcha.bus.app_coordination.AppInstances` writes them."""

    async def put(self, key: bytes, value: bytes, lease: int | None) -> None:
        """Put ``key`` = ``value`` under ``lease`` (``None``: without one)."""

    async def delete(self, key: bytes) -> None:
        """Delete ``key``."""


def app_prefix(cluster: str, app: str) -> bytes:
    """The etcd key prefix of ``app`` in ``cluster``."""
    return f"chukcha/{cluster}/apps/{app}/".encode()


def claim_key(cluster: str, app: str, partition: int) -> bytes:
    """The etcd key of the claim of ``partition``; its ``mod_revision`` is the owner's epoch."""
    return app_prefix(cluster, app) + f"claims/{partition:04d}".encode()


@dataclass(frozen=True, slots=True)
class Claim:
    """One partition's owner as etcd has it."""

    partition: int
    owner: str
    epoch: int
    lease: int


@dataclass(slots=True)
class AppView:
    """What etcd holds about one app (a mirror, or one read by :func:`read_app`)."""

    partitions: int | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    member_leases: dict[str, int] = field(default_factory=dict)
    claims: dict[int, Claim] = field(default_factory=dict)
    standbys: dict[int, set[str]] = field(default_factory=dict)
    """Each partition's standby instances (``standbys/<p>/<instance>`` keys)."""
    ready: dict[int, set[str]] = field(default_factory=dict)
    """The standbys whose copy has caught up (their key's value is ``ready``)."""
    failing: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Partitions that failed to start on an instance and are being retried there
    (``failing/<p>/<instance>`` keys): partition -> instance -> ``{"failures": n, "since":
    unix time of the first failure in a row, "error": "Type: message"}``."""

    def apply(self, prefix: bytes, key: bytes, value: bytes | None, mod_revision: int,
              lease: int) -> None:
        """Apply one key (``value`` None: deleted) under ``prefix``."""
        name = key[len(prefix):].decode(errors="replace")
        kind, _, rest = name.partition("/")
        try:
            if name == "partitions":
                self.partitions = int(value) if value is not None else None
            elif kind == "members" and rest:
                if value is None:
                    self.members.pop(rest, None)
                    self.member_leases.pop(rest, None)
                else:
                    self.members[validate_instance(rest)] = orjson.loads(value)
                    self.member_leases[rest] = lease
            elif kind == "claims" and rest:
                p = int(rest)
                if value is None:
                    self.claims.pop(p, None)
                else:
                    self.claims[p] = Claim(p, value.decode(), mod_revision, lease)
            elif kind == "standbys" and rest:
                self._apply_standby(rest, value)
            elif kind == "failing" and rest:
                self._apply_failing(rest, value)
        except (ValueError, TypeError):
            logger.warning("ignoring etcd key %r: not an app member, claim, standby, failure "
                           "or count", key)

    def _apply_standby(self, rest: str, value: bytes | None) -> None:
        part, _, who = rest.partition("/")
        p = int(part)
        if value is None:
            self.standbys.get(p, set()).discard(who)
            if not self.standbys.get(p, True):
                del self.standbys[p]
            self.ready.get(p, set()).discard(who)
            return
        self.standbys.setdefault(p, set()).add(validate_instance(who))
        if value == b"ready":
            self.ready.setdefault(p, set()).add(who)
        else:
            self.ready.get(p, set()).discard(who)

    def _apply_failing(self, rest: str, value: bytes | None) -> None:
        part, _, who = rest.partition("/")
        p = int(part)
        if value is None:
            self.failing.get(p, {}).pop(who, None)
            if not self.failing.get(p, True):
                del self.failing[p]
            return
        info = orjson.loads(value)
        if not isinstance(info, dict):
            raise TypeError("not a JSON object")
        self.failing.setdefault(p, {})[validate_instance(who)] = info

    def owners(self) -> dict[int, str]:
        return {p: c.owner for p, c in self.claims.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "members": sorted(self.members),
            "claims": {str(p): {"owner": c.owner, "epoch": c.epoch}
                       for p, c in sorted(self.claims.items())},
            "standbys": {str(p): sorted(ms) for p, ms in sorted(self.standbys.items()) if ms},
            "failing": {str(p): dict(sorted(f.items()))
                        for p, f in sorted(self.failing.items()) if f},
        }


def claim_key_from(prefix: bytes, partition: int) -> bytes:
    return prefix + f"claims/{partition:04d}".encode()


def failing_key_from(prefix: bytes, partition: int, instance: str) -> bytes:
    """The key saying ``partition`` failed to start on ``instance`` (and is retried there)."""
    return prefix + f"failing/{partition:04d}/{instance}".encode()
