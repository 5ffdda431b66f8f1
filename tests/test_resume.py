"""A sweep killed mid-way (SIGKILL, as a crash or a pre-empted node) and run again."""

import os
import signal
import subprocess
import sys
from collections import Counter

from harness.config.matrix import load_matrix
from harness.results.layout import read_json, read_metrics

from conftest import REPO
from processes import freeze, gone, pids_with, wait_until

# Two runs at a time, one torch thread each: the short one (12 steps) finishes while the long one, started
# with it and as fast, is about as far: some 48 of its 60 steps are still to go when the test freezes it (at 30
# steps, two test suites sharing 2 cores once let it finish first).
MATRIX = """\
# make sweep MATRIX=resume
base:
  task: {name: arith, eval_size: 50}
  train: {steps: 12, prompts_per_step: 4, group_size: 4, eval_every: 6, checkpoint_every: 5}
axes: {quant: [bf16]}
include:
  - {quant: bf16, train.steps: 60, label: long}
"""


def sweep(tmp_path):
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(tmp_path / "resume.yaml"), "--results", str(tmp_path / "results"),
         "--reports", str(tmp_path / "reports"), "--jobs", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_killed_sweep_resumes_without_rerunning_or_duplicating(tmp_path, tiny_model):
    (tmp_path / "resume.yaml").write_text(MATRIX)
    first, second = (tmp_path / "results" / "resume" / c.runs[0].run_id for c in load_matrix(tmp_path / "resume.yaml").cells)

    proc = sweep(tmp_path)
    wait_until(lambda: (first / "summary.json").exists() and len(read_metrics(second)) >= 12, proc,
               "the short run finishing and the long one passing its step-10 checkpoint")
    worker, = pids_with(str(second))
    freeze([proc.pid], group=True)  # the sweep first, so that it sees nothing of what follows
    freeze([worker])
    assert not (second / "summary.json").exists()
    finished = (first / "summary.json").read_bytes(), (first / "metrics.jsonl").read_bytes()
    killed_at = read_metrics(second)[-1]["step"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    os.kill(worker, signal.SIGCONT)  # its parent's death sent it SIGTERM (PR_SET_PDEATHSIG): it must stop, not train on
    gone(worker)
    assert not (second / "summary.json").exists(), "the killed sweep's run trained on to its end"

    proc = sweep(tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "1 already finished, 1 to run" in out

    # the finished run was not touched; the killed one continued from its checkpoint
    assert ((first / "summary.json").read_bytes(), (first / "metrics.jsonl").read_bytes()) == finished
    steps = [r["step"] for r in read_metrics(second)]
    assert steps == list(range(61)), [s for s, n in Counter(steps).items() if n > 1]
    env = read_json(second / "env.json")
    assert len(env["resumed_at"]) == 1, "the second run was restarted, not resumed"
    assert read_json(second / "summary.json")["status"] == "ok"
    assert killed_at >= 11  # rows past the checkpoint it resumed from were dropped, not duplicated
    assert (tmp_path / "reports" / "resume" / "report.md").exists()


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one_or_to_none(tmp_path):
    """A host crash can keep save()'s rename and lose the file's bytes: the run must resume from what
    is readable (or start over), not fail for good on EOFError."""
    import random
    import shutil

    import torch

    from harness.models import checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, model, opt, random.Random(0), step=3)
    saved = model.weight.detach().clone()
    shutil.copytree(tmp_path / "adapter", tmp_path / "step3")
    checkpoint.save(tmp_path, model, opt, random.Random(0), step=6)
    os.replace(tmp_path / "step3", tmp_path / ".adapter.old")  # as if killed between the renames of the next save,
    (tmp_path / "adapter" / checkpoint.STATE).write_bytes(b"")  # with step 6 torn by a crash

    assert checkpoint.saved_step(tmp_path) == 3
    with torch.no_grad():
        model.weight.zero_()
    assert checkpoint.restore(tmp_path, model, opt, random.Random()) == 3
    assert torch.equal(model.weight, saved) and not (tmp_path / ".adapter.old").exists()

    (tmp_path / "adapter" / checkpoint.STATE).write_bytes(b"PK\x03\x04 torn")
    assert checkpoint.saved_step(tmp_path) == -1  # nothing readable: the run starts over
    assert checkpoint.restore(tmp_path, model, opt, random.Random()) == 0
