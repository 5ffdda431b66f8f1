"""Rollout tokens per second of the `hf` engine (transformers generate on the trainer's model) against
`vllm` (colocated LLM, the trainer's LoRA adapter synced), at several batch sizes.

    python bench/rollout_engines.py [--device cuda] [--batch 16 64 256]

Same model (builtin:tiny-arith with its LoRA adapter, bf16 base), same prompts (the arith task's
training prompts), same sampling (temperature 1, max_new_tokens); one warm-up batch per engine and
size, then the median of --repeats timed batches. Tokens counted are generated completion tokens
(eos included), so an engine is not credited for padding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ENGINES = {"hf": "in_process", "vllm": "colocated"}


def engine_config(colocation: str, max_new_tokens: int):
    from harness.config.run import RunConfig

    # enforce_eager off on CUDA: CUDA graphs are what a user measuring throughput would run
    rollout = {"colocation": colocation, "max_new_tokens": max_new_tokens} | (
        {"enforce_eager": False} if colocation != "in_process" else {})
    return RunConfig(rollout=rollout)


def measure(engine_name: str, device: torch.device, batches: list[int], max_new_tokens: int, repeats: int) -> list[dict]:
    from harness.common.system import compute_dtype
    from harness.models.loading import load_policy
    from harness.registries import ROLLOUT_ENGINES
    from harness.tasks import load_task

    cfg = engine_config(ENGINES[engine_name], max_new_tokens)
    model, tokenizer = load_policy(cfg, device, compute_dtype(device, cfg.train.dtype))
    prompts = [p.prompt for p in load_task(cfg.task).train]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        engine = ROLLOUT_ENGINES.get(cfg.rollout.engine)(model, tokenizer, cfg, device, Path(workdir))
        try:
            for n in batches:
                batch = prompts[:n]
                engine.generate(batch)  # warm-up: kernels, allocator, vLLM's first adapter load
                times, tokens = [], []
                for _ in range(repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = engine.generate(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    tokens.append(int(out.completion_mask.sum()))
                med = statistics.median(t / s for t, s in zip(tokens, times))
                rows.append({"engine": engine_name, "batch": n, "tokens_per_s": med, "tokens_per_batch": statistics.fmean(tokens),
                             "seconds": statistics.median(times)})
                print(f"{engine_name:5s} batch {n:4d}: {med:9.0f} tok/s ({statistics.fmean(tokens):.0f} tokens, "
                      f"{statistics.median(times):.3f} s)", flush=True)
            if engine_name == "vllm":
                rows[-1]["engine_start_s"] = engine.facts.get("engine_start_s")
        finally:
            engine.close()
    return rows


def run(device: torch.device, batches=(16, 64, 256), max_new_tokens: int = 16, repeats: int = 3,
        engines=("hf", "vllm")) -> list[dict]:
    rows = []
    for name in engines:
        try:
            rows += measure(name, device, list(batches), max_new_tokens, repeats)
        except Exception as e:  # noqa: BLE001  (vLLM missing on this machine: say so in the table)
            print(f"{name}: not run: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            rows.append({"engine": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def markdown(rows: list[dict]) -> str:
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    lines = ["| engine | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for name in dict.fromkeys(r["engine"] for r in rows):
        mine = {r["batch"]: r for r in rows if r["engine"] == name and "batch" in r}
        error = next((r["error"] for r in rows if r["engine"] == name and "error" in r), None)
        cells = [f"{mine[b]['tokens_per_s']:.0f}" if b in mine else (f"not run: {error}" if error else "–") for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = run(torch.device(args.device), args.batch, args.max_new_tokens, args.repeats, args.engine)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
