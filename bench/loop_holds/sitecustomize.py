"""Loop-hold profile of a node: how long appends, ``fallocate``, the release of allocated space
and rotations hold the event loop (and, for comparison, the worker thread).

Put this folder on ``PYTHONPATH`` and name an output folder in ``CHUKCHA_LOOP_HOLDS``: every
Python process started so (a node started by a benchmark too) times those calls, by thread,
into a histogram that it writes to ``<folder>/<pid>.json`` when it exits (a graceful stop).
``bench/loop_holds_report.py <folder>`` prints them. It wraps private functions of
``chukcha.bus.chunks`` and ``chukcha.bus.chunk_index`` by name: a tool for profiling, not an
interface.

    CHUKCHA_LOOP_HOLDS=/tmp/holds PYTHONPATH=bench/loop_holds \\
        .venv/bin/python bench/bench_vs_go.py --go PATH --only mixed --runs 1
    .venv/bin/python bench/loop_holds_report.py /tmp/holds
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__: list[str] = []

EDGES = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, float("inf"))
"""Upper bounds of the histogram's buckets, in milliseconds."""

_hist: dict[str, list[int]] = {}
_total: dict[str, float] = {}
_max: dict[str, float] = {}


def _record(name: str, seconds: float) -> None:
    ms = seconds * 1000
    counts = _hist.setdefault(name, [0] * len(EDGES))
    counts[next(i for i, edge in enumerate(EDGES) if ms <= edge)] += 1
    _total[name] = _total.get(name, 0.0) + ms
    _max[name] = max(_max.get(name, 0.0), ms)


def _timed(label: Callable[..., str], func: Callable[..., Any]) -> Callable[..., Any]:
    main = threading.main_thread()

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            where = "loop" if threading.current_thread() is main else "thread"
            _record(f"{label(*args)} [{where}]", time.perf_counter() - t0)

    return timed


def _size_label(*args: Any) -> str:
    return "append big" if len(args[2]) > 64 << 10 else "append small"


def _wrap(owner: Any, name: str, label: Callable[..., str], static: bool = False) -> None:
    """Time ``owner.name`` where the tree profiled has it (an older tree may not)."""
    func = getattr(owner, name, None)
    if func is not None:
        timed = _timed(label, func)
        setattr(owner, name, staticmethod(timed) if static else timed)


def _install(out: Path) -> None:
    from chukcha.bus import chunk_index, chunk_queue, chunks  # noqa: PLC0415 - only when asked

    store = chunks.ChunkStore
    _wrap(chunks, "_append_small", _size_label)
    _wrap(store, "_append", _size_label, static=True)
    _wrap(chunks, "reserve_space", lambda *a: "fallocate")
    _wrap(chunk_queue, "reserve_space", lambda *a: "fallocate")
    _wrap(chunk_index, "release_space", lambda *a: "release (ftruncate)")
    _wrap(store, "_create_chunk", lambda *a: "create chunk")

    def dump() -> None:
        (out / f"{os.getpid()}.json").write_text(json.dumps(
            {"source": str(Path(chunks.__file__).parents[2]), "edges": EDGES[:-1],
             "hist": _hist, "total_ms": _total, "max_ms": _max}))

    atexit.register(dump)


if os.environ.get("CHUKCHA_LOOP_HOLDS"):
    _install(Path(os.environ["CHUKCHA_LOOP_HOLDS"]))
