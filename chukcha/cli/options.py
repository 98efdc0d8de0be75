"""What every ``chukcha`` command parses the same way: ``--node`` (and ``$CHUKCHA_NODES``),
durations (``90s``, ``10m``, ``1h30m``, ``7d``, ``2w``) and sizes (``64KiB``, ``20MB``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any, Final, NoReturn

from chukcha.client import parse_nodes

__all__ = [
    "DEFAULT_NODE",
    "add_credential_options",
    "add_node_option",
    "duration",
    "nodes_from",
    "parse_duration",
    "parse_size",
    "positive_duration",
    "positive_size",
    "quiet_broken_pipe",
    "seconds",
    "size",
    "tls_ca_path",
    "tls_from",
    "token_from",
    "whole_seconds",
]

DEFAULT_NODE: Final = "http://127.0.0.1:8080"

_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0,
}
_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d|w)")
_SIZE: Final = re.compile(r"(-?\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def parse_duration(text: str, *, plain_seconds: bool = False) -> float:
    """Seconds from ``"1.5s"``, ``"10m"``, ``"1h30m"``, ``"7d"``, ``"2w"``, ``"50ms"``, ``"0"``
    (Go's syntax plus days and weeks); with ``plain_seconds`` also a bare number (``"90"``).

    Raises:
        ValueError: anything else, with the accepted forms in the message.
    """
    s = text.strip()
    if not s:
        _bad_duration(text)
    if s.lstrip("+-") == "0":
        return 0.0
    if plain_seconds:
        try:
            return float(s)
        except ValueError:
            pass
    negative = s.startswith("-")
    s = s.lstrip("+-")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            _bad_duration(text)
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s:
        _bad_duration(text)
    return -total if negative else total


def _bad_duration(text: str) -> NoReturn:
    raise ValueError(f"invalid duration {text!r} (examples: 30s, 10m, 1h30m, 7d, 2w, 50ms)")


def parse_size(text: str) -> int:
    """Bytes from ``"1000"``, ``"64KiB"``, ``"20MB"``, ``"1.5GiB"`` (KB, MB, GB are powers of
    1000; KiB, MiB, GiB of 1024).

    Raises:
        ValueError: anything else.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid size {text!r}: not a number of bytes "
                         "(examples: 1000, 64KiB, 20MB, 1GiB)")
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    if value != int(value):
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def _argtype(parse: Any, text: str, minimum: float, what: str) -> Any:
    try:
        value = parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
    return value


def duration(text: str) -> float:
    """argparse type: a duration of zero or more seconds."""
    return float(_argtype(parse_duration, text, 0, "zero or more"))


def seconds(text: str) -> float:
    """argparse type: a positive duration; a bare number is seconds (``--timeout 30``)."""
    value = float(_argtype(lambda t: parse_duration(t, plain_seconds=True), text, 0,
                           "zero or more"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive")
    return value


def whole_seconds(text: str) -> int:
    """argparse type: a positive whole number of seconds (an etcd lease TTL): ``30``, ``30s``,
    ``2m``."""
    value = seconds(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"duration {text!r} must be whole seconds")
    return int(value)


def positive_duration(text: str) -> float:
    """argparse type: a duration of more than zero seconds."""
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be positive")
    return value


def size(text: str) -> int:
    """argparse type: a size of zero or more bytes."""
    return int(_argtype(parse_size, text, 0, "zero or more"))


def positive_size(text: str) -> int:
    """argparse type: a size of at least one byte."""
    return int(_argtype(parse_size, text, 1, "positive"))


def add_node_option(p: Any) -> None:
    """``--node URL`` (repeatable; also ``-node`` and comma-separated lists), and the
    credentials to talk to nodes with: ``--token-file`` and ``--tls-ca``."""
    p.add_argument("--node", "-node", action="append", metavar="URL",
                   help="a node to talk to (repeatable; default $CHUKCHA_NODES, "
                        f"comma-separated, or {DEFAULT_NODE}); https://... for TLS")
    add_credential_options(p)


def add_credential_options(p: Any) -> None:
    """``--token-file PATH`` and ``--tls-ca PATH`` (see :func:`token_from`, :func:`tls_from`)."""
    p.add_argument("--token-file", metavar="PATH",
                   help="send the token in PATH (its first line that is not a # comment) as "
                        "'Authorization: Bearer' (default $CHUKCHA_TOKEN, the token itself)")
    p.add_argument("--tls-ca", metavar="PATH",
                   help="CA certificate(s) to trust for https:// nodes (default "
                        "$CHUKCHA_TLS_CA, else the system's store)")


def token_from(args: argparse.Namespace) -> str | None:
    """The token: the first token of ``--token-file``, else ``$CHUKCHA_TOKEN``, else none.

    Raises:
        ValueError: the file cannot be read or holds no token.
    """
    path = getattr(args, "token_file", None)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--token-file {path}: {exc.strerror or exc}") from None
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                return line
        raise ValueError(f"--token-file {path} holds no token")
    return os.environ.get("CHUKCHA_TOKEN", "").strip() or None


def tls_ca_path(args: argparse.Namespace) -> str | None:
    """The CA file for https:// nodes: ``--tls-ca``, else ``$CHUKCHA_TLS_CA``, else ``None``."""
    return getattr(args, "tls_ca", None) or os.environ.get("CHUKCHA_TLS_CA", "").strip() or None


def tls_from(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS trust for https:// nodes: ``--tls-ca``, else ``$CHUKCHA_TLS_CA``, else ``None``
    (the system's store).

    Raises:
        ValueError: the file cannot be read as certificates.
    """
    path = tls_ca_path(args)
    if path is None:
        return None
    try:
        return ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-ca {path}: {exc}") from None


def nodes_from(args: argparse.Namespace, default: str | None = DEFAULT_NODE) -> list[str]:
    """The node URLs: ``--node``, else ``$CHUKCHA_NODES``, else ``default`` (``None``: no
    default, an empty list)."""
    given = [n for item in (getattr(args, "node", None) or []) for n in item.split(",")]
    given = [n.strip() for n in given if n.strip()]
    if given:
        return parse_nodes(given)
    env = os.environ.get("CHUKCHA_NODES", "").strip()
    if env:
        return parse_nodes(env)
    return parse_nodes(default) if default else []


def quiet_broken_pipe() -> int:
    """Whoever read our stdout went away (``chukcha tail orders | head``): end quietly with
    exit code 0. stdout is pointed at /dev/null first, so that the interpreter's final flush
    does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 0
