"""DPO (Rafailov et al., 2023) on on-policy pairs, on a quantized base with LoRA.

Per step: sample `prompts_per_step` prompts x `group_size` completions and reward them; per group,
the best completion (chosen) and the worst (rejected) make a pair, and a group whose rewards are
all equal makes none (counted in `frac_reward_zero_std`); minimise the DPO loss
-log sigmoid(beta (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))) averaged over the pairs,
`updates_per_batch` optimizer steps per batch. `train.beta` is DPO's beta.

Logged as TRL's DPOTrainer names them: `rewards/chosen`, `rewards/rejected` (the implicit rewards
beta log pi/pi_ref), `rewards/margins` (their difference) and `rewards/accuracies` (the share of
pairs whose chosen completion has the larger implicit reward: pair accuracy).

Where this departs from the paper:
- Pairs come from the policy's own samples, ranked by the task's reward (online / on-policy DPO,
  as in Guo et al., 2024), not from a fixed preference dataset; each batch is fresh.
- The reference is the quantized base with the adapter disabled, as in the grpo recipe.
- Log-probs are taken at the sampling temperature, as in every recipe here, so the policy DPO
  moves is the one that samples.
- `kl` (the per-token k3 estimate against the reference) and `entropy` are over the pairs'
  tokens, for the verdict's kl_max and entropy floor; neither enters the loss.
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
    best_worst_pairs,
    completion_logprobs,
    dpo_loss,
    k3_kl,
    masked_mean,
    sampler_mismatch,
    sequence_logprob,
)
from harness.tracking.files import Tracker


def loss(logp, ref_logp, mask, n_pairs: int, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's loss over [chosen..., rejected...] stacked (n_pairs each), and its logged metrics."""
    seq, ref_seq = sequence_logprob(logp, mask), sequence_logprob(ref_logp, mask)
    per_pair, chosen, rejected = dpo_loss(seq[:n_pairs], seq[n_pairs:], ref_seq[:n_pairs], ref_seq[n_pairs:], beta)
    return per_pair.mean(), {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                             "rewards/margins": (chosen - rejected).mean(),
                             "rewards/accuracies": (chosen > rejected).float().mean()}


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t, truncation = cfg.train, sampler_truncation(cfg)
    with setup(RunContext(cfg, run_dir, tracker, device, progress)) as s:
        model = s.model
        start = log_start(s)
        for step in range(start + 1, t.steps + 1):
            # --- rollout: sample a group of completions per prompt and score them
            sampled = sample_groups(s)
            batch, rewards = sampled.batch, sampled.rewards

            # --- train: best and worst completion of each group as a pair, DPO loss against the reference
            s.memory.reset()
            t0 = time.perf_counter()
            chosen, rejected = best_worst_pairs(rewards, t.group_size)
            n_pairs, pick = len(chosen), torch.cat([chosen, rejected])
            mask = batch.completion_mask[pick]
            args = (batch.prompt_ids[pick], batch.prompt_mask[pick], batch.completion_ids[pick], mask, cfg.rollout.temperature)
            buf = MetricBuffer()
            mismatch = {}
            if n_pairs:
                with torch.no_grad(), reference(model) as ref:
                    ref_logp, _ = completion_logprobs(ref, *args, with_entropy=False)
                model.train()
                for _ in range(t.updates_per_batch):
                    # before the first update the trainer is the policy the engine sampled for: its side of the
                    # ratio under the sampler's truncation (common.sampler_truncation)
                    logp, entropy, *truncated = completion_logprobs(model, *args, truncation=None if mismatch else truncation)
                    mismatch = mismatch or sampler_mismatch((truncated[0] if truncated else logp).detach(),
                                                            batch.sampler_logprobs[pick], mask, t.mismatch_cap)
                    loss_value, logged = loss(logp, ref_logp, mask, n_pairs, t.beta)
                    grad_norm = optimizer_step(s, loss_value, t.max_grad_norm)
                    buf.add(logged | {"loss": loss_value, "grad_norm": grad_norm, "kl": masked_mean(k3_kl(logp, ref_logp), mask),
                                      "entropy": masked_mean(entropy, mask)})
            train = end_train(s, step, t0)

            metrics = buf.means() | mismatch
            metrics |= system_metrics(s, sampled, train, (t.updates_per_batch if n_pairs else 0) * token_count(args[1], mask))
            metrics |= {"frac_reward_zero_std": 1 - n_pairs / t.prompts_per_step, "pairs": n_pairs}
            end_step(s, step, metrics, sampled)
        return s.facts
