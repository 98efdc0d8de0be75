"""``python -m chukcha`` is the ``chukcha`` command."""

import sys

from chukcha.cli import main

__all__: list[str] = []

sys.exit(main())
