"""``chukcha run``: argument errors are clear and change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from chukcha.cli import main
from chukcha.cli.run import load_app


def test_load_app() -> None:
    app = load_app("examples.orders:app")
    assert app.name == "billing"
    assert list(app.handlers) == ["orders"]
    assert load_app("examples.orders") is app  # attribute defaults to "app"


def test_bad_targets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    assert main(["run", "no_such_module:app", "--state-dir", str(state)]) == 2
    assert "cannot import 'no_such_module'" in caplog.text
    assert main(["run", "examples.orders:on_order", "--state-dir", str(state)]) == 2
    assert "is not a chukcha App" in caplog.text
    assert not state.exists()
