"""The in-process rollout engine: prompt encoding, and sampler log-probs the trainer can reproduce."""

import pytest
import torch

from conftest import tiny_run_config, with_sampling_defaults


def test_repeated_prompts_encode_as_each_one_alone(tiny_model):
    from transformers import AutoTokenizer

    from harness.rollout.hf import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["1+2=", "33+44=", "1+2=", "5+5=", "33+44=", "33+44="]
    ids, mask = encode_prompts(tok, prompts, torch.device("cpu"))
    tok.padding_side = "left"
    plain = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(ids, plain["input_ids"]) and torch.equal(mask, plain["attention_mask"])
    assert mask[0].tolist()[: mask.shape[1] - 4] == [0] * (mask.shape[1] - 4)  # left-padded to the longest


def sample(model_dir, **rollout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.recipes.rl_math import completion_logprobs, mismatch_metrics
    from harness.rollout.hf import HFEngine
    from harness.tasks import load_task

    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"max_new_tokens": 12, **rollout})})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    batch = HFEngine(model, AutoTokenizer.from_pretrained(model_dir), cfg).generate(
        [p.prompt for p in load_task(cfg.task).train[:16]] * 4)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                                      cfg.rollout.temperature)
    return batch, mismatch_metrics(logp, batch.sampler_logprobs, batch.completion_mask, cap=2.0)


def test_top_p_leaves_no_nan_at_padding(tiny_model):
    """After EOS the pad token is often outside the nucleus (-inf): every metric of such a batch was
    NaN, and each run with top_p < 1 stopped at step 1 as diverged."""
    batch, m = sample(tiny_model, temperature=0.7, top_p=0.9)
    assert (batch.completion_mask == 0).any()
    assert torch.isfinite(batch.sampler_logprobs).all() and (batch.sampler_logprobs[batch.completion_mask == 0] == 0).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), m


def test_the_checkpoints_own_sampling_defaults_do_not_reach_the_sampler(tiny_model, tmp_path):
    """A repetition_penalty in generation_config.json made the in-process sampler another policy than
    the trainer's: logprob_diff_mean 0.24 instead of ~1e-7."""
    _, m = sample(with_sampling_defaults(tiny_model, tmp_path / "released"), temperature=1.0)
    assert m["mismatch/logprob_diff_mean"] < 1e-4 and m["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4), m
