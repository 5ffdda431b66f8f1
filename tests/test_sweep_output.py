"""What a real sweep prints: text from the matrix (labels, descriptions) and from runs reaches the terminal
literally, never as rich markup or terminal escapes; a sweep where nothing trained exits non-zero."""

import os
import subprocess
import sys

from conftest import REPO

HOSTILE = """\
description: "a [bold]sweep[/] with \\e[31mescapes"
base:
  task: {name: arith, eval_size: 20}
  train: {steps: 2, prompts_per_step: 2, group_size: 2, eval_every: 2, checkpoint_every: 2}
axes: {quant: [bf16]}
include:
  - {quant: bf16, train.lr: 0.002, label: "odd [/] label \\e[2J[red]x"}
"""

NOTHING_TRAINS = """\
base:
  model: no-such-org/no-such-model   # an HF id: checked when it loads, so the run itself fails
  train: {steps: 2, prompts_per_step: 2, group_size: 2}
axes: {quant: [bf16]}
"""


def harness(tmp_path, *args):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "harness", *args, "--results", str(tmp_path / "results"),
                           "--reports", str(tmp_path / "reports")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)


def test_markup_and_escapes_in_labels_are_printed_literally(tmp_path, tiny_model):
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE)
    out = harness(tmp_path, "sweep", str(path), "--jobs", "2")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "\x1b" not in text, "an escape sequence from the matrix reached the terminal"
    assert "Traceback" not in text
    assert r"odd [/] label \x1b[2J[red]x" in text, text  # shown as written, the escape made visible
    assert text.count("✓") == 2, text
    report = (tmp_path / "reports" / "hostile" / "report.md").read_text()
    assert "odd [/] label" in report and "\x1b" not in report


def test_a_sweep_in_which_nothing_trained_exits_non_zero(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(NOTHING_TRAINS)
    out = harness(tmp_path, "sweep", str(path))
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "no run of broken trained: 1 failed" in text, text
    assert (tmp_path / "reports" / "broken" / "report.md").exists(), "the report is still written, with each run's error"
