"""``python -m quicksilver``: the same as the ``quicksilver`` command."""

import sys

from quicksilver.cli import main

sys.exit(main())
