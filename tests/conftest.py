import os
import tempfile
from pathlib import Path

import pytest

# One model cache per test session (what a test builds, e.g. a rebuilt tiny model: ~35 s), unless the
# caller points QRL_CACHE at an existing one. Set before harness is imported so subprocesses inherit it.
os.environ.setdefault("QRL_CACHE", tempfile.mkdtemp(prefix="qrl-test-cache-"))

import torch  # noqa: E402

# The runs trained inside this process use one CPU thread. The tiny model trains as fast on one as on two,
# and with two every op waits for the second thread whenever another process holds a core: with one of the
# two cores kept busy, in-process tests took 10-20x longer (a 0.5 s GRPO run took 10 s). Subprocesses
# keep their own defaults unless a test says otherwise.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def no_allocator_setting(monkeypatch):
    """An environment without the user's CUDA allocator variables (whatever the machine running the tests sets)."""
    from harness.common.system import ALLOCATOR_VARS

    for var in ALLOCATOR_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """builtin:tiny-arith: the model shipped with the package, checked against its sha256 list."""
    from harness.models.tiny_arith import shipped

    return shipped()


def tiny_run_config(**train):
    """A GRPO config small enough to train a few steps in seconds on CPU."""
    from harness.config.run import RunConfig

    base = dict(steps=3, prompts_per_step=4, group_size=4, eval_every=3, checkpoint_every=3)
    return RunConfig(task={"name": "arith", "eval_size": 50}, train=base | train)


def with_sampling_defaults(model_dir, folder):
    """A copy of the model whose generation_config.json carries sampling defaults, as released
    checkpoints do (Qwen2.5-Instruct ships a repetition_penalty): rollouts must sample from the policy
    the trainer scores, not from these."""
    import json
    import shutil

    shutil.copytree(model_dir, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(config | {"repetition_penalty": 1.3, "min_p": 0.2}))
    return folder
