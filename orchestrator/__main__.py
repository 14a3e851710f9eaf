"""``python -m orchestrator`` is the ``edgeloop`` command."""

import sys

from orchestrator.cli import main

sys.exit(main())
