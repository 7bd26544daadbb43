"""``python -m cyclelab.workshop lab-settings|tables``: hub planning from the shell."""

import sys

from cyclelab.workshop.planning import main

sys.exit(main())
