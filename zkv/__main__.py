"""``python -m zkv`` is the ``zkv`` command."""

import sys

from .cli import main

sys.exit(main())
