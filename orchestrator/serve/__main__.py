"""``python -m orchestrator.serve ...`` (the same as ``solverify serve ...``)."""

import sys

from orchestrator.serve.cli import main

sys.exit(main(prog="python -m orchestrator.serve"))
