"""The sides of bench/scale.py, each run by `bench/scale.py --one SPEC` in a process of its own (a fresh CUDA
allocator and vLLM engine per side). A side returns one row: its per-step lists, their medians over the timed steps,
memory, setup and engine-start times, model FLOPs and MFU of the train phase (bench/scale.py's docstring defines them).
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from pydantic import ValidationError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpo_vs_trl as gvt  # noqa: E402
import scale_profile  # noqa: E402
from scale_measure import device_used, reset_peak, summarize, vllm_checkpoint  # noqa: E402

from harness.common.system import compute_dtype, device_name  # noqa: E402
from harness.common.validation import validation_problems  # noqa: E402
from harness.config.run import RunConfig  # noqa: E402

# side -> (kind, options). harness / trl: a GRPO step; vllm*: raw LLM.generate, no trainer around it
SIDES = {
    "harness": ("harness", {"colocation": "in_process"}),
    "trl": ("trl", {"vllm": False}),
    "harness-vllm": ("harness", {"colocation": "colocated", "enforce_eager": False}),
    "harness-vllm-eager": ("harness", {"colocation": "colocated", "enforce_eager": True}),
    # the adapter merged into vLLM's weights at each sync (rollout.lora_sync: merged): no LoRA kernels in the decode
    "harness-vllm-merged": ("harness", {"colocation": "colocated", "enforce_eager": False, "lora_sync": "merged"}),
    "trl-vllm": ("trl", {"vllm": True}),
    # diagnostic (scale_rows.DIAGNOSTIC_SIDES): no cuDNN attention anywhere in the step (step_attention)
    "harness-nocudnn": ("harness", {"colocation": "in_process", "attention": "no-cudnn"}),
    "trl-nocudnn": ("trl", {"vllm": False, "attention": "no-cudnn"}),
    "vllm": ("raw", {"lora": False, "enforce_eager": False}),
    "vllm-eager": ("raw", {"lora": False, "enforce_eager": True}),
    "vllm-lora": ("raw", {"lora": True, "enforce_eager": False}),
    "vllm-lora-eager": ("raw", {"lora": True, "enforce_eager": True}),
}


def uses_vllm(side: str) -> bool:
    kind, opts = SIDES[side]
    return kind == "raw" or opts.get("vllm", False) or opts.get("colocation") == "colocated"


def step_attention(side: str):
    """The SDPA backends a side's whole step may use: PyTorch's own choice (cuDNN first on an H100) in training, or,
    for the -nocudnn sides, the harness's decode set (rollout.hf.DECODE_ATTENTION) in training too."""
    if SIDES[side][1].get("attention") != "no-cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    from harness.rollout.hf import DECODE_ATTENTION

    return sdpa_kernel(list(DECODE_ATTENTION))


def config(spec: dict) -> RunConfig:
    """The harness's config of this work: grpo_vs_trl's (every loss and optimizer knob spelled out) with the
    model, task, lengths, batch, gradient checkpointing and the side's rollout engine of this benchmark."""
    kind, opts = SIDES[spec["side"]]
    base = gvt.run_config(spec["quant"], spec["warmup"] + spec["steps"]).model_dump(mode="json")
    base["model"] = spec["model"]
    base["task"] = {"name": spec["task"], "eval_size": 16 if spec.get("data") else 500} | (
        {"source": spec["data"]} if spec.get("data") else {})
    rollout = {"colocation": opts.get("colocation", "colocated" if kind == "raw" else "in_process"),
               "max_new_tokens": spec["max_new"], "gpu_memory_utilization": spec["gpu_memory_utilization"]}
    if "enforce_eager" in opts:
        rollout["enforce_eager"] = opts["enforce_eager"]
    if "lora_sync" in opts:
        rollout["lora_sync"] = opts["lora_sync"]
    if spec.get("max_model_len"):
        rollout["max_model_len"] = spec["max_model_len"]
    base["rollout"] = {k: base["rollout"][k] for k in ("temperature", "top_p")} | rollout
    base["train"] |= {"prompts_per_step": spec["prompts"], "group_size": spec["group"], "gradient_checkpointing": True}
    if spec.get("micro_batch"):
        base["train"]["micro_batch_size"] = spec["micro_batch"]
    return RunConfig.model_validate(base)


