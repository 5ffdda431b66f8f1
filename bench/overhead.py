"""Where a harness GRPO step spends its time: model forward, backward, generate and the optimizer
step, against everything else (the harness's overhead), with that overhead broken down by name.

    python bench/overhead.py [--device cuda] [--quant nf4] [--steps 12 --warmup 3]

Every timed call is wrapped, and time is exclusive: a call's nested timed calls are subtracted from
it (generate's own forward passes count as generate; the held-out evaluation as `evaluate`, whatever
it calls). Step time is the wall clock between the recipe's end-of-step callbacks, minus the periodic
evaluation and checkpoint (not per-step work; TRL's step excludes them too). "untimed" is the rest
of the step: Python in the recipe's own loop body and anything not wrapped below.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

CORE = ("generate", "forward", "backward", "optimizer.step")
PERIODIC = ("evaluate", "checkpoint")


class ExclusiveTimer:
    """Seconds per name, each call's nested timed calls excluded; CUDA synchronised at each boundary."""

    def __init__(self, cuda: bool):
        self.cuda, self.totals, self.stack = cuda, {}, []

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                elapsed = time.perf_counter() - t0
                nested = self.stack.pop()
                self.totals[name] = self.totals.get(name, 0.0) + elapsed - nested
                if self.stack:
                    self.stack[-1] += elapsed
        return timed

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def instrument(timer: ExclusiveTimer, stack: contextlib.ExitStack) -> None:
    """Wrap the four core calls and the harness's per-step pieces where the recipe looks them up."""
    import transformers

    from harness import tasks
    from harness.common import system
    from harness.models import checkpoint
    from harness.recipes import common, grpo
    from harness.rollout import hf as rollout
    from harness.tracking import files as tracking

    targets = [
        (transformers.GenerationMixin, "generate", "generate"),
        (grpo, "completion_logprobs", "forward"),  # the policy's and the reference's forward + log-softmax
        (torch.Tensor, "backward", "backward"),
        (torch.optim.AdamW, "step", "optimizer.step"),
        (common, "evaluate", "evaluate"),
        (checkpoint, "save", "checkpoint"),
        (torch.optim.AdamW, "zero_grad", "zero_grad"),
        (torch.nn.utils, "clip_grad_norm_", "clip_grad_norm"),
        (rollout, "encode_prompts", "tokenize prompts"),
        (rollout, "decode_completions", "decode completions"),
        (rollout, "completion_mask", "completion mask"),
        (tasks.ArithTask, "reward", "reward"),
        (tasks.BoxedTask, "reward", "reward"),
        (grpo, "group_advantages", "advantages"),
        (grpo, "mismatch_metrics", "mismatch metrics"),
        (grpo, "system_metrics", "system metrics"),
        (system.PeakMemory, "reset", "memory probe"),
        (system.PeakMemory, "peak_gib", "memory probe"),
        (tracking.JsonlTracker, "log", "metrics log"),
        (tracking.JsonlTracker, "log_samples", "metrics log"),
    ]
    for owner, attr, name in targets:
        original = getattr(owner, attr)
        stack.callback(setattr, owner, attr, original)
        setattr(owner, attr, timer.wrap(name, original))


def profile(device: torch.device, quant: str = "bf16", steps: int = 12, warmup: int = 3) -> dict:
    from harness.config.run import RunConfig
    from harness.execution.lifecycle import run_one

    cfg = RunConfig(quant=quant, task={"name": "arith", "eval_size": 100},
                    train={"steps": warmup + steps, "prompts_per_step": 16, "group_size": 8, "eval_every": 10**6,
                           "checkpoint_every": 10**6})
    timer = ExclusiveTimer(device.type == "cuda")
    marks: list[tuple[int, float, dict]] = []

    def progress(step, **_):  # the recipe's end-of-step callback: a timestamp and the totals so far
        timer.sync()
        marks.append((step, time.perf_counter(), dict(timer.totals)))

    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        instrument(timer, stack)
        summary = run_one(cfg, Path(tmp) / cfg.run_id, device, progress=progress)
    if summary["status"] != "ok":
        raise RuntimeError(f"profiled run failed: {summary['error']}")
    # measured window: from the end of the last warm-up step to the end of the last step
    (_, t0, before), (_, t1, after) = marks[warmup - 1], marks[-1]
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    wall = t1 - t0 - sum(spent.get(k, 0.0) for k in PERIODIC)
    core = sum(spent.get(k, 0.0) for k in CORE)
    named = {k: v for k, v in spent.items() if k not in CORE + PERIODIC}
    named["untimed"] = wall - core - sum(named.values())
    top = sorted(named.items(), key=lambda kv: -kv[1])
    return {"quant": quant, "steps": steps, "step_s": wall / steps, "core_share": core / wall, "overhead_share": 1 - core / wall,
            "core_s": {k: spent.get(k, 0.0) / steps for k in CORE}, "overhead_s": {k: v / steps for k, v in top},
            "top3": [k for k, _ in top[:3]]}


def markdown(results: list[dict]) -> str:
    lines = ["| quant | s/step | generate | forward | backward | optimizer.step | overhead share "
             "| top overhead costs (ms/step) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        core = " | ".join(f"{r['core_s'][k] * 1e3:.0f} ms" for k in CORE)
        top = ", ".join(f"{k} {r['overhead_s'][k] * 1e3:.1f}" for k in r["top3"])
        lines.append(f"| {r['quant']} | {r['step_s']:.3f} | {core} | {r['overhead_share']:.1%} | {top} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quant", nargs="+", default=["bf16", "nf4"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = [profile(torch.device(args.device), q, args.steps, args.warmup) for q in args.quant]
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\nmedian overhead share: {statistics.median(r['overhead_share'] for r in results):.1%}")


if __name__ == "__main__":
    main()
