"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al., 2024, "Back to Basics") on a
quantized base with LoRA.

Per step: sample `prompts_per_step` prompts x `group_size` completions and reward them; fold the
KL penalty into each completion's reward, r' = r - beta * sum_t (log pi_old - log pi_ref), as the
paper does; advantage = r' minus the mean r' of the other completions of its group; minimise
-advantage x log pi(completion), the whole completion being one action.

Where this departs from the paper:
- The log-prob term is PPO's clipped ratio per token (`clip_low`, `clip_high`), summed over the
  completion's tokens: with `updates_per_batch: 1` the ratio is 1 and its gradient is exactly
  REINFORCE's (advantage x grad of the sequence log-prob); later updates on the same batch stay
  near the sampling policy, as TRL's RLOO does.
- The reference is the quantized base with the adapter disabled, as in the grpo recipe.
- `kl` is logged as the per-token k3 estimate under the current policy, the same number grpo logs,
  so the verdict's kl_max means one thing across algorithms; the penalty uses the sequence k1 sum.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.config.run import RunConfig
from harness.models.loading import reference
from harness.recipes.common import (
    MetricBuffer,
    RunContext,
    end_step,
    end_train,
    log_start,
    optimizer_step,
    sample_groups,
    sampler_truncation,
    setup,
    system_metrics,
    token_count,
)
from harness.recipes.rl_math import (
    clipped_surrogate,
    completion_logprobs,
    k3_kl,
    loo_advantages,
    masked_mean,
    sampler_mismatch,
    sequence_logprob,
    zero_std_groups,
)
from harness.tracking.files import Tracker


def advantages(rewards, old_logp, ref_logp, mask, beta: float, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leave-one-out advantages of the KL-penalised rewards, those rewards)."""
    penalised = rewards - beta * sequence_logprob(old_logp - ref_logp, mask)
    return loo_advantages(penalised, group_size), penalised


def loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float):
    """(mean over completions of the clipped surrogate summed over each completion's tokens, clipped flags)."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    return sequence_logprob(surrogate, mask).mean(), clipped


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t, truncation = cfg.train, sampler_truncation(cfg)
    with setup(RunContext(cfg, run_dir, tracker, device, progress)) as s:
        model = s.model
        start = log_start(s)
        for step in range(start + 1, t.steps + 1):
            # --- rollout: sample a group of completions per prompt and score them
            sampled = sample_groups(s)
            batch, rewards = sampled.batch, sampled.rewards

            # --- train: KL-penalised rewards, leave-one-out advantages, REINFORCE on whole completions
            s.memory.reset()
            t0 = time.perf_counter()
            mask = batch.completion_mask
            args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.rollout.temperature)
            with torch.no_grad(), reference(model) as ref:
                ref_logp, _ = completion_logprobs(ref, *args, with_entropy=False)
            model.train()
            buf = MetricBuffer()
            old_logp = None
            for _ in range(t.updates_per_batch):
                first = old_logp is None
                logp, entropy, *sampled_logp = completion_logprobs(model, *args, truncation=truncation if first else None)
                if first:  # the first forward is the sampling policy's: old log-probs without a forward of their own
                    old_logp = logp.detach()
                    old_sampled = sampled_logp[0].detach() if sampled_logp else old_logp  # under the sampler's truncation
                    adv, penalised = advantages(rewards, old_logp, ref_logp, mask, t.beta, t.group_size)
                loss_value, clipped = loss(logp, old_logp, adv, mask, t.clip_low, t.clip_high)
                grad_norm = optimizer_step(s, loss_value, t.max_grad_norm)
                buf.add({"loss": loss_value, "grad_norm": grad_norm, "kl": masked_mean(k3_kl(logp, ref_logp), mask),
                         "entropy": masked_mean(entropy, mask), "clip_ratio": masked_mean(clipped.float(), mask)})
            train = end_train(s, step, t0)

            metrics = buf.means()
            metrics |= system_metrics(s, sampled, train, t.updates_per_batch * token_count(batch.prompt_mask, mask))
            metrics |= {"frac_reward_zero_std": zero_std_groups(rewards, t.group_size).float().mean().item(),
                        "reward/kl_penalised_mean": penalised.mean().item(),
                        **sampler_mismatch(old_sampled, batch.sampler_logprobs, mask, t.mismatch_cap)}
            end_step(s, step, metrics, sampled)
        return s.facts
