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
- With `train.tis_cap`, each token's surrogate is weighted by an importance-sampling weight
  (`train.is_mode`, as TRL's vllm_importance_sampling_mode: the token's or its sequence's
  p_trainer / p_sampler, truncated to or masked outside [is_cap_min, tis_cap]), for rollouts from
  an engine (vLLM, a quantized rollout checkpoint) whose policy differs from the trainer's; the KL
  term is not reweighted.
- With top-k or top-p sampling (rollout.top_k, rollout.top_p) the engine's log-probs are of the
  truncated, renormalised distribution: the ratio in the IS weights and the mismatch/* metrics
  compares them with the trainer's log-prob under the same truncation of its own logits
  (rl_math.truncated_logprobs), not its full distribution's, which would bias it low. The policy
  loss keeps the full distribution's log-probs.
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
    apply_gradients,
    end_step,
    end_train,
    log_start,
    sample_groups,
    sampler_truncation,
    setup,
    system_metrics,
    token_count,
)
from harness.recipes.rl_math import (
    aggregate,
    clipped_surrogate,
    completion_logprobs,
    group_advantages,
    is_weight_metrics,
    is_weights,
    k3_kl,
    mismatch_metrics,
    mismatch_tails,
)
from harness.tracking.files import Tracker


def loss(logp, old_logp, ref_logp, advantages, mask, weight, t, max_tokens: int, batch_mask=None):
    """(GRPO's loss, per-token KL, per-token clipped flags): the clipped surrogate, reweighted by
    `weight` (TIS), plus beta x k3 KL, aggregated by `t.loss_type` (over `batch_mask`'s counts for a micro-batch)."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, t.clip_low, t.clip_high)
    kl = k3_kl(logp, ref_logp)
    return aggregate(weight * surrogate + t.beta * kl, mask, t.loss_type, max_tokens, batch_mask), kl, clipped


def micro_batches(n: int, size: int | None) -> list[slice]:
    """The rows of each forward/backward: `size` completions at a time (the last part may be shorter), all at once
    for None."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rows(args: tuple, part: slice) -> tuple:
    """completion_logprobs' arguments for the batch rows in `part` (the temperature, last, as it is), without the
    columns that are padding in every one of those rows: left padding of the prompts, right padding of the
    completions. A part of short sequences then costs what they hold, not the batch's longest."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = (a[part] for a in args[:-1])
    first = int(prompt_mask.any(0).long().argmax()) if prompt_mask.any() else 0
    used = completion_mask.any(0).nonzero()
    end = int(used[-1]) + 1 if len(used) else 1
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :end], completion_mask[:, :end], args[-1]


def part_logprobs(model, args: tuple, part: slice, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """completion_logprobs of the rows in `part`, padded back to the batch's completion width with zeros (masked
    positions, which no loss or metric reads)."""
    return part_scores(model, args, part, with_entropy=with_entropy)[:2]


def part_scores(model, args: tuple, part: slice, truncation: tuple[int, float] | None = None, with_entropy: bool = True):
    """part_logprobs, and the same forward's log-probs under `truncation` (top_k, top_p; rl_math.truncated_logprobs),
    padded likewise; None without one."""
    logp, entropy, *sampled = completion_logprobs(model, *rows(args, part), truncation=truncation,
                                                  with_entropy=with_entropy)
    sampled = sampled[0] if sampled else None
    width = args[2].shape[1] - logp.shape[1]

    def pad(x):
        return torch.nn.functional.pad(x, (0, width)) if x is not None else None

    return pad(logp), pad(entropy), pad(sampled)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x.detach(), 0.0).sum()  # masked_mean's numerator: a part's share of a batch mean


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t, truncation = cfg.train, sampler_truncation(cfg)
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
            # micro-batches: the step's logits and activations exist for one part at a time; the gradient of the
            # parts' losses (each divided by the whole batch's counts) is the whole batch's
            parts = micro_batches(len(rewards), t.micro_batch_size)
            with torch.no_grad(), reference(model) as ref:
                ref_logp = torch.cat([part_logprobs(ref, args, p, with_entropy=False)[0] for p in parts])
            model.train()
            buf = MetricBuffer()
            n_updates = t.updates_per_batch if mask.any() else 0  # every group dropped: no update, not a zero-gradient AdamW step
            n_tokens = mask.to(ref_logp.dtype).sum().clamp(min=1)
            old_logp = old_sampled = None  # old_sampled: the old log-probs under the sampler's truncation
            for _ in range(n_updates):
                s.optimizer.zero_grad(set_to_none=True)
                first, olds, loss_value, sums = old_logp is None, [], 0.0, torch.zeros(3, device=ref_logp.device)
                for p in parts:
                    logp, entropy, sampled_logp = part_scores(model, args, p, truncation if first else None)
                    # before its first update the trainer is the policy the engine sampled for, so the first
                    # forward gives old log-probs too: no forward of their own (as TRL)
                    old = logp.detach() if first else old_logp[p]
                    if first:
                        olds.append((old, sampled_logp if sampled_logp is not None else old))
                    old_s = olds[-1][1] if first else old_sampled[p]
                    weight = is_weights(old_s, batch.sampler_logprobs[p], batch.completion_mask[p], t.is_mode, t.tis_cap,
                                        t.is_cap_min) if t.tis_cap else 1.0
                    part_loss, kl, clipped = loss(logp, old, ref_logp[p], advantages[p], mask[p], weight, t,
                                                  cfg.rollout.max_new_tokens, mask)
                    part_loss.backward()
                    loss_value = loss_value + part_loss.detach()
                    sums += torch.stack([masked_sum(kl, mask[p]), masked_sum(entropy, mask[p]),
                                         masked_sum(clipped.float(), mask[p])])
                    del logp, entropy, part_loss, kl, clipped  # this part's logits go before the next part's forward
                if first:
                    old_logp, old_sampled = (torch.cat(x) for x in zip(*olds))
                grad_norm = apply_gradients(s, loss_value, t.max_grad_norm)
                kl_mean, entropy_mean, clip_mean = sums / n_tokens
                buf.add({"loss": loss_value, "grad_norm": grad_norm, "kl": kl_mean, "entropy": entropy_mean,
                         "clip_ratio": clip_mean})
            if old_logp is None:  # no update: the sampled tokens scored for the mismatch metrics alone
                with torch.no_grad():
                    scored = [part_scores(model, args, p, truncation, with_entropy=False) for p in parts]
                old_logp = torch.cat([x[0] for x in scored])
                old_sampled = torch.cat([x[2] if x[2] is not None else x[0] for x in scored])
                del scored
            train = end_train(s, step, t0)

            metrics = buf.means()
            metrics |= system_metrics(s, sampled, train, n_updates * token_count(batch.prompt_mask, batch.completion_mask))
            metrics |= {"frac_reward_zero_std": zero_std.float().mean().item(),
                        **mismatch_metrics(old_sampled, batch.sampler_logprobs, batch.completion_mask, t.mismatch_cap),
                        **mismatch_tails(old_sampled, batch.sampler_logprobs, batch.completion_mask, t.mismatch_cap)}
            if t.tis_cap:  # the whole batch's weights, as its parts' were (a sequence's ratio is its row's)
                metrics |= is_weight_metrics(is_weights(old_sampled, batch.sampler_logprobs, batch.completion_mask,
                                                        t.is_mode, t.tis_cap, t.is_cap_min), batch.completion_mask)
            end_step(s, step, metrics, sampled)
        return s.facts
