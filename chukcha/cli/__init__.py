"""The ``chukcha`` command: ``chukcha node``, the client tools, ``chukcha run``.

Each subcommand lives in its own module with ``register(subparsers)``; the module's handler
returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["build_parser", "main", "version"]

# Modules that add subcommands, in --help order.
_COMMAND_MODULES = (
    "chukcha.cli.node",
    "chukcha.cli.client",
    "chukcha.cli.groups",
    "chukcha.cli.partitions",
    "chukcha.cli.run",
    "chukcha.cli.apps",
)


class _Parser(argparse.ArgumentParser):
    """Bad flags give one clear line (no usage dump) and exit code 2, as Go's flag package."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser: options may come before, between or after positionals
    (``chukcha send orders --node URL events.txt``), which plain ``parse_args`` refuses."""

    _parsing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._parsing:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def version() -> str:
    """The installed distribution's version (``chukcha --version``)."""
    try:
        return importlib.metadata.version("chukcha")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="chukcha",
        description="Chukcha: a persistent, distributed event bus and exactly-once processors.",
        epilog="`chukcha COMMAND --help` explains a command. The commands that talk to nodes "
               "take --node URL (repeatable), else $CHUKCHA_NODES (comma-separated), else "
               "http://127.0.0.1:8080 (run: the app's own nodes); without --token-file and "
               "--tls-ca they use $CHUKCHA_TOKEN (the token itself) and $CHUKCHA_TLS_CA.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"chukcha {version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser
    )
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except BrokenPipeError:
        from chukcha.cli.options import quiet_broken_pipe  # noqa: PLC0415

        return quiet_broken_pipe()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
