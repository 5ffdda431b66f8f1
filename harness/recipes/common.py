"""Pieces every recipe's loop shares: setup, group sampling, system metrics, end of step.

Functions and small dataclasses rather than a trainer base class, so that each recipe stays one
file that reads top to bottom, calling these where its loop needs them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from harness.chat import ChatTask, model_task
from harness.common.system import PeakMemory, compute_dtype
from harness.config.run import RunConfig
from harness.evals.passk import eval_seed
from harness.models import checkpoint
from harness.models.loading import load_policy
from harness.quant.bnb import quantized_linear_stats
from harness.recipes import NonFinite
from harness.registries import ROLLOUT_ENGINES
from harness.rollout.base import RolloutEngine
from harness.rollout.hf import Rollout, held_out_metrics
from harness.task_base import Task
from harness.tasks import Problem
from harness.tracking.files import Tracker


@dataclass(frozen=True)
class RunContext:
    """What the caller hands a recipe's `run`, carried on its Setup so that the shared pieces below
    take the Setup alone instead of these five threaded through every call."""

    cfg: RunConfig
    run_dir: Path
    tracker: Tracker
    device: torch.device
    progress: Callable[..., None]


@dataclass
class Setup:
    ctx: RunContext  # what the recipe was handed
    task: Task
    model: torch.nn.Module
    tokenizer: object
    engine: RolloutEngine
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


def setup(ctx: RunContext) -> Setup:
    """The policy, then its rollout engine: the trainer is built first because bitsandbytes
    quantizes while loading, and loading it after vLLM took the GPU is known to crash."""
    cfg, device, run_dir = ctx.cfg, ctx.device, ctx.run_dir
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
    task = model_task(cfg.task, tokenizer, cfg.model)
    facts["chat_template"] = isinstance(task, ChatTask)
    engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(model, tokenizer, cfg, device, run_dir)
    return Setup(ctx, task, model, tokenizer, engine, params, torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0),
                 random.Random(cfg.seed), PeakMemory(device), dtype, facts | engine.facts)


@dataclass(frozen=True)
class Sampled:
    """One step's rollouts, named: the recipe's training half, system_metrics and end_step all read
    them, and a tuple of five made every call site repeat (and risk misordering) the unpacking."""

    problems: list[Problem]  # the problem of each completion: each prompt repeated group_size times, in order
    batch: Rollout
    rewards: torch.Tensor  # [N], the task's reward of each completion (plus task.format_reward where its form is right)
    parts: dict[str, float]  # with a format reward: the batch's accuracy and share of well-formed answers
    seconds: float  # generation alone: waking the engine and syncing weights are timed apart (time/wake_s, time/sync_s)
    peak_gib: float


T = TypeVar("T")


def draw_problems(rng: random.Random, problems: Sequence[T], k: int) -> list[T]:
    """A step's k training problems, drawn without replacement from the run's stream (Setup.rng, seeded with the
    run's seed). random.sample picks by position alone: bench/scale_sides.py replays the draws on indices to give
    TRL the same prompts in the same steps."""
    return rng.sample(problems, k)


def sample_groups(s: Setup) -> Sampled:
    """`prompts_per_step` training prompts, `group_size` completions each, scored by the task; then
    the engine hands the device back to the trainer."""
    cfg, device = s.ctx.cfg, s.ctx.device
    s.engine.sync()
    s.memory.reset()
    t0 = time.perf_counter()
    problems = draw_problems(s.rng, s.task.train, cfg.train.prompts_per_step)
    grouped = [p for p in problems for _ in range(cfg.train.group_size)]
    batch = s.engine.generate([p.prompt for p in grouped])
    rewards = torch.tensor([s.task.reward(p, text) for p, text in zip(grouped, batch.texts)], device=device)
    parts = {}
    if cfg.task.format_reward:  # TRL's recipes add a format reward to the accuracy one; eval/reward stays accuracy
        formatted = torch.tensor([float(s.task.formatted(text)) for text in batch.texts], device=device)
        parts = {"reward/accuracy": rewards.mean().item(), "reward/formatted": formatted.mean().item()}
        rewards = rewards + cfg.task.format_reward * formatted
    rollout_s, peak = time.perf_counter() - t0, s.memory.peak_gib()
    s.engine.release()
    return Sampled(grouped, batch, rewards, parts, rollout_s, peak)


def system_metrics(s: Setup, sampled: Sampled, train: tuple[float, float], trained_tokens: int) -> dict:
    """Reward, timing, throughput and memory of one step; the engine's own (sync, sleep, wake) included.
    train: end_train's (seconds, peak GiB). trained_tokens: prompt and completion tokens through the
    trainer's forward and backward, all updates (a recipe may train on other tokens than it sampled)."""
    rollout_s, rollout_peak, rewards = sampled.seconds, sampled.peak_gib, sampled.rewards
    train_s, train_peak = train
    n_tokens = sampled.batch.completion_mask.sum().item()
    engine = s.engine.pop_metrics()
    return engine | sampled.parts | {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "completion_length": n_tokens / len(sampled.problems),
        "time/rollout_s": rollout_s,
        "time/train_s": train_s,
        "throughput/rollout_tokens_per_s": n_tokens / rollout_s,
        "throughput/train_tokens_per_s": trained_tokens / train_s,
        "memory/rollout_peak_gib": rollout_peak,
        "memory/train_peak_gib": train_peak,
        "memory/peak_gib": max(rollout_peak, train_peak),
    }


def sampler_truncation(cfg: RunConfig) -> tuple[int, float] | None:
    """(top_k, top_p) when the rollouts sample from a truncated distribution, else None: the engines report the
    log-probs of that distribution, so the trainer's side of the mismatch ratio is taken under the same truncation
    (rl_math.truncated_logprobs; without it the ratio reads about the nucleus' mass, not 1)."""
    r = cfg.rollout
    return (r.top_k, r.top_p) if r.top_k or r.top_p < 1 else None


def token_count(prompt_mask, completion_mask) -> int:
    return int(prompt_mask.sum().item() + completion_mask.sum().item())


def end_train(s: Setup, step: int, t0: float) -> tuple[float, float]:
    """After a step's updates: re-calibrate ModelOpt's amax when due; (train seconds, train peak GiB)."""
    if s.ctx.cfg.modelopt.recalibrate_every:
        from harness.quant.modelopt import recalibrate_if_due

        recalibrate_if_due(s.model, s.ctx.cfg, s.ctx.device, step)
    return time.perf_counter() - t0, s.memory.peak_gib()


def log_start(s: Setup) -> int:
    """Resume from the last checkpoint if there is one; else log the step-0 evaluation. The start step."""
    start = checkpoint.restore(s.ctx.run_dir, s.model, s.optimizer, s.rng)
    if start == 0:
        metrics = evaluate(s, 0)
        s.ctx.tracker.log(metrics | {"memory/peak_gib": metrics["memory/eval_peak_gib"]}, step=0)
    return start


def evaluate(s: Setup, step: int) -> dict:
    """The held-out evaluation: greedy eval/reward and its prompt count eval/n (the eval's binomial error); with
    eval.samples k, eval/avg@k and eval/pass@j too, from samples seeded by the run's seed and the step alone; and
    memory/eval_peak_gib (the eval generates beside the trainer's state like a rollout, from more prompts)."""
    e = s.ctx.cfg.eval
    s.memory.reset()
    metrics = held_out_metrics(s.engine, s.task, s.task.eval, e.samples, e.temperature, eval_seed(s.ctx.cfg.seed, step))
    return metrics | {"memory/eval_peak_gib": s.memory.peak_gib()}


def end_step(s: Setup, step: int, metrics: dict, sampled: Sampled) -> None:
    """Stop on non-finite numbers; evaluate, log, keep samples, checkpoint, report progress."""
    t, tracker = s.ctx.cfg.train, s.ctx.tracker
    grouped, batch, rewards = sampled.problems, sampled.batch, sampled.rewards
    if not all(x == x and abs(x) != float("inf") for x in metrics.values()):
        tracker.log(metrics, step)
        bad = sorted(k for k, v in metrics.items() if not (v == v and abs(v) != float("inf")))
        raise NonFinite(f"non-finite {', '.join(bad)} at step {step}")
    if step % t.eval_every == 0 or step == t.steps:
        metrics |= evaluate(s, step)
        metrics["memory/peak_gib"] = max(metrics.get("memory/peak_gib", 0.0), metrics["memory/eval_peak_gib"])
    tracker.log(metrics, step)
    if step in (1, t.steps):  # what the model wrote at the start and at the end, one per prompt
        picks = range(0, min(len(grouped), 4 * t.group_size), t.group_size)
        tracker.log_samples([{"prompt": grouped[i].prompt, "completion": batch.texts[i], "reward": rewards[i].item()}
                             for i in picks], step)
    if step % t.checkpoint_every == 0 or step == t.steps:
        checkpoint.save(s.ctx.run_dir, s.model, s.optimizer, s.rng, step)
    s.ctx.progress(step=step, total=t.steps, reward=metrics["reward/mean"], eval=metrics.get("eval/reward"))


def optimizer_step(s: Setup, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Backward, clip, step; the step is skipped when the loss or gradient is not finite."""
    s.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return apply_gradients(s, loss, max_grad_norm)


def apply_gradients(s: Setup, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Clip the gradients accumulated since zero_grad and step; skipped when the loss (the accumulated parts'
    sum) or the gradient is not finite."""
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, max_grad_norm)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        s.optimizer.step()
    return grad_norm


@dataclass
class MetricBuffer:
    """A step's per-update values, logged as their means: with `updates_per_batch` above 1 a step's
    row speaks for all of its updates, not the last. Values are read off the device as they come
    (as `.item()`), so the graph each one hangs on is not kept alive to the end of the step."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        for name, value in metrics.items():
            self.values.setdefault(name, []).append(value.item() if isinstance(value, torch.Tensor) else value)

    def means(self) -> dict[str, float]:
        """In the order the names were first added; empty when nothing was (a step with no update)."""
        return {name: sum(v) / len(v) for name, v in self.values.items()}
