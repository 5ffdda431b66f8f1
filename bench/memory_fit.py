"""The memory-fit estimate (harness/execution/memory_fit.py) against the measured peak, per format.

    python bench/memory_fit.py --device cuda --out reports/bench/memory_fit-h200.json
    python bench/memory_fit.py                # CPU: peak RSS of each run's own process

Each case trains a few GRPO steps in a fresh process (as a sweep's local executor runs it), so the
CPU figure is that process's peak RSS and the CUDA figure torch's max_memory_allocated. Cases: the
smoke matrix's per-step shapes on builtin:tiny-arith, and a wider random Qwen2 (32768 vocabulary,
hidden 1024, 8 layers) whose weights, activations and logits, not the runtime, decide the peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness.common.text import number

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_memory_fit import RUN, boxed_questions, wide_model  # noqa: E402  (the tests' run and fixtures, one definition)

SMOKE = dict(task={"name": "arith", "eval_size": 500}, rollout={"max_new_tokens": 5}, lora={"r": 16, "alpha": 32},
             train={"steps": 3, "prompts_per_step": 16, "group_size": 8, "eval_every": 25, "checkpoint_every": 25})


def cases(tmp: Path, quants: list[str], hidden: int, layers: int):
    from harness.config.run import RunConfig
    from harness.models.tiny_arith import shipped

    tiny = shipped()
    wide = wide_model(tmp / "wide", tiny, hidden, layers)
    questions = boxed_questions(tmp / "q.jsonl")
    for quant in quants:
        yield f"tiny-arith smoke {quant}", RunConfig(quant=quant, **SMOKE)
    for quant in quants:
        yield f"qwen2 {hidden}x{layers} {quant}", RunConfig(
            model=str(wide), quant=quant, task={"name": "boxed", "source": str(questions), "eval_size": 4},
            rollout={"max_new_tokens": 32}, train={"steps": 2, "prompts_per_step": 8, "group_size": 8, "eval_every": 25,
                                                   "checkpoint_every": 25})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", nargs="+", default=["bf16", "nf4"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args()
    from harness.execution.memory_fit import estimate

    device, rows = torch.device(args.device), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cases(Path(tmp), args.quant, args.hidden, args.layers):
            est = estimate(cfg, device)
            run_dir = Path(tmp) / cfg.run_id
            done = subprocess.run([sys.executable, "-c", RUN, cfg.model_dump_json(), str(run_dir), args.device],
                                  capture_output=True, text=True)
            summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
            if summary.get("status") != "ok":
                print(f"{name}: {summary.get('status', 'no summary')}: {summary.get('error') or done.stderr[-2000:]}",
                      file=sys.stderr)
            measured = summary.get("peak_memory_gib")
            rows.append({"case": name, "quant": cfg.quant, "estimate_gib": est["peak_gib"], "measured_gib": measured,
                         "ratio": est["peak_gib"] / measured if measured else None, "phase": est["phase"],
                         "parts_gib": est["parts"]})
            r = rows[-1]
            print(f"{name:28s} estimate {r['estimate_gib']:.3f} GiB  measured {number(measured, none='None')} GiB"
                  + (f"  ({r['ratio'] - 1:+.0%})" if r["ratio"] else ""), flush=True)
    if args.out:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
