"""GRPO step time: this harness vs TRL's GRPOTrainer, on the identical configuration, in one process.

    python bench/grpo_vs_trl.py --device cpu
    # a GPU machine (pip install -e '.[bench]' first)
    python bench/grpo_vs_trl.py --device cuda --out reports/bench/grpo_vs_trl.json

Both sides train builtin:tiny-arith on arith (16 prompts x 8 completions, 5 new tokens, in-process HF
`generate`) with the same LoRA on the base the harness's own loader builds, the same GRPO loss and the
same AdamW (run_config and trl_args below spell out every knob). Per side: W warm-up steps, then N
timed ones; harness: the gap between `progress` callbacks (the recipe calls it at the end of every
step); TRL: on_step_begin -> on_step_end. Medians; harness/TRL below 1 means the harness is faster.

Known differences, kept on purpose (each is the implementation under test, not its configuration):
- Both take the old log-probs from the first update's forward (logp.detach()); TRL computes
  log-probs through a fused LM head without the full logits, the harness from float32 logits.
- The harness's generate returns scores (sampler log-probs) and removes NaN logits; TRL's does not.
- Each side draws its own 16 prompts per step; every arith prompt is 6 tokens, so the shapes match,
  and completion tokens per step are reported to show both did the same work.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import TrainerCallback

from harness.common.system import compute_dtype, device_name
from harness.config.run import RunConfig

PROMPTS, GROUP, MAX_NEW = 16, 8, 5
NEVER = 10**9  # eval_every / checkpoint_every beyond any run here
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def run_config(quant: str, total_steps: int) -> RunConfig:
    """The harness's side, every knob spelled out so a change of the harness's defaults cannot
    silently change the benchmark. One step more than is timed: see time_harness."""
    return RunConfig.model_validate({
        "model": "builtin:tiny-arith", "task": {"name": "arith", "eval_size": 500}, "quant": quant, "algorithm": "grpo",
        "seed": 0,
        "rollout": {"colocation": "in_process", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"steps": total_steps + 1, "prompts_per_step": PROMPTS, "group_size": GROUP, "lr": 1e-3, "beta": 0.04,
                  "clip_low": 0.2, "clip_high": 0.2, "loss_type": "dapo", "scale_rewards": "group", "updates_per_batch": 1,
                  "max_grad_norm": 1.0, "eval_every": NEVER, "checkpoint_every": NEVER, "gradient_checkpointing": False},
    })


def trl_args(cfg: RunConfig, device: torch.device, total_steps: int, output_dir: str) -> dict:
    """GRPOConfig fields matching cfg. TRL's own defaults that would differ are overridden here:
    gradient_checkpointing (TRL: on), bf16 autocast (TRL: on), use_bias_correction_kl (TRL: the KL
    term times the IS ratio, whose gradient differs), linear LR decay, fused AdamW, logging every 10."""
    t, r = cfg.train, cfg.rollout
    return dict(
        output_dir=output_dir, seed=cfg.seed, max_steps=total_steps, use_cpu=device.type == "cpu",
        per_device_train_batch_size=t.prompts_per_step * t.group_size,  # TRL counts completions, not prompts
        num_generations=t.group_size, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=0, use_vllm=False,
        beta=t.beta, epsilon=t.clip_low, epsilon_high=t.clip_high, loss_type=t.loss_type, scale_rewards=t.scale_rewards,
        use_bias_correction_kl=False, mask_truncated_completions=False,
        learning_rate=t.lr, optim="adamw_torch", weight_decay=0.0, max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="constant", warmup_steps=0, gradient_checkpointing=False, bf16=False, fp16=False,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the kernels, not their queueing


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Rows:
    """A tracker that keeps each step's metrics in memory: nothing written, nothing mirrored."""

    def __init__(self):
        self.rows: dict[int, dict] = {}

    def log(self, metrics, step):
        self.rows[step] = metrics

    def log_config(self, config): pass
    def log_samples(self, samples, step): pass
    def finish(self, summary): pass


class _Done(Exception):
    """Raised from `progress` after the last timed step: the recipe's final step always evaluates
    and checkpoints, so the run is stopped one step before its last and that step never runs."""


def time_harness(cfg: RunConfig, device: torch.device, warmup: int, steps: int) -> dict:
    from harness.recipes import grpo

    stamps, tracker = [], _Rows()

    def progress(step, **_):
        _sync(device)
        stamps.append(time.perf_counter())
        if step == warmup + steps:
            raise _Done

    with tempfile.TemporaryDirectory() as tmp:
        try:
            grpo.run(cfg, Path(tmp), tracker, device, progress)
        except _Done:
            pass
    _free()
    # stamps[k] ends step k+1, so the gaps time steps 2.. (step 1 starts after the step-0 evaluation,
    # which no callback marks: hence warmup >= 1); keep the last `steps` of them.
    times = [b - a for a, b in zip(stamps, stamps[1:])][warmup - 1:]
    lengths = [tracker.rows[s]["completion_length"] for s in range(warmup + 1, warmup + steps + 1)]
    return {"step_s": times, "completion_tokens_per_step": statistics.mean(lengths) * PROMPTS * GROUP}


