"""``python -m chukcha`` is the ``chukcha`` command."""

import sys

from chukcha.cli import main

sys.exit(main())
