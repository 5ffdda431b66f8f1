"""quant-rl harness: RL post-training of LLMs under quantization, as a sweepable benchmark.

The Python API (harness.api) is re-exported here: `harness.sweep("smoke")`, `harness.steps(...)`."""

from harness.api import (
           Plan,
           SweepResult,
           cells,
           execute,
           judge,
           load,
           plan,
           report,
           retry,
           run,
           runs,
           settings,
           steps,
           sweep,
           tune,
)
from harness.errors import HarnessError

__version__ = "0.1.0"
__all__ = ["HarnessError", "Plan", "SweepResult", "cells", "execute", "judge", "load", "plan", "report", "retry", "run", "runs",
           "settings", "steps", "sweep", "tune"]
