"""``python -m creditsync_pipeline.simulators.stripe`` (see the package docstring)."""

import sys

from . import main

sys.exit(main())
