"""The algorithm axis: each recipe's loss against hand-computed cases, then each recipe trained
for a few steps on the tiny model through the real bitsandbytes NF4 path."""

import math

import pytest
import torch
from test_grpo import same, spy_on_policy

from harness.config.run import RunConfig
from harness.execution.lifecycle import run_one
from harness.recipes import dpo, grpo, rloo, sft
from harness.recipes.rl_math import aggregate, best_worst_pairs, dpo_loss, group_advantages, loo_advantages
from harness.results.layout import read_metrics
from harness.tasks import ArithTask, BoxedTask, Problem

from conftest import tiny_run_config

REWARDS = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])


def test_leave_one_out_advantages_by_hand():
    # group 1: sum 1 -> 1 - 0/3 = 1, 0 - 1/3; group 2: sum 2 -> 1 - 1/3 = 2/3, 0 - 2/3
    assert loo_advantages(REWARDS, 4).tolist() == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])


def test_reward_scaling_by_hand():
    none, _ = group_advantages(REWARDS, 4, scale="none")  # Dr. GRPO: centred only
    assert none.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    batch, _ = group_advantages(REWARDS, 4, scale="batch", eps=0.0)
    # batch mean 3/8: squared deviations 3 x (5/8)^2 + 5 x (3/8)^2 = 1.875 over 7 (unbiased)
    assert batch.tolist() == pytest.approx((none / math.sqrt(1.875 / 7)).tolist())


# per-token loss -A (ratio 1, no KL) for A = [1, -1]; sequence 0 has 3 tokens, sequence 1 one
PER_TOKEN = torch.tensor([[-1.0, -1, -1], [1, 0, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", (-3 + 1) / 4),  # over the batch's 4 tokens
    ("grpo", (-1 + 1) / 2),  # each sequence's mean, then the mean of those
    ("dr_grpo", (-3 + 1) / (2 * 5)),  # token sum / (2 sequences x max_new_tokens 5)
])
def test_loss_aggregation_by_hand(loss_type, expected):
    assert aggregate(PER_TOKEN, MASK, loss_type, max_tokens=5).item() == pytest.approx(expected)
    # a dropped group's sequences (mask all 0) count neither as tokens nor as sequences
    dropped = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert aggregate(PER_TOKEN, dropped, loss_type, 5).item() == pytest.approx(
        {"dapo": -1, "grpo": -1, "dr_grpo": -3 / 5}[loss_type])


def test_grpo_loss_by_hand():
    # two tokens of one sequence, A = 1, ratio 1.5 on the first (clipped at 1.2), 1.0 on the second;
    # reference log-probs log(0.25) vs the policy's log(0.5): k3 = 0.5 + log 2 - 1 on the first only
    t = RunConfig(train={"clip_high": 0.2, "beta": 0.1}).train
    old = torch.log(torch.tensor([[0.4, 0.5]]))
    logp = torch.log(torch.tensor([[0.6, 0.5]]))
    ref = torch.log(torch.tensor([[0.3, 0.5]]))  # d = log(0.3/0.6) = -log 2
    loss, kl, clipped = grpo.loss(logp, old, ref, torch.tensor([1.0]), torch.ones(1, 2), 1.0, t, max_tokens=5)
    k3 = 0.5 + math.log(2) - 1
    assert kl[0].tolist() == pytest.approx([k3, 0.0], abs=1e-6)
    assert clipped.tolist() == [[True, False]]
    assert loss.item() == pytest.approx(((-1.2 + 0.1 * k3) + (-1.0)) / 2, rel=1e-5)  # dapo: mean over the 2 tokens


def test_rloo_advantages_and_loss_by_hand():
    # KL folded into the reward: sequence k1 sums (old - ref) over unmasked tokens = 0.5 and 0 (the masked -8 is padding)
    old = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    ref = torch.tensor([[-1.5, -2.0], [-0.5, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv, penalised = rloo.advantages(torch.tensor([1.0, 0.0]), old, ref, mask, beta=0.1, group_size=2)
    assert penalised.tolist() == pytest.approx([0.95, 0.0])
    assert adv.tolist() == pytest.approx([0.95, -0.95])  # G = 2: minus the other one's reward
    logp = old.clone().requires_grad_()
    loss, _ = rloo.loss(logp, old, adv, mask, 0.2, 0.2)
    # on-policy: -A summed over each completion's tokens, mean over completions: (-0.95 x 2 + 0.95 x 1) / 2
    assert loss.item() == pytest.approx(-0.475)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.475, -0.475, 0.475, 0.0])  # REINFORCE: -A / N per token


def test_dpo_loss_by_hand():
    chosen = torch.tensor([-2.0], requires_grad=True)
    loss, r_chosen, r_rejected = dpo_loss(chosen, torch.tensor([-3.0]), torch.tensor([-2.5]), torch.tensor([-2.5]), beta=0.1)
    # implicit rewards 0.1 x 0.5 = 0.05 and 0.1 x -0.5 = -0.05; loss = -log sigmoid(0.1) = log(1 + e^-0.1)
    assert (r_chosen.item(), r_rejected.item()) == pytest.approx((0.05, -0.05))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))  # -beta sigmoid(-margin)