def run(spec: dict) -> dict:
    """One side, never raising: a failure is the row's status with the error's last lines."""
    kind, _ = SIDES[spec["side"]]
    row = {k: spec[k] for k in ("model", "quant", "max_new", "side")} | {"status": "ok"}
    device = torch.device(spec["device"])
    row["device"] = device_name(device)
    if device.type == "cuda":  # the card itself: bench/scale.py pairs rows of one machine only (two H100s: 1.47x)
        row["machine"] = str(torch.cuda.get_device_properties(device).uuid)
    try:
        config(spec)
    except ValidationError as e:  # a side the harness refuses for this work (merged weights of an nf4 base): its reason
        return row | {"status": "skipped", "error": "; ".join(validation_problems(e, RunConfig))[:600]}
    if uses_vllm(spec["side"]):
        if device.type != "cuda":
            return row | {"status": "skipped", "error": "no CUDA"}
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            return row | {"status": "skipped", "error": f"vLLM not importable: {e}"}
    if kind == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as e:
            return row | {"status": "skipped", "error": f"TRL not importable: {e}"}
    try:
        from scale_raw import raw_side

        row |= {"harness": harness_side, "trl": trl_side, "raw": raw_side}[kind](spec, device)
    except Exception as e:  # noqa: BLE001  an OOM or a vLLM assertion is this side's result, not the bench's end
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)  # whole, into the side's log
        where = traceback.extract_tb(e.__traceback__)[-1]  # a bare `assert` says nothing: where it failed does
        message = str(e) or f"at {'/'.join(Path(where.filename).parts[-3:])}:{where.lineno}: {where.line}"
        row |= {"status": "crashed", "error": f"{type(e).__name__}: {message}"[:600],
                "traceback": "".join(trace.splitlines(keepends=True)[-12:])}
        if getattr(e, "profiles", None):
            row["profile"] = e.profiles
    return row


# --- the sides

def harness_side(spec: dict, device: torch.device) -> dict:
    """The recipe itself (grpo.run), as grpo_vs_trl.time_harness runs it, its metrics kept in memory."""
    from harness.recipes import grpo

    cfg = config(spec)
    if cfg.rollout.engine == "vllm":
        vllm_checkpoint(cfg, device)
    warmup, total = spec["warmup"], spec["warmup"] + spec["steps"]
    stamps, used, facts, tracker, profiles = [], [], {}, gvt._Rows(), []
    originals = {name: getattr(grpo, name) for name in ("setup", "log_start", "sample_groups", "end_train")}

    def setup(ctx):
        t0 = time.perf_counter()
        s = originals["setup"](ctx)
        facts.update(s.facts, setup_s=time.perf_counter() - t0)  # run() never returns them: _Done stops it
        return s

    def log_start(s):
        # the step-0 held-out evaluation is no step's work and, greedy at 7B x 1024 tokens, minutes of device time;
        # a fresh folder has no checkpoint to resume, so there is nothing else log_start would do
        if warmup == 0:
            reset_peak(device)
        gvt._sync(device)
        stamps.append(time.perf_counter())
        return 0

    def progress(step, **_):
        gvt._sync(device)
        stamps.append(time.perf_counter())
        used.append(device_used(device))
        if step == warmup:
            reset_peak(device)
        if step == total:
            raise gvt._Done

    running, seen = [], set()  # --profile-train: this step's profiler (rollout's end to end_train); shapes so far

    def sample_groups(s):
        sampled = originals["sample_groups"](s)
        if spec.get("profile_train"):  # warm-up steps too: a shape's first call in the process may be one of theirs
            gvt._sync(device)  # the rollout's kernels stay out of the train phase's profile
            running.append(scale_profile.profiler(device))
            running[-1].start()
        return sampled

    def end_train(s, step, t0):
        train = originals["end_train"](s, step, t0)
        if running:
            gvt._sync(device)
            prof = running.pop()
            prof.stop()
            profiles.append(scale_profile.summary(prof, step, train[0], step <= warmup, seen))
            print(scale_profile.line(profiles[-1]), file=sys.stderr, flush=True)  # the side's log
        return train

    patched = {"setup": setup, "log_start": log_start, "sample_groups": sample_groups, "end_train": end_train}
    for name, fn in patched.items():
        setattr(grpo, name, fn)
    try:
        with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
            with step_attention(spec["side"]):
                grpo.run(cfg, Path(tmp), tracker, device, progress)
    except gvt._Done:
        pass
    except Exception as e:
        e.profiles = profiles  # run() keeps the finished steps' profiles in the crashed row
        raise
    finally:
        for name, fn in originals.items():
            setattr(grpo, name, fn)
        for prof in running:  # a train phase that raised: its profiler stops with it
            prof.stop()
    timed = range(warmup + 1, total + 1)
    rows = [tracker.rows[s] for s in timed]
    n = spec["prompts"] * spec["group"]
    steps = {"step_s": [stamps[s] - stamps[s - 1] for s in timed],
             "rollout_s": [r["time/rollout_s"] for r in rows], "sync_s": [r.get("time/sync_s", 0.0) for r in rows],
             "train_s": [r["time/train_s"] for r in rows],
             "wake_s": [r.get("time/wake_s", 0.0) for r in rows], "sleep_s": [r.get("time/sleep_s", 0.0) for r in rows],
             "completion_tokens": [r["completion_length"] * n for r in rows],
             "train_tokens": [r["throughput/train_tokens_per_s"] * r["time/train_s"] for r in rows],
             "rollout_peak_gib": [r["memory/rollout_peak_gib"] for r in rows],
             "train_peak_gib": [r["memory/train_peak_gib"] for r in rows]}
    used += [r.get("memory/device_used_gib") for r in rows]
    out = summarize(steps, spec, device, used)
    # the harness's own tokens/s (generation alone) is the same number from the same clock
    return out | {"setup_s": facts.get("setup_s"), "engine_start_s": facts.get("engine_start_s"),
                  "hand_off": facts.get("hand_off"), "run_config": cfg.model_dump(mode="json")} | (
        {"profile": profiles} if spec.get("profile_train") else {})


