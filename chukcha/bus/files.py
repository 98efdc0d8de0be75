"""Small state files of a node (next to the category directories, never mistaken for one:
their names start with ``.``): read whole, written atomically (temp file, fsync, rename, fsync
of the directory). Blocking: call them in a worker thread."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_file", "write_atomic"]


def read_file(path: Path) -> bytes | None:
    """The file's bytes, ``None`` when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old or the new bytes."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
