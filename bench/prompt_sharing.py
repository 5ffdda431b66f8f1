"""What prefilling each distinct prompt once saves an in-process rollout (rollout.hf.prompt_cache): HFEngine's
generate on a GRPO-shaped batch (P prompts x G copies, prompts padded to ~L tokens) with the sharing on and off.

CPU, a random wide Qwen2 (the MLP's intermediate width decides the prefill's memory), float32, LoRA r 16 on every
linear; each arm in a fresh process with glibc's mmap threshold fixed (RSS then follows what is alive): the rollout's
peak RSS above the process before it, and its seconds (median of --repeats). On an H100 (issue 23, before the
sharing) the 7B rollout peaked at 41.2 GiB in the prefill of 128 copies, where training took 24.

    python bench/prompt_sharing.py                         # 8 prompts x 8 copies of ~300 tokens, 16 new
    python bench/prompt_sharing.py --prompts 16 --group 4 --prompt-len 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(a: argparse.Namespace, share: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from harness.config.run import RunConfig
    from harness.models.loading import load_tokenizer, resolve
    from harness.rollout.hf import HFEngine

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=32768, pad_token_id=0, eos_token_id=1)
    model = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))

    # the shipped tiny model's character tokenizer (one token a character): prompts of random digits have exactly
    # the lengths asked; the wide model's other ids decode to nothing
    tokenizer = load_tokenizer(resolve("builtin:tiny-arith"))
    rng = random.Random(1)
    prompts = ["".join(rng.choices("0123456789", k=rng.randint(a.prompt_len * 3 // 4, a.prompt_len)))
               for _ in range(a.prompts)]
    batch = [p for p in prompts for _ in range(a.group)]
    cfg = RunConfig(rollout={"max_new_tokens": a.max_new})
    engine = HFEngine(model, tokenizer, cfg)
    engine.share_prompts = share
    seconds = []
    with torch.no_grad():
        engine.generate(batch[: a.group])  # warm
        Path("/proc/self/clear_refs").write_text("5")
        before = status_bytes("VmRSS")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            engine.generate(batch)
            seconds.append(time.perf_counter() - t0)
        peak = status_bytes("VmHWM") - before
    return {"share": share, "rollout_s": statistics.median(seconds), "peak_above_start_gib": peak / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=300, help="longest prompt (each is 3/4 to all of it)")
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a, a.one == "on")))
        return
    rows = []
    for arm in ("off", "on"):
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "1048576"}  # read by glibc at start: a fresh process each arm
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", arm], capture_output=True, text=True,
                              env=env, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    off, on = rows
    print(f"{a.prompts} prompts x {a.group} copies, prompts of {a.prompt_len * 3 // 4}-{a.prompt_len} tokens, "
          f"{a.max_new} new; Qwen2 {a.hidden} x {a.intermediate} x {a.layers} layers, float32, CPU")
    print("| prefill | rollout s | peak above start GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {'each distinct prompt once' if r['share'] else 'every copy'} | {r['rollout_s']:.2f} | "
              f"{r['peak_above_start_gib']:.3f} |")
    print(f"sharing: {on['rollout_s'] / off['rollout_s']:.2f} of the time, "
          f"{on['peak_above_start_gib'] / off['peak_above_start_gib']:.2f} of the peak")


if __name__ == "__main__":
    main()
