"""``python -m edge_agent`` is ``edgeloop-agent``."""

import sys

from edge_agent.cli import main

sys.exit(main())
