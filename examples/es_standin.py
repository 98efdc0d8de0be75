"""An in-process stand-in for the part of Elasticsearch 8 that the sink example uses.

No Elasticsearch server can be installed on the machines that run this project's tests, so
``tests/examples`` run :mod:`examples.elastic_sink` against this server instead: real HTTP on
loopback, with the request and response shapes of Elasticsearch 8 for

- ``PUT /{index}`` (create; ``resource_already_exists_exception`` when it exists),
  ``HEAD /{index}``, ``DELETE /{index}``;
- ``POST /_bulk`` and ``POST /{index}/_bulk`` with ``index``, ``create`` and ``delete`` actions,
  ``_id``, external versioning (``version`` + ``version_type`` ``external`` / ``external_gt`` /
  ``external_gte``, conflicts answered per item with 409 ``version_conflict_engine_exception``),
  and ``?refresh=true|wait_for``. The whole body is parsed before anything is applied, so a
  malformed body is a 400 that changes nothing; items then succeed or fail one by one;
- ``GET /{index}/_doc/{id}`` (real time: sees writes that are not refreshed yet);
- ``POST /{index}/_refresh``, and ``_count`` / ``_search`` (``match_all`` or ``term`` queries,
  ``size`` and ``from``), which see only what was refreshed, as in Elasticsearch.

Anything else is refused with a 400 that names the missing feature: a test that needs more must
extend the stand-in rather than get a silent imitation. Deleted documents keep their version as
a tombstone (for external versioning) for the server's lifetime, not ``index.gc_deletes``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import socket
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web

__all__ = ["ElasticsearchStandin"]

logger = logging.getLogger(__name__)

_VERSION: Final = "8.13.4"
_BAD_INDEX_CHARS: Final = re.compile(r'[\\/*?"<>| ,#:A-Z]')
_EXTERNAL: Final = frozenset({"external", "external_gt", "external_gte"})
_NDJSON_TYPES: Final = frozenset(
    {"application/json", "application/x-ndjson", "application/vnd.elasticsearch+json",
     "application/vnd.elasticsearch+x-ndjson"}
)


class _EsError(Exception):
    def __init__(self, status: int, kind: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason, self.extra = status, kind, reason, extra

    def body(self) -> dict[str, Any]:
        cause = {"type": self.kind, "reason": self.reason, **self.extra}
        return {"error": {"root_cause": [cause], **cause}, "status": self.status}


@dataclass(slots=True)
class _Doc:
    source: dict[str, Any] | None  # None: a tombstone (deleted, version kept)
    version: int
    seq_no: int


@dataclass(slots=True)
class _Index:
    name: str
    uuid: str
    docs: dict[str, _Doc] = field(default_factory=dict)
    visible: dict[str, dict[str, Any]] = field(default_factory=dict)  # as of the last refresh
    seq: itertools.count[int] = field(default_factory=itertools.count)

    def refresh(self) -> None:
        self.visible = {i: d.source for i, d in self.docs.items() if d.source is not None}


@dataclass(frozen=True, slots=True)
class _Action:
    op: str
    index: str
    doc_id: str | None
    version: int | None
    version_type: str
    source: dict[str, Any] | None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json",
        headers={"X-Elastic-Product": "Elasticsearch"},
    )


def _check_index_name(name: str) -> None:
    if (not name or name.startswith(("_", "-", "+")) or name in {".", ".."}
            or _BAD_INDEX_CHARS.search(name)):
        raise _EsError(400, "invalid_index_name_exception",
                       f"Invalid index name [{name}], must be lowercase and must not contain "
                       "the characters \\, /, *, ?, \", <, >, |, space, comma, #, :",
                       index=name)


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _EsError(400, "x_content_parse_exception", f"failed to parse {what}: {e}") from e


class ElasticsearchStandin:
    """The stand-in server: ``async with ElasticsearchStandin() as es:`` serves on ``es.url``
    (``127.0.0.1``, a port the server binds itself) until the block ends."""

    def __init__(self) -> None:
        self._indices: dict[str, _Index] = {}
        self._uuids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self.requests = 0  # HTTP requests served (tests check that a flush did or did not call)
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        if self._sock is None:
            raise RuntimeError("the stand-in is not started")
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("GET", "/", self._info)
        app.router.add_route("*", "/_bulk", self._bulk)
        app.router.add_route("*", "/_refresh", self._refresh_all)
        app.router.add_route("*", "/{index}/_bulk", self._bulk)
        app.router.add_route("*", "/{index}/_refresh", self._refresh)
        app.router.add_route("*", "/{index}/_count", self._count)
        app.router.add_route("*", "/{index}/_search", self._search)
        app.router.add_route("GET", "/{index}/_doc/{id}", self._get_doc)
        app.router.add_route("PUT", "/{index}", self._create_index)
        app.router.add_route("HEAD", "/{index}", self._head_index)
        app.router.add_route("DELETE", "/{index}", self._delete_index)
        app.router.add_route("*", "/{tail:.*}", self._no_handler)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner, self._sock = runner, sock
        logger.info("elasticsearch stand-in started url=%s", self.url)

    async def stop(self) -> None:
        if (runner := self._runner) is None:
            return
        self._runner = None
        await runner.cleanup()
        if self._sock is not None:
            self._sock.close()
        logger.info("elasticsearch stand-in stopped")

    async def __aenter__(self) -> ElasticsearchStandin:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def documents(self, index: str) -> dict[str, dict[str, Any]]:
        """Every live document of ``index`` as ``GET _doc`` would return it (real time)."""
        found = self._indices.get(index)
        if found is None:
            return {}
        return {i: d.source for i, d in found.docs.items() if d.source is not None}

    async def wait_until(self, predicate: Any, timeout: float = 30.0) -> None:
        """Wait (under ``timeout``) until ``predicate(self)`` holds; re-checked after every
        request that changed something (a push, not a poll)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: bool(predicate(self)))

    # --- plumbing --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        try:
            response: web.StreamResponse = await handler(request)
        except _EsError as e:
            return _json(e.body(), e.status)
        return response

    def _get_index(self, name: str) -> _Index:
        index = self._indices.get(name)
        if index is None:
            raise _EsError(404, "index_not_found_exception", f"no such index [{name}]",
                           index=name)
        return index

    def _ensure_index(self, name: str) -> _Index:
        _check_index_name(name)
        if (index := self._indices.get(name)) is None:
            index = self._indices[name] = _Index(name, f"uuid{next(self._uuids):08d}")
        return index

    async def _query_of(self, request: web.Request) -> tuple[str, Any]:
        raw = await request.read()
        if not raw.strip():
            return "match_all", None
        body = _parse_json(raw, "request body")
        query = body.get("query", {"match_all": {}}) if isinstance(body, dict) else None
        if not isinstance(query, dict) or len(query) != 1:
            raise _EsError(400, "parsing_exception", "[query] malformed query")
        (kind, arg), = query.items()
        if kind == "match_all":
            return kind, None
        if kind == "term" and isinstance(arg, dict) and len(arg) == 1:
            (fld, value), = arg.items()
            if isinstance(value, dict):
                value = value.get("value")
            return kind, (fld, value)
        raise _EsError(400, "parsing_exception",
                       f"query [{kind}] is not implemented by the Elasticsearch stand-in")

    @staticmethod
    def _matches(query: tuple[str, Any], source: dict[str, Any]) -> bool:
        kind, arg = query
        if kind == "match_all":
            return True
        fld, value = arg
        return bool(source.get(fld) == value)

    # --- endpoints -------------------------------------------------------------------------

    async def _info(self, request: web.Request) -> web.Response:
        return _json({"name": "chukcha-es-standin", "cluster_name": "standin",
                      "version": {"number": _VERSION, "build_flavor": "default"},
                      "tagline": "You Know, for Search"})

    async def _no_handler(self, request: web.Request) -> web.Response:
        raise _EsError(400, "illegal_argument_exception",
                       f"no handler found for uri [{request.path_qs}] and method "
                       f"[{request.method}] (or not implemented by the Elasticsearch stand-in)")

    async def _create_index(self, request: web.Request) -> web.Response:
        name = request.match_info["index"]
        _check_index_name(name)
        raw = await request.read()
        if raw.strip():
            _parse_json(raw, "index settings")
        if name in self._indices:
            raise _EsError(400, "resource_already_exists_exception",
                           f"index [{name}/{self._indices[name].uuid}] already exists",
                           index=name)
        self._ensure_index(name)
        return _json({"acknowledged": True, "shards_acknowledged": True, "index": name})

    async def _head_index(self, request: web.Request) -> web.Response:
        found = request.match_info["index"] in self._indices
        return web.Response(status=200 if found else 404)

    async def _delete_index(self, request: web.Request) -> web.Response:
        name = request.match_info["index"]
        self._get_index(name)
        del self._indices[name]
        return _json({"acknowledged": True})

    async def _refresh(self, request: web.Request) -> web.Response:
        self._get_index(request.match_info["index"]).refresh()
        return _json({"_shards": {"total": 1, "successful": 1, "failed": 0}})

    async def _refresh_all(self, request: web.Request) -> web.Response:
        for index in self._indices.values():
            index.refresh()
        n = len(self._indices)
        return _json({"_shards": {"total": n, "successful": n, "failed": 0}})

    async def _get_doc(self, request: web.Request) -> web.Response:
        index = self._get_index(request.match_info["index"])
        doc_id = request.match_info["id"]
        doc = index.docs.get(doc_id)
        if doc is None or doc.source is None:
            return _json({"_index": index.name, "_id": doc_id, "found": False}, 404)
        return _json({"_index": index.name, "_id": doc_id, "_version": doc.version,
                      "_seq_no": doc.seq_no, "_primary_term": 1, "found": True,
                      "_source": doc.source})

    async def _count(self, request: web.Request) -> web.Response:
        index = self._get_index(request.match_info["index"])
        query = await self._query_of(request)
        count = sum(1 for s in index.visible.values() if self._matches(query, s))
        return _json({"count": count,
                      "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0}})

    async def _search(self, request: web.Request) -> web.Response:
        index = self._get_index(request.match_info["index"])
        query = await self._query_of(request)
        try:
            size = int(request.query.get("size", "10"))
            start = int(request.query.get("from", "0"))
        except ValueError as e:
            raise _EsError(400, "illegal_argument_exception", f"bad size/from: {e}") from e
        if size < 0 or start < 0:
            raise _EsError(400, "illegal_argument_exception", "size and from must be >= 0")
        hits = [(i, s) for i, s in sorted(index.visible.items()) if self._matches(query, s)]
        return _json({
            "took": 0, "timed_out": False,
            "_shards": {"total": 1, "successful": 1, "skipped": 0, "failed": 0},
            "hits": {
                "total": {"value": len(hits), "relation": "eq"}, "max_score": 1.0,
                "hits": [{"_index": index.name, "_id": i, "_score": 1.0, "_source": s}
                         for i, s in hits[start:start + size]],
            },
        })

    # --- _bulk -----------------------------------------------------------------------------

    async def _bulk(self, request: web.Request) -> web.Response:
        ctype = request.headers.get("Content-Type", "")
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime not in _NDJSON_TYPES:
            return _json({"error": f"Content-Type header [{ctype}] is not supported",
                          "status": 406}, 406)
        refresh = request.query.get("refresh", "false")
        if refresh not in {"", "true", "false", "wait_for"}:
            raise _EsError(400, "illegal_argument_exception",
                           f"Unknown value for refresh: [{refresh}].")
        raw = await request.read()
        actions = self._parse_bulk(raw, request.match_info.get("index"))
        items = [self._apply(a) for a in actions]  # parsed in full first: all or nothing so far
        if refresh != "false":
            for name in {a.index for a in actions}:
                if name in self._indices:
                    self._indices[name].refresh()
        errors = any("error" in next(iter(item.values())) for item in items)
        async with self._changed:
            self._changed.notify_all()
        return _json({"took": 0, "errors": errors, "items": items})

    def _parse_bulk(self, raw: bytes, default_index: str | None) -> list[_Action]:
        if not raw.strip():
            raise _EsError(400, "action_request_validation_exception",
                           "Validation Failed: 1: no requests added;")
        if not raw.endswith(b"\n"):
            raise _EsError(400, "illegal_argument_exception",
                           "The bulk request must be terminated by a newline [\\n]")
        lines = iter(raw.split(b"\n")[:-1])
        actions: list[_Action] = []
        for line in lines:
            if not line.strip():
                continue
            meta = _parse_json(line, "bulk action")
            if not isinstance(meta, dict) or len(meta) != 1:
                raise _EsError(400, "illegal_argument_exception",
                               "Malformed action/metadata line, expected a single action")
            (op, params), = meta.items()
            if op not in {"index", "create", "delete"}:
                raise _EsError(400, "illegal_argument_exception",
                               f"Action/metadata line [{op}] is not supported "
                               "by the Elasticsearch stand-in")
            actions.append(self._parse_action(op, params, default_index, lines))
        return actions

    def _parse_action(
        self, op: str, params: Any, default_index: str | None, lines: Any
    ) -> _Action:
        if not isinstance(params, dict):
            raise _EsError(400, "illegal_argument_exception", f"Malformed [{op}] metadata")
        unsupported = set(params) - {"_index", "_id", "version", "version_type"}
        if unsupported:
            raise _EsError(400, "illegal_argument_exception",
                           f"Action/metadata [{', '.join(sorted(unsupported))}] is not "
                           "supported by the Elasticsearch stand-in")
        index = params.get("_index", default_index)
        if not isinstance(index, str):
            raise _EsError(400, "action_request_validation_exception",
                           "Validation Failed: 1: index is missing;")
        _check_index_name(index)
        doc_id = params.get("_id")
        if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
            raise _EsError(400, "illegal_argument_exception", "_id must be a non-empty string")
        version, version_type = self._parse_version(params)
        source: dict[str, Any] | None = None
        if op == "delete":
            if doc_id is None:
                raise _EsError(400, "action_request_validation_exception",
                               "Validation Failed: 1: id is missing;")
        else:
            line = next(lines, None)
            if line is None or not line.strip():
                raise _EsError(400, "illegal_argument_exception",
                               f"The bulk request [{op}] action is missing its source")
            parsed = _parse_json(line, "document source")
            if not isinstance(parsed, dict):
                raise _EsError(400, "mapper_parsing_exception",
                               "failed to parse, document is empty or not an object")
            source = parsed
        return _Action(op, index, doc_id, version, version_type, source)

    @staticmethod
    def _parse_version(params: dict[str, Any]) -> tuple[int | None, str]:
        version_type = params.get("version_type", "internal")
        version = params.get("version")
        if version_type not in {"internal", *_EXTERNAL}:
            raise _EsError(400, "illegal_argument_exception",
                           f"No version type match [{version_type}]")
        if version is not None and (not isinstance(version, int) or version < 0):
            raise _EsError(400, "illegal_argument_exception", "version must be an integer >= 0")
        if version_type == "internal" and version is not None:
            raise _EsError(400, "action_request_validation_exception",
                           "Validation Failed: 1: internal versioning can not be used for "
                           "optimistic concurrency control. Please use `if_seq_no` and "
                           "`if_primary_term` instead;")
        if version_type in _EXTERNAL and version is None:
            raise _EsError(400, "action_request_validation_exception",
                           "Validation Failed: 1: an external version is required;")
        return version, version_type

    def _apply(self, a: _Action) -> dict[str, Any]:
        index = self._ensure_index(a.index)  # bulk writes create missing indices, as ES does
        doc_id = a.doc_id or f"auto{next(index.seq):012d}"
        current = index.docs.get(doc_id)
        live = current is not None and current.source is not None
        head = {"_index": index.name, "_id": doc_id}
        try:
            if a.op == "delete" and not live and a.version_type == "internal":
                return {a.op: {**head, "_version": 1, "result": "not_found", "status": 404,
                               **self._shards()}}
            version = self._next_version(a, doc_id, current)
        except _EsError as e:
            return {a.op: {**head, "status": e.status,
                           "error": {"type": e.kind, "reason": e.reason, "index": index.name,
                                     "shard": "0", "index_uuid": index.uuid}}}
        seq_no = next(index.seq)
        if a.op == "delete":
            index.docs[doc_id] = _Doc(None, version, seq_no)
            result, status = ("deleted", 200) if live else ("not_found", 404)
        else:
            index.docs[doc_id] = _Doc(a.source, version, seq_no)
            result, status = ("updated", 200) if live else ("created", 201)
        return {a.op: {**head, "_version": version, "result": result, "_seq_no": seq_no,
                       "_primary_term": 1, "status": status, **self._shards()}}

    @staticmethod
    def _next_version(a: _Action, doc_id: str, current: _Doc | None) -> int:
        if a.op == "create" and current is not None and current.source is not None:
            raise _EsError(409, "version_conflict_engine_exception",
                           f"[{doc_id}]: version conflict, document already exists "
                           f"(current version [{current.version}])")
        if a.version_type == "internal":
            return (current.version + 1) if current is not None else 1
        if a.version is None:  # _parse_action refuses this; kept for the type checker
            raise _EsError(400, "action_request_validation_exception", "version is missing")
        if current is not None:
            ok = (a.version >= current.version if a.version_type == "external_gte"
                  else a.version > current.version)
            if not ok:
                cmp = "higher than" if a.version_type == "external_gte" else "higher or equal to"
                raise _EsError(409, "version_conflict_engine_exception",
                               f"[{doc_id}]: version conflict, current version "
                               f"[{current.version}] is {cmp} the one provided "
                               f"[{a.version}]")
        return a.version

    @staticmethod
    def _shards() -> dict[str, Any]:
        return {"_shards": {"total": 2, "successful": 1, "failed": 0}}

