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
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from harness import checkpoint
from harness.config import RunConfig
from harness.models import load_policy, reference
from harness.quant import quantized_linear_stats
from harness.recipes import NonFinite
from harness.registries import COLOCATION
from harness.rl_math import clipped_surrogate, completion_logprobs, group_advantages, k3_kl, masked_mean, mismatch_metrics
from harness.rollout import evaluate
from harness.system import PeakMemory, compute_dtype
from harness.tasks import load_task


def run(cfg: RunConfig, run_dir: Path, tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t = cfg.train
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # picks the prompts; checkpointed so a resume continues the stream
    dtype = compute_dtype(device)
    task = load_task(cfg.task)
    model, tokenizer = load_policy(cfg, device, dtype)
    engine = COLOCATION.get(cfg.rollout.colocation)(model, tokenizer, cfg.rollout)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    memory = PeakMemory(device)
    facts = {
        "compute_dtype": str(dtype).removeprefix("torch."),
        "model_footprint_bytes": model.get_memory_footprint(),
        "trainable_params": sum(p.numel() for p in params),
        **quantized_linear_stats(model),
    }

    start = checkpoint.restore(run_dir, model, optimizer, rng)
    if start == 0:
        tracker.log({"eval/reward": evaluate(engine, task, task.eval)}, step=0)
    for step in range(start + 1, t.steps + 1):
        # --- rollout: sample a group of completions per prompt and score them
        memory.reset()
        t0 = time.perf_counter()
        problems = rng.sample(task.train, t.prompts_per_step)
        grouped = [p for p in problems for _ in range(t.group_size)]
        batch = engine.generate([p.prompt for p in grouped])
        rewards = torch.tensor([task.reward(p, text) for p, text in zip(grouped, batch.texts)], device=device)
        rollout_s, rollout_peak = time.perf_counter() - t0, memory.peak_gib()

        # --- train: advantages, reference log-probs, clipped surrogate + beta * KL
        memory.reset()
        t0 = time.perf_counter()
        advantages, zero_std = group_advantages(rewards, t.group_size)
        mask = batch.completion_mask
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.rollout.temperature)
        with torch.no_grad():
            old_logp, _ = completion_logprobs(model, *args)
            with reference(model) as ref:
                ref_logp, _ = completion_logprobs(ref, *args)
        model.train()
        buf: dict[str, list[float]] = {}
        for _ in range(t.updates_per_batch):
            logp, entropy = completion_logprobs(model, *args)
            surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, t.clip_low, t.clip_high)
            kl = k3_kl(logp, ref_logp)
            loss = masked_mean(surrogate + t.beta * kl, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            for name, value in (("loss", loss), ("grad_norm", grad_norm), ("kl", masked_mean(kl, mask)),
                                ("entropy", masked_mean(entropy, mask)), ("clip_ratio", masked_mean(clipped.float(), mask))):
                buf.setdefault(name, []).append(value.item())
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                break
            optimizer.step()
        if cfg.modelopt.recalibrate_every:
            from harness.quant_modelopt import recalibrate_if_due

            recalibrate_if_due(model, cfg, device, step)
        train_s, train_peak = time.perf_counter() - t0, memory.peak_gib()

        n_tokens = mask.sum().item()
        metrics = {name: sum(v) / len(v) for name, v in buf.items()} | {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item(),
            "frac_reward_zero_std": zero_std.float().mean().item(),
            "completion_length": n_tokens / len(grouped),
            "time/rollout_s": rollout_s,
            "time/train_s": train_s,
            "time/sync_s": 0.0,  # in_process: the trained weights are the generating weights
            "throughput/rollout_tokens_per_s": n_tokens / rollout_s,
            "throughput/train_tokens_per_s": (n_tokens + batch.prompt_mask.sum().item()) * t.updates_per_batch / train_s,
            "memory/rollout_peak_gib": rollout_peak,
            "memory/train_peak_gib": train_peak,
            "memory/peak_gib": max(rollout_peak, train_peak),
            **mismatch_metrics(old_logp, batch.sampler_logprobs, mask),
        }
        if not all(map(_finite, metrics.values())):
            tracker.log(metrics, step)
            bad = sorted(k for k, v in metrics.items() if not _finite(v))
            raise NonFinite(f"non-finite {', '.join(bad)} at step {step}")
        if step % t.eval_every == 0 or step == t.steps:
            metrics["eval/reward"] = evaluate(engine, task, task.eval)
        tracker.log(metrics, step)
        if step in (1, t.steps):  # what the model wrote at the start and at the end, one per prompt
            picks = range(0, min(len(grouped), 4 * t.group_size), t.group_size)
            tracker.log_samples([{"prompt": grouped[i].prompt, "completion": batch.texts[i], "reward": rewards[i].item()} for i in picks], step)
        if step % t.checkpoint_every == 0 or step == t.steps:
            checkpoint.save(run_dir, model, optimizer, rng, step)
        progress(step=step, total=t.steps, reward=metrics["reward/mean"], eval=metrics.get("eval/reward"))
    return facts


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
