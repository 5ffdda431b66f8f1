"""GRPO's micro-batches (train.micro_batch_size): the parts' losses add up to the whole batch's, and a step
taken in parts moves the adapter as the step taken at once."""

import pytest
import torch

import harness.recipes.common as common
from harness.execution.lifecycle import run_one
from harness.recipes.grpo import micro_batches, part_logprobs
from harness.recipes.rl_math import aggregate, completion_logprobs
from harness.results.layout import read_metrics

from conftest import tiny_run_config

# per-token losses of 4 sequences; lengths 3, 1, 0 (a dropped group's row), 2
PER_TOKEN = torch.tensor([[-1.0, -2, -3], [4, 0, 0], [9, 9, 9], [0.5, 2.5, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])


@pytest.mark.parametrize("loss_type, whole", [
    ("dapo", (-6 + 4 + 3) / 6),             # 6 tokens in the batch
    ("grpo", (-2 + 4 + 1.5) / 3),           # sequence means -2, 4, 1.5 over 3 sequences (the empty row is none)
    ("dr_grpo", (-6 + 4 + 3) / (3 * 5)),    # 3 sequences x max_new_tokens 5
])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_parts_add_up_to_the_batch_loss_by_hand(loss_type, whole, size):
    assert aggregate(PER_TOKEN, MASK, loss_type, 5).item() == pytest.approx(whole)
    parts = micro_batches(4, size)
    assert [list(range(4))[p] for p in parts] == [list(range(i, min(i + size, 4))) for i in range(0, 4, size)]
    total = sum(aggregate(PER_TOKEN[p], MASK[p], loss_type, 5, batch_mask=MASK).item() for p in parts)
    assert total == pytest.approx(whole)


def test_micro_batches_cover_every_row_once():
    assert micro_batches(10, None) == [slice(0, 10)]
    assert micro_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert micro_batches(3, 8) == [slice(0, 3)]


def test_a_part_is_scored_without_its_padding_columns_and_as_in_the_whole_batch():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    # rows 0-1: short prompts (two columns of left padding in both) and completions of 2 and 1 tokens;
    # rows 2-3: the batch's longest prompt and completion
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [0, 0, 0, 8, 9], [3, 4, 5, 6, 7], [0, 9, 8, 7, 6]])
    prompt_mask = (prompt_ids != 0).long()
    completion_ids = torch.tensor([[10, 1, 0, 0], [11, 0, 0, 0], [12, 13, 14, 1], [15, 16, 1, 0]])
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    args = (prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0)
    calls = []
    real_forward = model.forward
    model.forward = lambda **kw: calls.append(kw["input_ids"].shape) or real_forward(**kw)
    with torch.no_grad():
        whole, whole_entropy = completion_logprobs(model, *args[:-1])
        short, short_entropy = part_logprobs(model, args, slice(0, 2))
        long, _ = part_logprobs(model, args, slice(2, 4))
    assert calls[1] == (2, 3 + 2)  # the short part: 3 prompt columns and 2 completion columns, not 5 + 4
    assert calls[2] == (2, 5 + 4)
    assert short.shape == (2, 4)  # padded back to the batch's width
    m = completion_mask.bool()
    torch.testing.assert_close(torch.cat([short, long])[m], whole[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short_entropy[m[:2]], whole_entropy[:2][m[:2]], rtol=1e-5, atol=1e-5)
    assert (short[:, 2:] == 0).all()  # the columns added back


def one_step(tmp_path, monkeypatch, micro_batch_size):
    """One GRPO step in float32 (bitwise-stable row results); the adapter after it and the step's metrics."""
    seen = {}
    real = common.load_policy

    def keep(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        seen["model"] = model
        return model, tok

    monkeypatch.setattr(common, "load_policy", keep)
    cfg = tiny_run_config(steps=1, eval_every=1, checkpoint_every=1, prompts_per_step=4, group_size=4, dtype="float32",
                          updates_per_batch=2, micro_batch_size=micro_batch_size)
    run_dir = tmp_path / f"mb{micro_batch_size}"
    summary = run_one(cfg, run_dir, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")
    lora = {n: p.detach().clone() for n, p in seen["model"].named_parameters() if "lora_" in n}
    return lora, [r for r in read_metrics(run_dir) if "loss" in r][0]


def test_a_step_in_micro_batches_moves_the_adapter_as_the_whole_batch(tmp_path, tiny_model, monkeypatch):
    whole, m_whole = one_step(tmp_path, monkeypatch, None)
    parts, m_parts = one_step(tmp_path, monkeypatch, 3)  # 16 completions in parts of 3, 3, 3, 3, 3, 1
    assert m_whole["reward/mean"] == m_parts["reward/mean"]  # the same rollouts (the run's seed)
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio"):
        assert m_parts[key] == pytest.approx(m_whole[key], rel=1e-4, abs=1e-6), key
    assert m_whole["grad_norm"] > 0 and m_whole["kl"] > 0  # the second update's KL: the first moved the adapter
    moved = [n for n in whole if "lora_B" in n and whole[n].abs().sum() > 0]
    assert moved, "the adapter never moved"
    # AdamW moves each weight by about lr (1e-3) a step whatever its gradient's size, so float32 summation-order
    # differences in a near-zero gradient show as up to ~3e-6: 1e-5 is 1% of one step
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-5)


def test_micro_batch_size_keeps_existing_run_ids():
    # unset, the field is left out of the canonical JSON (the smoke reference's run id: tests/test_passk.py)
    cfg = tiny_run_config()
    assert "micro_batch_size" not in cfg.canonical_json()
    assert tiny_run_config(micro_batch_size=4).run_id != cfg.run_id
