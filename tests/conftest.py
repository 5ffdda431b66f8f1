import os
import tempfile
from pathlib import Path

import pytest

# One model cache per test session (the tiny model builds in ~30 s), unless the caller points
# QRL_CACHE at an existing one. Set before harness is imported so subprocesses inherit it.
os.environ.setdefault("QRL_CACHE", tempfile.mkdtemp(prefix="qrl-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from harness.tiny_arith import build

    return build(log=lambda *_: None)


def tiny_run_config(**train):
    """A GRPO config small enough to train a few steps in seconds on CPU."""
    from harness.config import RunConfig

    base = dict(steps=3, prompts_per_step=4, group_size=4, eval_every=3, checkpoint_every=3)
    return RunConfig(task={"name": "arith", "eval_size": 50}, train=base | train)