class _StepTimer(TrainerCallback):
    """on_step_begin -> on_step_end of each optimizer step (generation, scoring, forward, backward,
    optimizer), plus the step's mean completion length from TRL's own metrics."""

    def __init__(self, device: torch.device):
        self.device, self.trainer = device, None
        self.begin, self.end, self.lengths = [], [], []

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.end.append(time.perf_counter())
        # workaround(trl 1.16): TRL keeps per-step metrics only in this private dict; never cleared while logging is off
        self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])


def time_trl(cfg: RunConfig, device: torch.device, warmup: int, steps: int) -> dict:
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from harness.models.loading import resolve
    from harness.registries import QUANT
    from harness.tasks import Problem, load_task

    source = resolve(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(cfg.seed)
    # The harness's own loader: the same BitsAndBytesConfig, compute dtype, prepare_model_for_kbit_training
    # and bitsandbytes CPU-kernel setting. TRL then wraps it with the same LoraConfig that load_policy
    # builds; a ready PeftModel would make TRL add a "ref" copy of the adapter (beta > 0) and score
    # the reference through it instead of disabling the adapter, as the harness does.
    model = QUANT.get(cfg.quant).load_base(source, cfg, device, compute_dtype(device, cfg.train.dtype))
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    task = load_task(cfg.task)
    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in task.train])

    def exact_match(prompts, completion_ids, answer, **_):
        # decoded as the harness decodes (up to eos, special tokens kept), then the task's own reward
        texts = [tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids, skip_special_tokens=False)
                 for ids in completion_ids]
        return [task.reward(Problem(p, a), t) for p, a, t in zip(prompts, answer, texts)]

    timer = _StepTimer(device)
    total = warmup + steps
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=GRPOConfig(**trl_args(cfg, device, total, tmp)),
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer], peft_config=lora)
        # workaround(trl 1.16): TRL casts a quantized model's adapters to bf16 (QLoRA paper); the harness keeps them in float32,
        # as peft makes them. Undone before train() builds the optimizer, so both train the same numerics.
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        timer.trainer = trainer
        trainer.train()
    del trainer, model
    _free()
    times = [e - b for b, e in zip(timer.begin, timer.end)][warmup:]
    return {"step_s": times, "completion_tokens_per_step": statistics.mean(timer.lengths[warmup:]) * PROMPTS * GROUP}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run(device, quants=("bf16", "nf4"), steps: int = 10, warmup: int = 3) -> dict:
    """Both sides for each quant, alternating which goes first (the second runs on a warm allocator,
    warm caches and already imported kernels). Returns what main() writes as JSON."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the harness's first step is not observable from its progress callback")
    device = torch.device(device)
    result = {"device": device_name(device), "versions": {n: _version(n) for n in LIBRARIES},
              "steps": steps, "warmup": warmup,
              "config": {"prompts_per_step": PROMPTS, "group_size": GROUP, "max_new_tokens": MAX_NEW}, "quants": {}}
    sides = {"harness": time_harness, "trl": time_trl}
    for i, quant in enumerate(quants):
        cfg = run_config(quant, warmup + steps)
        order = ["harness", "trl"] if i % 2 == 0 else ["trl", "harness"]
        entry = {"order": order, "compute_dtype": str(compute_dtype(device, cfg.train.dtype)).removeprefix("torch."),
                 "harness_run_config": cfg.model_dump(mode="json"),
                 "trl_args": trl_args(cfg, device, warmup + steps, "<tmp>")}
        for side in order:
            print(f"[{quant}] {side}: {warmup} warm-up + {steps} timed steps ...", flush=True)
            entry[side] = sides[side](cfg, device, warmup, steps)
            entry[side]["median_s"] = statistics.median(entry[side]["step_s"])
        entry["ratio"] = entry["harness"]["median_s"] / entry["trl"]["median_s"]
        h, t = entry["harness"]["completion_tokens_per_step"], entry["trl"]["completion_tokens_per_step"]
        # sampled lengths differ by chance; more than 10% apart means the two did different work
        entry["same_work"] = abs(h - t) <= 0.1 * max(h, t)
        result["quants"][quant] = entry
    return result


def markdown(result: dict) -> str:
    lines = [f"GRPO step time on {result['device']} (median of {result['steps']} steps after {result['warmup']} warm-up; "
             f"{result['config']['prompts_per_step']}x{result['config']['group_size']} completions/step)", "",
             "| quant | harness s/step | TRL s/step | harness/TRL | completion tokens/step (harness / TRL) |",
             "|---|---|---|---|---|"]
    notes = []
    for quant, e in result["quants"].items():
        h, t = e["harness"], e["trl"]
        lines.append(f"| {quant} | {h['median_s']:.3f} | {t['median_s']:.3f} | {e['ratio']:.2f} | "
                     f"{h['completion_tokens_per_step']:.0f} / {t['completion_tokens_per_step']:.0f} |")
        if not e["same_work"]:
            notes.append(f"- {quant}: completion tokens per step differ by more than 10%: the sides did different work.")
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant", nargs="+", default=["bf16", "nf4"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (>= 1)")
    parser.add_argument("--out", type=Path, help="write the full result as JSON here")
    a = parser.parse_args()
    result = run(a.device, a.quant, a.steps, a.warmup)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