class _Timer(gvt._StepTimer):
    """grpo_vs_trl's step timer plus, per step: generation and weight-sync seconds (from the wrapped methods),
    prompt + completion tokens (TRL's num_input_tokens_seen), device memory."""

    def __init__(self, device: torch.device, warmup: int):
        super().__init__(device)
        self.warmup, self.gen, self.sync, self.tokens, self.used = warmup, [], [], [], []
        self._gen = self._sync_s = 0.0
        self._seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup == 0:
            reset_peak(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        self._gen = self._sync_s = 0.0
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.gen.append(self._gen)
        self.sync.append(self._sync_s)
        self.tokens.append(state.num_input_tokens_seen - self._seen)
        self._seen = state.num_input_tokens_seen
        self.used.append(device_used(self.device))
        if len(self.end) == self.warmup:
            reset_peak(self.device)

    def wrap(self, obj, name: str, slot: str | None, after=None) -> None:
        """obj.name timed into self.<slot> (summed over the step's calls); `after` runs when it returns."""
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            gvt._sync(self.device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    after()
                gvt._sync(self.device)
                if slot:
                    setattr(self, slot, getattr(self, slot) + time.perf_counter() - t0)

        setattr(obj, name, timed)


def harness_prompt_order(cfg: RunConfig, n: int, steps: int) -> list[int]:
    """The prompts (indices of the task's `n`) the harness's recipe draws in its first `steps` steps, in order (its
    seeded recipes.common.draw_problems). TRL's RepeatSampler, unshuffled, reads them prompts_per_step at a time."""
    from harness.recipes.common import draw_problems

    rng = random.Random(cfg.seed)
    return [i for _ in range(steps) for i in draw_problems(rng, list(range(n)), cfg.train.prompts_per_step)]


def trl_side(spec: dict, device: torch.device) -> dict:
    """TRL's GRPOTrainer on the same work, set up as grpo_vs_trl.time_trl sets it up (the harness's loader, the
    same LoraConfig, trl_args), plus gradient checkpointing, this benchmark's task and, for trl-vllm, colocated vLLM."""
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from harness.chat import model_task
    from harness.models.loading import load_tokenizer, resolve
    from harness.registries import QUANT

    _, opts = SIDES[spec["side"]]
    cfg = config(spec | {"side": "harness-vllm" if opts["vllm"] else "harness"})  # its engine settings, for trl-vllm
    warmup, total = spec["warmup"], spec["warmup"] + spec["steps"]
    source, dtype = resolve(cfg.model), compute_dtype(device, cfg.train.dtype)
    weights = vllm_checkpoint(cfg, device) if opts["vllm"] else None
    engine = {}
    if opts["vllm"]:
        from trl.generation import vllm_generation

        original_init = vllm_generation.VLLMGeneration._init_vllm

        def init_vllm(self):  # workaround(trl 1.16): the engine starts inside GRPOTrainer.__init__; timed apart
            t0 = time.perf_counter()
            original_init(self)
            engine["start_s"] = time.perf_counter() - t0

        vllm_generation.VLLMGeneration._init_vllm = init_vllm
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(source, cfg.model)
    torch.manual_seed(cfg.seed)
    model = QUANT.get(cfg.quant).load_base(source, cfg, device, dtype)
    if weights:
        model.name_or_path = weights  # TRL starts vLLM from model.name_or_path; a shape's folder holds no weights
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    task = model_task(cfg.task, tokenizer, cfg.model)
    # workaround(datasets 5.2, Python 3.12): hashing a new table for its fingerprint fails in dill ("Can't pickle
    # <class 'MonthDayNano'>"); a fingerprint given skips the hashing
    # each step the harness's prompts (shuffle_dataset off): drawn apart, the sides' left-padded batches differed in
    # width by chance (stop 40's 7B nf4 1024 pair: 657 against 484 tokens), and the decode's attention with them
    order = harness_prompt_order(cfg, len(task.train), total)
    dataset = Dataset(InMemoryTable.from_pydict({"prompt": [task.train[i].prompt for i in order], "index": order}),
                      fingerprint=f"scale-prompts-{cfg.seed}-{total}")

    def reward(prompts, completion_ids, index, **_):
        # decoded as the harness decodes (up to eos, special tokens kept), then the task's own reward
        texts = [tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids, skip_special_tokens=False)
                 for ids in completion_ids]
        return [task.reward(task.train[i], t) for i, t in zip(index, texts)]

    n = spec["prompts"] * spec["group"]
    timer = _Timer(device, warmup)
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        args = gvt.trl_args(cfg, device, total, tmp) | {"gradient_checkpointing": True, "shuffle_dataset": False}
        if spec.get("micro_batch"):  # one generation of n completions per optimizer step, its gradient accumulated
            parts = n // spec["micro_batch"]
            args |= {"per_device_train_batch_size": spec["micro_batch"], "gradient_accumulation_steps": parts,
                     "steps_per_generation": parts}
        if opts["vllm"]:
            # the harness's engine settings where TRL has them; its IS correction off, as the harness (no tis_cap)
            # takes old log-probs from the first update's forward and scores no extra forward
            args |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": cfg.rollout.sleep_mode,
                     "vllm_gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
                     "vllm_max_model_length": cfg.rollout.max_model_len,
                     "vllm_importance_sampling_correction": False}
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**args), train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer], peft_config=lora)
        setup_s = time.perf_counter() - t0
        # workaround(trl 1.16): as grpo_vs_trl.time_trl, the quantized model's adapters back to float32 (TRL casts to bf16)
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        timer.trainer = trainer
        # workaround(trl 1.16): generation (with the weight sync, when vLLM's weights are stale) is this private method
        timer.wrap(trainer, "_generate_single_turn", "_gen")
        if opts["vllm"]:
            timer.wrap(trainer.vllm_generation, "sync_weights", "_sync_s")
            # read before TRL puts vLLM back to sleep, inside its generate
            timer.wrap(trainer.vllm_generation.llm, "generate", None, after=lambda: timer.used.append(device_used(device)))
        with step_attention(spec["side"]):
            trainer.train()
    timed = slice(warmup, total)
    step_s = [e - b for b, e in zip(timer.begin, timer.end)][timed]
    gen, sync = timer.gen[timed], timer.sync[timed]
    rollout = [g - s for g, s in zip(gen, sync)]
    steps = {"step_s": step_s, "rollout_s": rollout, "sync_s": sync,
             "train_s": [st - g for st, g in zip(step_s, gen)],
             "completion_tokens": [x * n for x in timer.lengths[timed]], "train_tokens": timer.tokens[timed]}
    out = summarize(steps, spec, device, timer.used)
    return out | {"setup_s": setup_s, "engine_start_s": engine.get("start_s"),
                  "trl_args": {k: v for k, v in args.items() if k != "output_dir"}}
