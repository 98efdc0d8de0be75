"""The HTTP API of consumer groups and retention (extensions; see :mod:`chukcha.bus.groups`).

:class:`GroupsApi` turns ``/groups/register``, ``/groups/unregister``, ``/groups/list``,
``/groups/ack`` (a peer's forward, or another node's copy of a group ack) and ``/retention``
into calls of :class:`~chukcha.bus.groups.ConsumerGroups`; it owns only the parameters and
the answers' shape. ``from=<instance>`` marks a peer's forward (not forwarded again).
"""

from __future__ import annotations

from typing import Final

import orjson

from chukcha.bus import web
from chukcha.bus.group_registry import RetentionPolicy
from chukcha.bus.groups import ConsumerGroups
from chukcha.bus.http import Handler, float_param, int_param, str_param
from chukcha.protocol import validate_category, validate_instance

__all__ = ["GroupsApi"]

_JSON: Final = "application/json"
_MAX_AGE: Final = 100 * 365 * 86400.0


class GroupsApi:
    """The routes of one node's :class:`~chukcha.bus.groups.ConsumerGroups`."""

    def __init__(self, groups: ConsumerGroups) -> None:
        self._groups = groups

    def routes(self) -> dict[str, Handler]:
        """The routes of consumer groups and retention, for the node's router."""
        return {
            "/groups/register": self._serve_register,
            "/groups/unregister": self._serve_unregister,
            "/groups/list": self._serve_list,
            "/groups/ack": self._serve_record_ack,
            "/retention": self._serve_retention,
        }

    async def _serve_register(self, request: web.Request) -> web.StreamResponse:
        created = await self._groups.register(str_param(request, "category"),
                                              str_param(request, "group"), _origin(request))
        return web.json_response({"created": created})

    async def _serve_unregister(self, request: web.Request) -> web.StreamResponse:
        removed = await self._groups.unregister(str_param(request, "category"),
                                                str_param(request, "group"), _origin(request))
        return web.json_response({"removed": removed})

    async def _serve_record_ack(self, request: web.Request) -> web.StreamResponse:
        done = await self._groups.record_ack(
            str_param(request, "category"), str_param(request, "chunk"),
            int_param(request, "size"), str_param(request, "group"), _origin(request),
        )
        return web.json_response({"tombstoned": done})

    async def _serve_list(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(self._groups.describe(str_param(request, "category")))
        return web.Response(body=body, content_type=_JSON)

    async def _serve_retention(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        if "max_age" in request.query or "max_bytes" in request.query:
            max_age = float_param(request, "max_age", 0.0, maximum=_MAX_AGE)
            max_bytes = int_param(request, "max_bytes", 0)
            await self._groups.set_retention(
                category, RetentionPolicy(max_age or None, max_bytes or None)
            )
        body = orjson.dumps(self._groups.registry.retention(category).to_json())
        return web.Response(body=body, content_type=_JSON)


def _origin(request: web.Request) -> str | None:
    """``from=<instance>``: the request is a peer's forward (not forwarded again)."""
    origin = request.query.get("from")
    return validate_instance(origin) if origin else None
