"""python -m safron.cli: safron-render."""

import sys

from .render import main

sys.exit(main())
