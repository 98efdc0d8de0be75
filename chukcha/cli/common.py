"""What the commands that talk to nodes share: their common options (``--node``, credentials,
``--timeout``), the client built from them, running a command's coroutine with one-line errors,
and plain-text tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from chukcha.cli.options import (
    add_node_option,
    nodes_from,
    quiet_broken_pipe,
    seconds,
    tls_from,
    token_from,
)
from chukcha.client import Client
from chukcha.errors import ChukchaError
from chukcha.loop import run_loop

__all__ = ["add_client_options", "connect", "format_table", "one_line", "run_command"]


def add_client_options(p: argparse.ArgumentParser) -> None:
    """``--node`` (repeatable), ``--token-file``, ``--tls-ca`` and ``--timeout``."""
    add_node_option(p)
    p.add_argument("--timeout", type=seconds, default=30.0, metavar="DURATION",
                   help="how long one request may take before the next node is tried "
                        "(default 30s)")


def connect(args: argparse.Namespace, nodes: Sequence[str] | None = None,
            token: str | None = None) -> Client:
    """The client of a command: ``nodes`` (default: :func:`nodes_from`), ``--timeout``, the
    token (default: :func:`token_from`) and ``--tls-ca``."""
    return Client(list(nodes) if nodes is not None else nodes_from(args),
                  timeout=args.timeout, token=token or token_from(args), ssl=tls_from(args))


def run_command(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine and return its exit code; an error is one line on stderr and
    exit code 1, Ctrl-C 130, a closed stdout (``| head``) a quiet 0."""
    try:
        return run_loop(main())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (ChukchaError, OSError, ValueError) as exc:
        print(f"chukcha: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """An error's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first one the header) as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )
