import math

import pytest
import torch
from test_grpo import same, spy_on_policy

from harness.execution.lifecycle import run_one
from harness.recipes.rl_math import reverse_kl
from harness.results.layout import read_metrics

from conftest import tiny_run_config


def test_reverse_kl_by_hand_on_two_tokens():
    # position 1: student (0.75, 0.25), teacher (0.5, 0.5); position 2: both (0.2, 0.8)
    student = torch.log(torch.tensor([[[0.75, 0.25], [0.2, 0.8]]]))
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]))
    kl = reverse_kl(student, teacher)
    assert kl[0, 0].item() == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    # reverse, not forward: swapping the roles gives a different number
    assert reverse_kl(teacher, student)[0, 0].item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))


def distill(tmp_path, quant, **train):
    cfg = tiny_run_config(**train).model_copy(update={"algorithm": "distill", "quant": quant})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "ok", s.get("traceback")
    return read_metrics(tmp_path / cfg.run_id)


def test_quantized_student_distills_toward_the_teacher(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    rows = distill(tmp_path, "nvfp4_w4a4", steps=3)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/reward" in rows[0] and "eval/reward" in rows[3]
    assert all(r["kl"] > 0 and math.isfinite(r["kl"]) for r in rows[1:])  # quantization error is a real gap
    assert {"reward/mean", "entropy", "grad_norm", "memory/peak_gib", "mismatch/logratio_abs_p99"} <= rows[1].keys()
    after = dict(seen["model"].named_parameters())
    assert any(not torch.equal(after[n], seen["at_load"][n]) for n in after if "lora_B" in n)
    assert all(same(after[n], seen["at_load"][n]) for n in after if "lora_" not in n)


def test_bf16_student_starts_equal_to_its_teacher(tmp_path, tiny_model):
    rows = distill(tmp_path, "bf16", steps=1, eval_every=1)
    assert rows[1]["kl"] < 1e-6
