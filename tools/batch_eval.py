"""The batch-eval driver from a checkout: ``pdjax bench`` (pdjax.eval.cli),
kept under its old name for scripts that run ``python tools/batch_eval.py``.
"""

import sys
from pathlib import Path

# Runs from a checkout without pdjax installed, as the other tools do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdjax.eval import cli  # noqa: E402

if __name__ == "__main__":
  cli.run()
