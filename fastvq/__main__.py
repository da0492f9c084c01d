"""``python -m fastvq``: the ``fastvq`` command (see ``fastvq.cli``)."""

import sys

from .cli import main

sys.exit(main())
