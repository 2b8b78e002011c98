"""The pool planner from a checkout: ``pdjax plan`` (pdjax.planner.cli),
kept under its old name for scripts that run ``python tools/plan_pools.py``.
"""

import sys
from pathlib import Path

# Runs from a checkout without pdjax installed, as the other tools do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdjax.planner import cli  # noqa: E402

if __name__ == "__main__":
  cli.run()
