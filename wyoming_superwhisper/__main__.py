"""``python -m wyoming_superwhisper`` is the ``superwhisper`` command."""

import sys

from .cli import main

sys.exit(main())