def test_dpo_recipe_loss_and_metrics_by_hand():
    # two pairs stacked [chosen0, chosen1, rejected0, rejected1]; each sequence's log-prob is its masked token sum
    logp = torch.tensor([[-1.0, -1.0], [-0.5, -7.0], [-2.0, -1.0], [-0.2, -0.3]])
    ref = torch.tensor([[-1.0, -1.5], [-1.0, -7.0], [-1.5, -1.0], [-0.5, -0.5]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    loss, logged = dpo.loss(logp, ref, mask, n_pairs=2, beta=0.5)
    # log pi/pi_ref: chosen 0.5, 0.5 (the masked -7 is padding); rejected -0.5, 0.5 -> margins 0.5 and 0
    margins = [0.5 * 0.5 - 0.5 * -0.5, 0.5 * 0.5 - 0.5 * 0.5]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 2)
    assert logged["rewards/margins"].item() == pytest.approx(sum(margins) / 2)
    assert logged["rewards/chosen"].item() == pytest.approx(0.25) and logged["rewards/rejected"].item() == pytest.approx(0.0)
    assert logged["rewards/accuracies"].item() == 0.5  # a tie is not a correctly ranked pair


def test_pairs_are_the_best_and_worst_of_each_group():
    rewards = torch.tensor([0.0, 1, 1, 0, 1, 1, 1, 1, 0.5, 0, 1, 0.2])
    chosen, rejected = best_worst_pairs(rewards, 4)
    assert chosen.tolist() == [1, 10] and rejected.tolist() == [0, 9]  # first of ties; the all-equal group gives none


def test_sft_loss_and_reference_batch_by_hand(tiny_model):
    from transformers import AutoTokenizer

    logp = torch.log(torch.tensor([[0.5, 0.25], [0.8, 0.1]]))
    assert sft.loss(logp, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(
        (math.log(2) + math.log(4) + math.log(1.25)) / 3)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    task = ArithTask()
    problems = [Problem("23+58=", "81"), Problem("10+90=", "100")]
    prompt_ids, prompt_mask, ids, mask = sft.reference_batch(tok, task, problems, torch.device("cpu"))
    assert prompt_mask.tolist() == [[1] * 6] * 2  # equal-length prompts: no padding
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert ids.tolist() == [tok.convert_tokens_to_ids(list("81")) + [eos, pad], tok.convert_tokens_to_ids(list("100")) + [eos]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_demonstrations_earn_the_reward():
    task = ArithTask()
    assert all(task.reward(p, task.demonstration(p)) == 1.0 for p in task.train[:50])
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    solution = BoxedTask.solution(gsm8k)
    assert solution.endswith("72 clips.\nThe answer is \\boxed{72}.")
    assert BoxedTask.reward(None, Problem("q", BoxedTask.reference(gsm8k), solution), solution) == 1.0
    assert BoxedTask.solution("1,000") == "\\boxed{1000}"


def test_grpo_options_are_rejected_for_other_algorithms():
    with pytest.raises(ValueError, match="train.loss_type.*algorithm rloo"):
        RunConfig(algorithm="rloo", train={"loss_type": "dr_grpo"})
    with pytest.raises(ValueError, match="did you mean"):
        RunConfig(algorithm="rlooo")


RECIPE_METRICS = {
    "rloo": {"loss", "kl", "entropy", "clip_ratio", "grad_norm", "reward/kl_penalised_mean", "frac_reward_zero_std"},
    "dpo": {"loss", "kl", "entropy", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "pairs"},
    "sft": {"loss", "kl", "entropy", "grad_norm", "sft/reference_tokens"},
    "grpo": {"loss", "kl", "entropy", "clip_ratio", "grad_norm", "frac_reward_zero_std"},
}
COMMON = {"reward/mean", "eval/reward", "time/train_s", "throughput/train_tokens_per_s", "memory/peak_gib", "mismatch/k3_kl",
          "mismatch/logratio_abs_p99", "mismatch/seq_out_of_cap_frac"}  # the tails too, in every recipe


@pytest.mark.parametrize("algorithm, train", [
    ("rloo", {}),
    ("dpo", {"beta": 0.1}),
    ("sft", {}),
    ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none", "filter_groups": True, "clip_high": 0.28}),
])
def test_each_recipe_trains_lora_over_nf4(tmp_path, tiny_model, monkeypatch, algorithm, train):
    seen = spy_on_policy(monkeypatch)
    cfg = tiny_run_config(steps=3, **train).model_copy(update={"quant": "nf4", "algorithm": algorithm})
    cfg = RunConfig.model_validate(cfg.model_dump())  # re-validated: the options must be legal for the algorithm
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")

    model, before = seen["model"], seen["at_load"]
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in after if "lora_B" in n), "LoRA B never moved"
    assert all(same(after[n], before[n]) for n in after if "lora_" not in n), "the frozen base changed"

    rows = read_metrics(tmp_path / cfg.run_id)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    logged = set().union(*rows)
    assert RECIPE_METRICS[algorithm] | COMMON <= logged, (RECIPE_METRICS[algorithm] | COMMON) - logged
    assert all(math.isfinite(r["loss"]) for r in rows[1:] if "loss" in r)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_old_logprobs_come_from_the_first_update_not_a_forward_of_their_own(tmp_path, tiny_model, monkeypatch, algorithm):
    """Per step: one reference forward + one per update. Before its first update the trainer is the policy
    that sampled, so that update's forward gives the old log-probs (ratio exactly 1: nothing clipped)."""
    import harness.recipes.grpo as grpo_module
    import harness.recipes.rloo as rloo_module

    module = {"grpo": grpo_module, "rloo": rloo_module}[algorithm]
    calls = []
    original = module.completion_logprobs
    monkeypatch.setattr(module, "completion_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = tiny_run_config(steps=2, updates_per_batch=2, clip_low=0.0001, clip_high=0.0001).model_copy(
        update={"algorithm": algorithm})
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok", summary.get("traceback")
    assert len(calls) == 2 * (1 + 2)
    rows = read_metrics(tmp_path / cfg.run_id)[1:]
    # clip_ratio is the mean over both updates; the first clips nothing however tight the clip range
    assert all(r["clip_ratio"] <= 0.5 + 1e-6 for r in rows)
