"""Short real GRPO runs through the real bitsandbytes kernels on CPU."""

import re

import torch

import harness.recipes.common as common
from harness.execution.lifecycle import run_one
from harness.results.layout import read_json, read_metrics

from conftest import REPO, tiny_run_config

DESIGN_METRICS = [
    "reward/mean", "reward/std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "completion_length", "loss",
    "grad_norm", "eval/reward", "time/rollout_s", "time/train_s", "time/sync_s", "throughput/rollout_tokens_per_s",
    "throughput/train_tokens_per_s", "memory/peak_gib", "memory/rollout_peak_gib", "memory/train_peak_gib",
    "mismatch/logprob_diff_mean", "mismatch/k3_kl", "mismatch/is_ratio_mean",
]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise when the dtype is kept (packed 4-bit bytes sit in a bf16 container and some read
    as NaN); by value when not (bitsandbytes casts a Linear4bit bias to the input dtype in place)."""
    a, b = a.detach().contiguous().flatten(), b.detach().contiguous().flatten()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == b.dtype else torch.equal(a.float(), b.float())


def spy_on_policy(monkeypatch):
    """Keep the model the recipe loads, and a copy of its weights at load time."""
    seen = {}

    def load_and_keep(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        seen["model"] = model
        seen["at_load"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model, tok

    real = common.load_policy
    monkeypatch.setattr(common, "load_policy", load_and_keep)
    return seen


def test_nf4_grpo_trains_lora_only_and_logs_every_metric(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    cfg = tiny_run_config(steps=4, eval_every=2).model_copy(update={"quant": "nf4"})
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")

    model, before = seen["model"], seen["at_load"]
    linear4bit = [m for m in model.modules()
                  if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"]
    assert len(linear4bit) == 4 * 7  # every linear of the 4 decoder layers is NF4
    after = dict(model.named_parameters())
    lora = [n for n in after if "lora_" in n]
    base = [n for n in after if "lora_" not in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert any(not torch.equal(after[n], before[n]) for n in lora if "lora_B" in n), "LoRA B never moved"
    assert all(same(after[n], before[n]) for n in base), "the frozen base changed"
    assert all(not after[n].requires_grad for n in base)

    rows = read_metrics(tmp_path / cfg.run_id)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    logged = set().union(*rows)
    assert set(DESIGN_METRICS) <= logged, set(DESIGN_METRICS) - logged
    assert "eval/reward" in rows[0] and "eval/reward" in rows[2] and "eval/reward" in rows[4]
    assert all(r["memory/peak_gib"] > 0 for r in rows[1:])

    s = read_json(tmp_path / cfg.run_id / "summary.json")
    assert s["compute_dtype"] in ("bfloat16", "float32") and s["steps_completed"] == 4
    # 4 bits + absmax (1 byte / 64, double-quantized) + per-layer constants
    assert 0.5 < s["bytes_per_param"] < 0.6
    assert (tmp_path / cfg.run_id / "adapter" / "adapter_model.safetensors").exists()


def test_metric_names_match_the_design_doc():
    design = REPO.parent / "shared" / "DESIGN.md"
    if design.exists():  # beside a developer's checkout; CI has it too
        section = design.read_text().split("## Metric names")[1].split("##")[0]
        named = set(re.findall(r"`([a-z_/0-9]+)`", section))
        assert named <= set(DESIGN_METRICS), named - set(DESIGN_METRICS)


def test_zero_lr_changes_nothing(tmp_path, tiny_model, monkeypatch):
    seen = spy_on_policy(monkeypatch)
    cfg = tiny_run_config(lr=0.0)
    assert run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))["status"] == "ok"
    after = dict(seen["model"].named_parameters())
    assert all(same(after[n], seen["at_load"][n]) for n in after)
    rows = read_metrics(tmp_path / cfg.run_id)
    assert rows[0]["eval/reward"] == rows[-1]["eval/reward"]


def test_a_crash_still_writes_summary(tmp_path, tiny_model):
    cfg = tiny_run_config().model_copy(update={"model": str(tmp_path / "no-such-model")})
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "failed" and "no-such-model" in s["error"]
    assert read_json(tmp_path / cfg.run_id / "summary.json")["status"] == "failed"


def test_non_finite_loss_stops_the_run_as_nan(tmp_path, tiny_model):
    cfg = tiny_run_config(lr=1e30, steps=6, eval_every=6)  # absurd lr: the weights overflow
    s = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert s["status"] == "nan" and "non-finite" in s["error"]
