"""A static split of an app's partitions over N instances, without etcd.

``chukcha run module:app --instance-index I --instances N`` (or
``app.run(split=StaticSplit(I, N))``) processes only the partitions ``p`` with ``p % N == I``.
Each instance keeps its own state directory and reads the input as its own consumer group,
``<app>.<I>of<N>``. An input partitioned on the bus with the app's count is read only where it
belongs: instance I reads (and its group alone holds back) the partitions' categories it owns.
Any other input is read by every instance, which skips the other instances' events; there every
instance registers all N groups on start, so a chunk is deleted only when all N instances acked
it (each acks it once all its partitions have committed past it).
Ownership never moves, so no state has to move either: an instance that is down simply leaves
its partitions waiting (their input stays on the bus) until it is back.

The split is recorded in the state directory (``SPLIT``) and checked on every start: the same
directory under another index or count, or a directory written without a split, is refused
(:class:`~chukcha.errors.AppConfigError`), since its partitions' state would not be where the
new split expects it. Two processes given the same index with different state directories are
told apart by their heartbeats on the bus (:mod:`chukcha.processors.presence`): the second is
refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from chukcha.errors import AppConfigError
from chukcha.state.partitions import read_layout

__all__ = ["SPLIT_FILE", "StaticSplit"]

SPLIT_FILE: Final = "SPLIT"


@dataclass(frozen=True, slots=True)
class StaticSplit:
    """Instance ``index`` of ``count`` (``0 <= index < count``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"need 0 <= instance index < instances, got index {self.index} "
                             f"of {self.count}")

    def owned(self, partitions: int) -> list[int]:
        """The partitions this instance processes."""
        if self.count > partitions:
            raise ValueError(f"{self.count} instances for {partitions} partitions: some "
                             "instances would own nothing (use at most as many instances as "
                             "partitions)")
        return [p for p in range(partitions) if self.owns(p)]

    def owns(self, partition: int) -> bool:
        """Whether this instance processes ``partition``."""
        return partition % self.count == self.index

    def group(self, app: str) -> str:
        """This instance's consumer group (the app's name when there is no split)."""
        return app if self.count == 1 else f"{app}.{self.index}of{self.count}"

    def groups(self, app: str) -> list[str]:
        """Every instance's consumer group."""
        return [StaticSplit(i, self.count).group(app) for i in range(self.count)]

    def check_state_dir(self, state_dir: Path) -> None:
        """Refuse a state directory written under another split (blocking; before opening it).

        Raises:
            AppConfigError: see the module docstring.
        """
        marker = Path(state_dir) / SPLIT_FILE
        try:
            recorded = json.loads(marker.read_text())
            found = StaticSplit(int(recorded["index"]), int(recorded["count"]))
        except FileNotFoundError:
            if self.count > 1 and read_layout(Path(state_dir)) is not None:
                raise AppConfigError(
                    f"{state_dir} holds the state of an app run without a split; instance "
                    f"{self.index} of {self.count} needs a new state directory (each instance "
                    "of a split keeps only its own partitions)") from None
            return
        except (ValueError, KeyError, TypeError) as exc:
            raise AppConfigError(f"{marker} is unreadable: {exc}") from exc
        if found != self:
            raise AppConfigError(
                f"{state_dir} belongs to instance {found.index} of {found.count}, not "
                f"{self.index} of {self.count}: run it with --instance-index {found.index} "
                f"--instances {found.count} (changing the split of a running app needs new "
                "state directories for all instances)")

    def record(self, state_dir: Path) -> None:
        """Write ``SPLIT`` into ``state_dir`` if it is not there yet (blocking; durable)."""
        marker = Path(state_dir) / SPLIT_FILE
        if self.count == 1 or marker.exists():
            return
        tmp = marker.with_name(f".{SPLIT_FILE}.tmp")
        with tmp.open("w") as f:
            json.dump({"index": self.index, "count": self.count}, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(marker)
