"""GRPO (Shao et al., 2024, DeepSeekMath) on a quantized base with LoRA.

Per step: sample `prompts_per_step` training prompts, `group_size` completions each; reward
them; advantage = (r - group mean) / (group std + eps); minimise the token-level clipped
surrogate plus beta * k3 KL to the reference; `updates_per_batch` optimizer steps per batch.

Where this departs from the paper:
- The loss is averaged over all completion tokens of the batch (as DAPO and TRL's "dapo" loss),
  not per sequence then over sequences, so long completions are not down-weighted.
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

from harness.config import RunConfig
from harness.models import reference
from harness.recipes.common import end_step, log_start, optimizer_step, sample_groups, setup, system_metrics
from harness.rl_math import clipped_surrogate, completion_logprobs, group_advantages, k3_kl, masked_mean, mismatch_metrics, tis_weights


def run(cfg: RunConfig, run_dir: Path, tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t = cfg.train
    with setup(cfg, device, run_dir) as s:
        model = s.model
        start = log_start(s, run_dir, tracker)
        for step in range(start + 1, t.steps + 1):
            # --- rollout: sample a group of completions per prompt and score them
            grouped, batch, rewards, rollout_s, rollout_peak = sample_groups(s, cfg, device)

            # --- train: advantages, reference log-probs, clipped surrogate + beta * KL
            s.memory.reset()
            t0 = time.perf_counter()
            advantages, zero_std = group_advantages(rewards, t.group_size)
            mask = batch.completion_mask
            args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.rollout.temperature)
            with torch.no_grad():
                old_logp, _ = completion_logprobs(model, *args)  # the trainer's policy that the engine sampled for
                with reference(model) as ref:
                    ref_logp, _ = completion_logprobs(ref, *args)
            weight = tis_weights(old_logp, batch.sampler_logprobs, t.tis_cap) if t.tis_cap else 1.0
            model.train()
            buf: dict[str, list[float]] = {}
            for _ in range(t.updates_per_batch):
                logp, entropy = completion_logprobs(model, *args)
                surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, t.clip_low, t.clip_high)
                kl = k3_kl(logp, ref_logp)
                loss = masked_mean(weight * surrogate + t.beta * kl, mask)
                grad_norm = optimizer_step(s, loss, t.max_grad_norm)
                for name, value in (("loss", loss), ("grad_norm", grad_norm), ("kl", masked_mean(kl, mask)),
                                    ("entropy", masked_mean(entropy, mask)), ("clip_ratio", masked_mean(clipped.float(), mask))):
                    buf.setdefault(name, []).append(value.item())
            if cfg.modelopt.recalibrate_every:
                from harness.quant_modelopt import recalibrate_if_due

                recalibrate_if_due(model, cfg, device, step)
            train = (time.perf_counter() - t0, s.memory.peak_gib())

            metrics = {name: sum(v) / len(v) for name, v in buf.items()}
            metrics |= system_metrics(s, batch, len(grouped), rewards, (rollout_s, rollout_peak), train, t.updates_per_batch)
            metrics |= {"frac_reward_zero_std": zero_std.float().mean().item(),
                        **mismatch_metrics(old_logp, batch.sampler_logprobs, mask, t.mismatch_cap)}
            end_step(s, cfg, run_dir, tracker, progress, step, metrics, grouped, batch, rewards)
        return s.facts
