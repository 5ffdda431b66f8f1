"""SFT: supervised fine-tuning on the task's reference answers, the baseline every algorithm
table needs (does RL beat imitating the answers, under the same quantization?).

Per step: `prompts_per_step` training prompts; the loss is the cross-entropy of each prompt's
reference completion (the task's demonstration, then end-of-sequence), averaged over the
reference tokens of the batch; `updates_per_batch` optimizer steps per batch.

Where this departs from a plain SFT loop:
- The policy still samples `group_size` completions of the same prompts each step, only to
  measure: `reward/mean`, `kl` (k3 against the adapter-disabled base) and `entropy` are then the
  same estimators on the policy's own samples as in the RL recipes, so the verdict's thresholds
  mean one thing across the algorithm axis. None of it enters the loss. On a large model this
  rollout is most of an SFT step (`time/rollout_s` shows it).
- Prompts are drawn with replacement across steps from the training split (as the RL recipes
  draw them), not in epochs.
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
from harness.recipes.rl_math import completion_logprobs, k3_kl, masked_mean, sampler_mismatch, zero_std_groups
from harness.rollout.hf import encode_prompts, pad_completions
from harness.tracking.files import Tracker


def loss(logp, mask) -> torch.Tensor:
    """Cross-entropy of the reference tokens: mean negative log-prob over the unmasked positions."""
    return masked_mean(-logp, mask)


def reference_batch(tokenizer, task, problems, device):
    """(prompt ids, prompt mask, completion ids, completion mask): each prompt with its reference
    completion and end-of-sequence, laid out as a rollout is (prompts left-padded, completions right)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [p.prompt for p in problems], device)
    demos = tokenizer([task.demonstration(p) for p in problems], add_special_tokens=False)["input_ids"]
    ids, mask, _ = pad_completions([d + [tokenizer.eos_token_id] for d in demos], None, tokenizer.pad_token_id, device)
    return prompt_ids, prompt_mask, ids, mask


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t = cfg.train
    with setup(RunContext(cfg, run_dir, tracker, device, progress)) as s:
        model = s.model
        start = log_start(s)
        for step in range(start + 1, t.steps + 1):
            # --- rollout, to measure only: the policy's samples of this step's prompts, rewarded
            sampled = sample_groups(s)
            batch, rewards = sampled.batch, sampled.rewards

            args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, cfg.rollout.temperature)
            with torch.no_grad():  # measured apart from time/train_s, which is the SFT update alone
                old_logp, entropy, *sampled_logp = completion_logprobs(model, *args, truncation=sampler_truncation(cfg))
                with reference(model) as ref:
                    ref_logp, _ = completion_logprobs(ref, *args, with_entropy=False)

            # --- train: cross-entropy of the reference answers of the same prompts
            s.memory.reset()
            t0 = time.perf_counter()
            refs = reference_batch(s.tokenizer, s.task, sampled.problems[:: t.group_size], device)
            model.train()
            buf = MetricBuffer()
            for _ in range(t.updates_per_batch):
                # the model itself (temperature 1) imitates the answers
                logp, _ = completion_logprobs(model, *refs, with_entropy=False)
                loss_value = loss(logp, refs[3])
                grad_norm = optimizer_step(s, loss_value, t.max_grad_norm)
                buf.add({"loss": loss_value, "grad_norm": grad_norm})
            train = end_train(s, step, t0)

            mask = batch.completion_mask
            metrics = buf.means()
            # the policy's samples before this step's update: the same kl and entropy as the RL recipes log
            metrics |= {"kl": masked_mean(k3_kl(old_logp, ref_logp), mask).item(), "entropy": masked_mean(entropy, mask).item(),
                        "frac_reward_zero_std": zero_std_groups(rewards, t.group_size).float().mean().item(),
                        "sft/reference_tokens": refs[3].sum().item(),
                        **sampler_mismatch(sampled_logp[0] if sampled_logp else old_logp, batch.sampler_logprobs, mask,
                                           t.mismatch_cap)}
            metrics |= system_metrics(s, sampled, train, t.updates_per_batch * token_count(refs[1], refs[3]))
            end_step(s, step, metrics, sampled)
        return s.facts
