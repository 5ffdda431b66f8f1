"""Pieces every recipe's loop shares: setup, group sampling, system metrics, end of step."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from harness.models import checkpoint
from harness.models.loading import load_policy
from harness.quant.bnb import quantized_linear_stats
from harness.recipes import NonFinite
from harness.registries import ROLLOUT_ENGINES
from harness.rollout.hf import evaluate
from harness.common.system import PeakMemory, compute_dtype
from harness.tasks import load_task


@dataclass
class Setup:
    task: object
    model: torch.nn.Module
    tokenizer: object
    engine: object
    params: list
    optimizer: torch.optim.Optimizer
    rng: random.Random  # picks the prompts; checkpointed so a resume continues the stream
    memory: PeakMemory
    dtype: torch.dtype
    facts: dict  # what summary.json records about the model and the rollout engine

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.engine.close()  # a vLLM server must not outlive its run, whatever ended it


def setup(cfg, device: torch.device, run_dir) -> Setup:
    """The policy, then its rollout engine: the trainer is built first because bitsandbytes
    quantizes while loading, and loading it after vLLM took the GPU is known to crash."""
    torch.manual_seed(cfg.seed)
    dtype = compute_dtype(device, cfg.train.dtype)
    model, tokenizer = load_policy(cfg, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    facts = {
        "compute_dtype": str(dtype).removeprefix("torch."),
        "model_footprint_bytes": model.get_memory_footprint(),
        "trainable_params": sum(p.numel() for p in params),
        **quantized_linear_stats(model),
    }
    task = load_task(cfg.task)
    engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(model, tokenizer, cfg, device, run_dir)
    return Setup(task, model, tokenizer, engine, params, torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0),
                 random.Random(cfg.seed), PeakMemory(device), dtype, facts | engine.facts)


def sample_groups(s: Setup, cfg, device):
    """`prompts_per_step` training prompts, `group_size` completions each, scored by the task; then
    the engine hands the device back to the trainer. Returns (problems repeated per completion,
    the Rollout, rewards, seconds, peak GiB); the seconds are generation alone: waking the engine
    and syncing the trainer's weights into it are timed apart (time/wake_s, time/sync_s)."""
    s.engine.sync()
    s.memory.reset()
    t0 = time.perf_counter()
    problems = s.rng.sample(s.task.train, cfg.train.prompts_per_step)
    grouped = [p for p in problems for _ in range(cfg.train.group_size)]
    batch = s.engine.generate([p.prompt for p in grouped])
    rewards = torch.tensor([s.task.reward(p, text) for p, text in zip(grouped, batch.texts)], device=device)
    rollout_s, peak = time.perf_counter() - t0, s.memory.peak_gib()
    s.engine.release()
    return grouped, batch, rewards, rollout_s, peak


def system_metrics(s: Setup, batch, n_rollouts: int, rewards, rollout: tuple[float, float], train: tuple[float, float], trained_tokens: int) -> dict:
    """Reward, timing, throughput and memory of one step; the engine's own (sync, sleep, wake) included.
    trained_tokens: prompt and completion tokens through the trainer's forward and backward, all updates."""
    (rollout_s, rollout_peak), (train_s, train_peak) = rollout, train
    n_tokens = batch.completion_mask.sum().item()
    engine = s.engine.pop_metrics()
    return engine | {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "completion_length": n_tokens / n_rollouts,
        "time/rollout_s": rollout_s,
        "time/train_s": train_s,
        "throughput/rollout_tokens_per_s": n_tokens / rollout_s,
        "throughput/train_tokens_per_s": trained_tokens / train_s,
        "memory/rollout_peak_gib": rollout_peak,
        "memory/train_peak_gib": train_peak,
        "memory/peak_gib": max(rollout_peak, train_peak),
    }


def token_count(prompt_mask, completion_mask) -> int:
    return int(prompt_mask.sum().item() + completion_mask.sum().item())


def end_train(s: Setup, cfg, device, step: int, t0: float) -> tuple[float, float]:
    """After a step's updates: re-calibrate ModelOpt's amax when due; (train seconds, train peak GiB)."""
    if cfg.modelopt.recalibrate_every:
        from harness.quant.modelopt import recalibrate_if_due

        recalibrate_if_due(s.model, cfg, device, step)
    return time.perf_counter() - t0, s.memory.peak_gib()


def log_start(s: Setup, run_dir, tracker) -> int:
    """Resume from the last checkpoint if there is one; else log the step-0 evaluation. The start step."""
    start = checkpoint.restore(run_dir, s.model, s.optimizer, s.rng)
    if start == 0:
        tracker.log({"eval/reward": evaluate(s.engine, s.task, s.task.eval), "eval/n": len(s.task.eval)}, step=0)
    return start


def end_step(s: Setup, cfg, run_dir, tracker, progress, step: int, metrics: dict, grouped, batch, rewards) -> None:
    """Stop on non-finite numbers; evaluate, log, keep samples, checkpoint, report progress."""
    t = cfg.train
    if not all(x == x and abs(x) != float("inf") for x in metrics.values()):
        tracker.log(metrics, step)
        bad = sorted(k for k, v in metrics.items() if not (v == v and abs(v) != float("inf")))
        raise NonFinite(f"non-finite {', '.join(bad)} at step {step}")
    if step % t.eval_every == 0 or step == t.steps:
        metrics |= {"eval/reward": evaluate(s.engine, s.task, s.task.eval), "eval/n": len(s.task.eval)}  # n: the eval's binomial error
    tracker.log(metrics, step)
    if step in (1, t.steps):  # what the model wrote at the start and at the end, one per prompt
        picks = range(0, min(len(grouped), 4 * t.group_size), t.group_size)
        tracker.log_samples([{"prompt": grouped[i].prompt, "completion": batch.texts[i], "reward": rewards[i].item()} for i in picks], step)
    if step % t.checkpoint_every == 0 or step == t.steps:
        checkpoint.save(run_dir, s.model, s.optimizer, s.rng, step)
    progress(step=step, total=t.steps, reward=metrics["reward/mean"], eval=metrics.get("eval/reward"))


def optimizer_step(s: Setup, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Backward, clip, step; the step is skipped when the loss or gradient is not finite."""
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, max_grad_norm)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        s.optimizer.step()
    return grad_norm
