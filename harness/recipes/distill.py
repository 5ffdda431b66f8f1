"""On-policy distillation (Agarwal et al., 2024, GKD; NeMo RL's QA-Distillation) of a quantized
student into a BF16 teacher.

Per step: the quantized student samples `prompts_per_step` prompts x `group_size` completions;
the loss is the per-token reverse KL, KL(student || teacher), at every completion position,
averaged over the completion tokens of the batch. The task's reward is measured on the same
samples and held-out, but never enters the loss.

Where this departs from the papers:
- The reverse KL is computed exactly over the whole vocabulary at each sampled position, not
  estimated from the sampled token (k1/k3): exact is unbiased with no sampling variance, and the
  vocabulary is small enough to afford it; for large vocabularies a top-k or sampled estimator
  would replace it.
- The teacher is the unquantized checkpoint in the compute dtype (the same checkpoint as the
  student unless `teacher:` names another), so the distillation target is exactly what
  quantization lost; with `quant: bf16` the student starts equal to the teacher and has
  nothing to learn, which makes that cell a control.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.config.run import RunConfig
from harness.models.loading import load_model, resolve
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
    completion_logits,
    masked_mean,
    reverse_kl,
    sampler_mismatch,
    token_logprobs_and_entropy,
    truncated_logprobs,
)
from harness.tracking.files import Tracker


def run(cfg: RunConfig, run_dir: Path, tracker: Tracker, device: torch.device, progress=lambda **kw: None) -> dict:
    t, truncation = cfg.train, sampler_truncation(cfg)
    with setup(RunContext(cfg, run_dir, tracker, device, progress)) as s:
        teacher = load_model(resolve(cfg.teacher or cfg.model), device, s.dtype)  # a shape: the student's random weights
        teacher.requires_grad_(False).eval()
        start = log_start(s)
        for step in range(start + 1, t.steps + 1):
            # --- rollout: the quantized student samples; the reward is only measured
            sampled = sample_groups(s)
            batch = sampled.batch

            # --- train: reverse KL to the teacher at every completion position
            s.memory.reset()
            t0 = time.perf_counter()
            mask = batch.completion_mask
            args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, cfg.rollout.temperature)
            with torch.no_grad():
                teacher_logits = completion_logits(teacher, *args)
            s.model.train()
            buf = MetricBuffer()
            mismatch = {}
            for _ in range(t.updates_per_batch):
                student_logits = completion_logits(s.model, *args)
                kl = masked_mean(reverse_kl(student_logits, teacher_logits), mask)
                logp, entropy = token_logprobs_and_entropy(student_logits.detach(), batch.completion_ids)
                # before the first update the student is the policy the engine sampled for: its side of the ratio
                # under the sampler's truncation (common.sampler_truncation)
                if not mismatch:
                    sampler_side = logp if truncation is None else \
                        truncated_logprobs(student_logits.detach(), batch.completion_ids, *truncation)
                    mismatch = sampler_mismatch(sampler_side, batch.sampler_logprobs, mask, t.mismatch_cap)
                grad_norm = optimizer_step(s, kl, t.max_grad_norm)
                buf.add({"loss": kl, "kl": kl, "grad_norm": grad_norm, "entropy": masked_mean(entropy, mask)})
            train = end_train(s, step, t0)

            metrics = buf.means() | mismatch
            metrics |= system_metrics(s, sampled, train, t.updates_per_batch * token_count(batch.prompt_mask, mask))
            end_step(s, step, metrics, sampled)
        return s.facts
