"""Where an in-process rollout's time goes, step by step: the harness's HFEngine.generate beside TRL's own call of
`generate`, on the same policy, prompts and batch as bench/scale.py's `harness` and `trl` sides (issue 23).

On an H100 (stop 40, one machine, one step each) the harness's in-process rollout at 7B nf4 with 1024 new tokens
took 167.9 s against TRL's 119.5 s; the sides had drawn different prompts, padded to 657 and 484 tokens
(bench/scale.py gives TRL the harness's prompts since). Here (stop 41, another H100, 1.5B nf4, 1024 new tokens,
the same 657-wide prompts) the two took 128.8 and 128.2 s, ~125 ms a decode step flat over the quarters, and each
process spent as much CPU time as wall time: the decode is host-bound. `--profile 900` put ~54 ms of each step's
host time in cuDNN attention (1.4-2.2 ms a call), which the harness has left out since (HFEngine.attention): on
another H100 (stop 42, both arms with PyTorch's default allocator) its rollout took 97.65 s, 141.01 with cuDNN. The
harness's arm also left 67.9 GiB of the card reserved against TRL's 15.9 (peak allocated 8.5 and 13.4 GiB): the
caching allocator after the shared prompt prefill; 9.3 GiB with expandable segments, 15.9 when generate prefilled
every row (stop 42's arms harness-expandable and harness-noshare, the latter with the default allocator; TRL's call
reserved the same 15.9 in eval mode, trl-eval). The harness's executors have started an in-process run's process
with expandable segments since, as every harness arm but harness-cached is started here: stop 42's `harness` and
`harness-cudnn` rows are `harness-cached` and a cuDNN arm with the default allocator, which no arm is now.
Every arm generates from the prompts of one of the harness's rollouts (--draw; the first: 657 wide). Each arm
runs in a fresh process (its own CUDA allocator) and times every forward of its rollout (a forward pre-hook on the
model; `generate` waits for the device once a step, so the gaps are step times): the prefill, then the decode steps
by quarter. A constant gap between arms is per-step overhead; a gap that grows with the quarter is the cache.

Arms:
  harness            HFEngine.generate, as the recipe's rollout calls it (shared prompt prefill, SamplerLogprobs), in a
                     process started as the harness's executors start an in-process run's (isolation.allocator_env:
                     PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True on a GPU), as every harness arm but the cached one
  harness-noshare    the same, generate prefilling every row itself (HFEngine.share_prompts off)
  harness-sampler    generate's own sampler at temperature 1 (the sampled eval's call): no SamplerLogprobs
  harness-cudnn      the harness with PyTorch's own choice of attention backend (cuDNN first on an H100), as it
                     generated before stop 41 (HFEngine.attention None)
  harness-cached     the harness with PyTorch's default caching allocator, as it ran before stop 42 (stop 42
                     measured that setting as the arm `harness-expandable` against the default `harness`)
  trl                TRL 1.16's in-process call: model in train mode, gradient checkpointing disabled around it,
                     GenerationConfig(do_sample, top_k 0, disable_compile=True), every row prefilled by generate
  trl-eval           the same call in eval mode, as the harness generates: train mode's share of a gap
An arm at 7B nf4 with 1024 new tokens takes ~3 minutes with its model load: two arms a device call.

    python bench/decode_steps.py --model builtin:tiny-arith --task arith --quant bf16 --device cpu   # a CPU check
    # the GPU machine (no TRL, vLLM or pyarrow needed), carry [".gpupyd", ".gpubnb", ".gpures"]; ~5 device minutes
    # at 1.5B (two arms), ~7 at 7B; --arms harness,harness-cached: the allocator's setting (reserved memory):
    source bench/gpu_install.sh && gpu_install .gpupyd .gpubnb && PYTHONPATH=/tmp/site:$PWD QRL_CACHE=/tmp/qrlc \
      python bench/decode_steps.py --model shape:qwen2.5-1.5b --data .gpures/gsm_symbolic.jsonl \
      --arms harness,harness-cudnn --profile 900 --out $OUT/decode_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # scale_sides beside it, harness above

ARMS = ("harness", "harness-noshare", "harness-sampler", "harness-cudnn", "harness-cached", "trl", "trl-eval")
PROFILED = 4  # forwards --profile covers


def arm_env(arm: str, device: str, environ: dict[str, str] = os.environ) -> dict[str, str]:
    """An arm's process's environment (set before it starts CUDA): this one's, and for a harness arm what the
    harness's executors give an in-process run's process; harness-cached runs without any allocator setting."""
    from harness.common.system import ALLOCATOR_VARS
    from harness.config.run import RunConfig
    from harness.execution.isolation import allocator_env

    if arm == "harness-cached":
        return {k: v for k, v in environ.items() if k not in ALLOCATOR_VARS}
    return dict(environ) | ({} if arm.startswith("trl") else allocator_env(RunConfig(), device, environ))


def measure(a: argparse.Namespace, arm: str) -> dict:
    import torch
    from scale_sides import config, harness_prompt_order
    from transformers import GenerationConfig

    from harness.chat import model_task
    from harness.common.system import GIB, allocator_settings, compute_dtype, device_name
    from harness.models.loading import load_policy
    from harness.rollout.hf import HFEngine, encode_prompts

    device = torch.device(a.device)
    # bench/scale.py's harness side's config of this work (every knob spelled out there)
    cfg = config({"model": a.model, "quant": a.quant, "task": a.task, "data": a.data, "max_new": a.max_new,
                  "side": "harness", "warmup": 0, "steps": 1, "prompts": a.prompts, "group": a.group,
                  "gpu_memory_utilization": 0.3})
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg, device, compute_dtype(device, cfg.train.dtype))
    model.train()  # as the recipe leaves it between steps
    # the prompts of the recipe's rollout number --draw (bench/scale.py's sides generate from the same since stop 41)
    train = model_task(cfg.task, tokenizer, cfg.model).train
    batch = [train[i].prompt for i in harness_prompt_order(cfg, len(train), a.draw)[-a.prompts:] for _ in range(a.group)]

    stamps: list[float] = []
    base = model.get_base_model()
    # --profile: torch.profiler over forwards [K, K + PROFILED) of the timed rollout (the whole 1024-step rollout at 7B
    # would be millions of kernel events); only the timed run counts (stamps is cleared before it)
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                       + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []))
                if a.profile else None)

    def stamp(*_):
        stamps.append(time.perf_counter())
        if profiler is not None and timed and len(stamps) == a.profile:
            profiler.start()
        elif profiler is not None and timed and len(stamps) == a.profile + PROFILED:
            if device.type == "cuda":
                torch.cuda.synchronize()  # the profiled forwards' kernels finish inside the window
            profiler.stop()

    timed = False
    base.register_forward_pre_hook(stamp)

    engine = HFEngine(model, tokenizer, cfg)
    engine.share_prompts = arm != "harness-noshare"
    if arm == "harness-cudnn":
        engine.attention = None

    def trl_generate():
        # trl/trainer/grpo_trainer.py (1.16): _generate_single_turn's transformers branch, and unwrap_model_for_
        # generation's gradient_checkpointing_disable around it; the trainer's model stays in train mode
        ids, mask = encode_prompts(tokenizer, batch, device)
        config = GenerationConfig(max_new_tokens=a.max_new, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id],
                                  temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
                                  cache_implementation=None, disable_compile=True)
        base.gradient_checkpointing_disable()
        model.train(arm == "trl")
        try:
            with torch.no_grad():
                sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            return SimpleNamespace(prompt_ids=ids, completion_ids=sequences[:, ids.shape[1]:])
        finally:
            base.gradient_checkpointing_enable()
            model.train()

    # the harness arms differ in the engine's settings or the process's environment, set above; the sampler arm in
    # the call (a temperature: generate samples, no SamplerLogprobs)
    sampling = {"temperature": 1.0} if arm == "harness-sampler" else {}
    run = trl_generate if arm.startswith("trl") else (lambda: engine.generate(batch, **sampling))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps.clear()
    timed = True
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = run()
    sync()
    end, cpu = time.perf_counter(), time.process_time() - cpu0
    # generate's forwards are the completion's tokens (its first takes what the prompt cache left); after that
    # first, each is one decode step
    tokens = out.completion_ids.shape[1]
    steps = stamps[len(stamps) - tokens + 1:] + [end]
    decode = [b - a_ for a_, b in zip(steps, steps[1:])]
    quarters = [decode[i * len(decode) // 4:(i + 1) * len(decode) // 4] for i in range(4)]
    row = {"arm": arm, "device": device_name(device), "rollout_s": round(end - t0, 2), "new_tokens": tokens,
           "prompt_width": out.prompt_ids.shape[1],
           "to_first_decode_s": round(steps[0] - t0, 3), "forwards": len(stamps),
           # near rollout_s: the host's launches set the pace (a device-bound loop waits, which costs little CPU)
           "cpu_s": round(cpu, 2), "alloc_conf": allocator_settings(),
           "decode_ms_by_quarter": [round(1000 * statistics.mean(x), 2) for x in quarters if x]}
    if profiler is not None and a.profile <= len(stamps) < a.profile + PROFILED:
        profiler.stop()  # the rollout ended inside the window: no table (a profiler left running crashes the exit)
    elif profiler is not None and len(stamps) >= a.profile + PROFILED:
        events = profiler.key_averages()
        by = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        row["profile"] = {"forwards": [a.profile, a.profile + PROFILED], "by_device_time": events.table(sort_by=by, row_limit=25),
                          "by_cpu_time": events.table(sort_by="self_cpu_time_total", row_limit=15)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        row |= {"peak_alloc_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
                "reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 2),
                "device_used_gib": round((total - free) / GIB, 2)}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape:qwen2.5-7b")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--task", default="boxed")
    p.add_argument("--data", help="the boxed task's JSONL (bench/shapes.py says how to make one)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=1024, help="new tokens (a random policy never stops early)")
    p.add_argument("--draw", type=int, default=1, help="generate from the prompts of the recipe's rollout number "
                   "DRAW (seed 0 at qwen2.5 shapes: 1 is 657 tokens wide, 3 is 456, the harness's slowest steps)")
    p.add_argument("--warmup", type=int, default=0, help="untimed rollouts first (bench/scale.py's calls used 0)")
    p.add_argument("--arms", default="harness,trl", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", type=int, default=0, metavar="K", help="torch.profiler over the timed rollout's "
                   f"forwards K to K+{PROFILED - 1} (the prefill is forward 1); the tables go into the row and are printed")
    p.add_argument("--out", help="write the rows here as JSON too")
    p.add_argument("--one", choices=ARMS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a, a.one)))
        return
    arms = a.arms.split(",")
    if unknown := [x for x in arms if x not in ARMS]:
        p.error(f"--arms: unknown {', '.join(unknown)}; valid: {', '.join(ARMS)}")
    rows = []
    for arm in arms:
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", arm], capture_output=True, text=True,
                              env=arm_env(arm, a.device))
        if done.returncode:
            rows.append({"arm": arm, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"\n{a.model} {a.quant}, {a.prompts} x {a.group} rows, {a.max_new} new tokens, warm-up {a.warmup}")
    print("| arm | rollout s | process CPU s | s to 1st decode step | decode ms/step by quarter "
          "| peak alloc / reserved / device used GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arm']} | failed: {r['error']} | | | | |")
            continue
        mem = " / ".join(str(r.get(k, "–")) for k in ("peak_alloc_gib", "reserved_gib", "device_used_gib"))
        quarters = " ".join(map(str, r["decode_ms_by_quarter"]))
        print(f"| {r['arm']} | {r['rollout_s']} | {r.get('cpu_s', '–')} | {r['to_first_decode_s']} | {quarters} | {mem} |")
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            print(f"\n{r['arm']}: forwards {prof['forwards']}\n{prof['by_device_time']}\n{prof['by_cpu_time']}")


if __name__ == "__main__":
    main()
