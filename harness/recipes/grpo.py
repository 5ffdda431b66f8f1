"""GRPO (Shao et al., 2024, DeepSeekMath) on a quantized base with LoRA.

Per step: sample `prompts_per_step` training prompts, `group_size` completions each; reward
them; advantage = (r - group mean) / (group std + eps); minimise the token-level clipped
surrogate plus beta * k3 KL to the reference; `updates_per_batch` optimizer steps per batch.

Variants, named as TRL and the papers name them (train.*):
- `loss_type`: `dapo` (default) averages over all completion tokens of the batch, so long
  completions are not down-weighted; `grpo` per sequence then over sequences (the paper);
  `dr_grpo` sums over tokens and divides by sequences x max_new_tokens (Dr. GRPO, Liu et al., 2025).
- `scale_rewards`: `group` (the paper), `batch`, or `none` (Dr. GRPO: no std normalisation).
- `clip_high` above `clip_low`: DAPO's clip-higher (Yu et al., 2025).
- `filter_groups`: DAPO's dynamic sampling, reduced to dropping the groups whose rewards are all
  equal (they have zero advantage; only their KL term would remain). DAPO re-samples until the
  batch is full; here the step trains on the groups left, and skips the update when none is.

Where this departs from the paper:
- The reference is the same quantized base with the LoRA adapter disabled, not a separate
  full-precision copy: quantization error is shared by policy and reference, costs no memory,
  and the KL measures only what training moved. (With `trainable: full`, a frozen copy of the
  quantized starting model.)
- The group std is the unbiased sample std (TRL's choice).
- With `train.tis_cap`, each token's surrogate is weighted by min(p_trainer / p_sampler, cap)
  (truncated importance sampling), for rollouts from an engine (vLLM, a quantized rollout
  checkpoint) whose policy differs from the trainer's; the KL term is not reweighted.
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
    setup,
    system_metrics,
    token_count,
)
from harness.recipes.rl_math import (
    aggregate,
    clipped_surrogate,
    completion_logprobs,
    group_advantages,
    k3_kl,
    masked_mean,
    mismatch_metrics,
    tis_weights,
)
from harness.tracking.files import Tracker


def loss(logp, old_logp, ref_logp, advantages, mask, weight, t, max_tokens: int):
    """(GRPO's loss, per-token KL, per-token clipped flags): the clipped surrogate, reweighted by
    `weight` (TIS), plus beta x k3 KL, aggregated by `t.loss_type`."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, t.clip_low, t.clip_high)
    kl = k3_kl(logp, ref_logp)
    return aggregate(weight * surrogate + t.beta * kl, mask, t.loss_type, max_tokens), kl, clipped


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t = cfg.train
    with setup(RunContext(cfg, run_dir, tracker, device, progress)) as s:
        model = s.model
        start = log_start(s)
        for step in range(start + 1, t.steps + 1):
            # --- rollout: sample a group of completions per prompt and score them
            sampled = sample_groups(s)
            batch, rewards = sampled.batch, sampled.rewards

            # --- train: advantages, reference log-probs, clipped surrogate + beta * KL
            s.memory.reset()
            t0 = time.perf_counter()
            advantages, zero_std = group_advantages(rewards, t.group_size, t.scale_rewards)
            mask = batch.completion_mask
            if t.filter_groups:  # the dropped groups' tokens leave the loss and its normalisation
                mask = mask * (~zero_std).repeat_interleave(t.group_size).unsqueeze(1)
            args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, cfg.rollout.temperature)
            with torch.no_grad(), reference(model) as ref:
                ref_logp, _ = completion_logprobs(ref, *args)
            model.train()
            buf = MetricBuffer()
            n_updates = t.updates_per_batch if mask.any() else 0  # every group dropped: no update, not a zero-gradient AdamW step
            old_logp = None
            for _ in range(n_updates):
                logp, entropy = completion_logprobs(model, *args)
                if old_logp is None:  # before its first update the trainer is the policy the engine sampled for, so the
                    old_logp = logp.detach()  # first forward gives old log-probs too: no forward of their own (as TRL)
                    weight = tis_weights(old_logp, batch.sampler_logprobs, t.tis_cap) if t.tis_cap else 1.0
                loss_value, kl, clipped = loss(logp, old_logp, ref_logp, advantages, mask, weight, t, cfg.rollout.max_new_tokens)
                grad_norm = optimizer_step(s, loss_value, t.max_grad_norm)
                buf.add({"loss": loss_value, "grad_norm": grad_norm, "kl": masked_mean(kl, mask),
                         "entropy": masked_mean(entropy, mask), "clip_ratio": masked_mean(clipped.float(), mask)})
            if old_logp is None:  # no update: the sampled tokens scored for the mismatch metrics alone
                with torch.no_grad():
                    old_logp, _ = completion_logprobs(model, *args)
            train = end_train(s, step, t0)

            metrics = buf.means()
            metrics |= system_metrics(s, sampled, train, n_updates * token_count(batch.prompt_mask, batch.completion_mask))
            metrics |= {"frac_reward_zero_std": zero_std.float().mean().item(),
                        **mismatch_metrics(old_logp, batch.sampler_logprobs, batch.completion_mask, t.mismatch_cap)}
            end_step(s, step, metrics, sampled)
        return s.facts
