"""``chukcha node`` whose first front worker, just forked (before it has dropped the
supervisor's signal handlers), asks the supervisor to stop and waits up to 10 s for the stop
signal the supervisor then sends it: a SIGTERM landing in that window, as one does when a node
is stopped (or Ctrl-C'd) right after it started, made deterministic. The fork, the signals and
the supervisor are the real ones; only the moment is chosen.

``python -m tests.integration.stop_in_fork_window node --workers 2 ...`` (the node's flags).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from chukcha.bus.config import NodeConfig
from chukcha.cli import main, workers

__all__: list[str] = []

_real_child = workers._child  # the fault is injected around it
_fired: list[bool] = []


def _child(role: str, config: NodeConfig, primary_socket: str, others: list[int]) -> None:
    if role == "front" and not _fired:
        _fired.append(True)
        os.kill(os.getppid(), signal.SIGTERM)  # the supervisor: stop
        deadline = time.monotonic() + 10.0
        # Polled until the supervisor's SIGTERM to this child is pending (blocked until the
        # child is ready for it); a handler that swallowed it leaves the full 10 s.
        while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.01)
    _real_child(role, config, primary_socket, others)


workers._child = _child

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
