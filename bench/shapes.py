"""Real shapes on one GPU: step time, rollout tokens/s, peak memory and the memory-fit estimate of GRPO runs on
`shape:` models (released architectures, random weights), in bf16 and nf4.

    python bench/shapes.py --data gsm.jsonl --out reports/shapes-h200                  # 0.5B, 1.5B, 7B x bf16, nf4
    python bench/shapes.py --data gsm.jsonl --shapes qwen2.5-1.5b --quants nf4 --legacy-nf4 --out DIR

Each run: `--prompts` (4) prompts x 8 completions of up to 256 tokens (a random policy writes all 256; the
issue-22 probe's 16 x 8 needs 118-150 GiB at the real vocabulary, mostly float32 logits over 152k ids, which no
single GPU holds at 7B), gradient checkpointing, in-process generation, LoRA r 16 on every linear, `--steps` steps; the medians
skip step 1 (CUDA warm-up). Each runs in a fresh process (`--one`), so one run's allocator cannot hold memory into
the next. `--legacy-nf4` loads nf4 as the harness did before issue 22 (peft's prepare_model_for_kbit_training,
which casts embeddings, norms and lm_head to float32), for the before/after comparison.

`--data`: a GSM8K-form JSONL ({"question", "answer": "... #### N"}); the prompts' lengths are what matter.
`bash bench/gpu_stage.sh` writes one from reasoning-gym (.gpures/gsm_symbolic.jsonl: gsm_symbolic, seed 1234, 300).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")
QUANTS = ("bf16", "nf4")


def config(shape: str, quant: str, data: str, steps: int, prompts: int = 4):
    from harness.config.run import RunConfig

    return RunConfig(model=f"shape:{shape}", quant=quant,
                     task={"name": "boxed", "source": data, "eval_size": 16},
                     rollout={"max_new_tokens": 256},
                     train={"steps": steps, "prompts_per_step": prompts, "group_size": 8, "gradient_checkpointing": True,
                            "eval_every": steps, "checkpoint_every": steps, "lr": 1e-5})


def legacy_nf4() -> None:
    """bitsandbytes formats as loaded before issue 22: prepare_model_for_kbit_training's float32 upcast."""
    from harness.quant import bnb

    original = bnb.BnbFormat.load_base

    def load_base(self, source, cfg, device, dtype):
        from peft import prepare_model_for_kbit_training

        model = original(self, source, cfg, device, dtype)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing) \
            if self.quantized else model

    bnb.BnbFormat.load_base = load_base


def one(args) -> None:
    """One run in this process; its row of the table on stdout (the last line)."""
    import torch

    from harness.execution.lifecycle import run_one
    from harness.execution.memory_fit import estimate
    from harness.results.layout import read_metrics

    if args.legacy_nf4:
        legacy_nf4()
    cfg = config(args.shapes, args.quants, args.data, args.steps, args.prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    est = estimate(cfg, device)
    run_dir = Path(args.work) / f"{args.shapes}-{args.quants}{'-legacy' if args.legacy_nf4 else ''}"
    t0 = time.perf_counter()
    summary = run_one(cfg, run_dir, device)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(run_dir) if "time/train_s" in r and r["step"] > 1]

    def med(key):
        values = [r[key] for r in rows if key in r]
        return round(statistics.median(values), 3) if values else None

    step_s = [r["time/rollout_s"] + r["time/train_s"] for r in rows]
    print(json.dumps({
        "shape": args.shapes, "quant": args.quants, "legacy_nf4": args.legacy_nf4, "status": summary["status"],
        "error": summary.get("error"), "params": summary.get("model_params") or summary.get("params"),
        "median_step_s": round(statistics.median(step_s), 2) if step_s else None,
        "rollout_s": med("time/rollout_s"), "train_s": med("time/train_s"),
        "rollout_tokens_per_s": med("throughput/rollout_tokens_per_s"),
        "train_tokens_per_s": med("throughput/train_tokens_per_s"), "completion_length": med("completion_length"),
        "peak_gib": summary.get("peak_memory_gib"), "rollout_peak_gib": med("memory/rollout_peak_gib"),
        "train_peak_gib": med("memory/train_peak_gib"), "estimate_gib": _round(est.get("peak_gib")),
        "estimate_phase": est.get("phase"), "estimate_parts": {k: _round(v) for k, v in est.get("parts", {}).items()},
        "wall_s": round(wall, 1), "device": summary.get("device"),
    }))


def _round(x):
    return None if x is None else round(x, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--quants", default=",".join(QUANTS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (x 8 completions)")
    p.add_argument("--legacy-nf4", action="store_true")
    p.add_argument("--work", default="/tmp/shapes-bench")
    p.add_argument("--out", default="reports/shapes")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "shapes.json"
    done = json.loads(table.read_text()) if table.exists() else []
    for shape in args.shapes.split(","):
        for quant in args.quants.split(","):
            cmd = [sys.executable, __file__, "--one", "--data", args.data, "--shapes", shape, "--quants", quant,
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--work", args.work]
            cmd += ["--legacy-nf4"] if args.legacy_nf4 else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            try:
                row = json.loads(lines[-1])
            except (IndexError, ValueError):
                row = {"shape": shape, "quant": quant, "legacy_nf4": args.legacy_nf4, "status": "crashed",
                       "error": proc.stderr[-1500:]}
            print(json.dumps(row), flush=True)
            done = [r for r in done if (r["shape"], r["quant"], r.get("legacy_nf4")) != (shape, quant, args.legacy_nf4)]
            done.append(row)
            table.write_text(json.dumps(done, indent=1))  # after every run: a killed bench keeps what it measured


if __name__ == "__main__":
    main()
