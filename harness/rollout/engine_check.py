"""`harness check-engine`: before a vLLM rollout engine is trusted with a sweep, check it on the
cell's own configuration (model, format, rollout options, colocation, sleep level).

1. Sleep/wake (colocated on CUDA with sleep_mode): greedy completions before and after one
   sleep/wake cycle must be identical. Known failures elsewhere are silent: level-2 sleep
   producing gibberish, FP8 KV-cache scales lost after sleep. vLLM has no sleep mode on CPU, so
   there this part is skipped and the record says so.
2. Adapter sync: the trainer's adapter (or, with `trainable: full`, its weights) is moved by a
   fixed random perturbation and synced; vLLM samples and the trainer recomputes the sampled
   tokens' log-probs. The mean |Δ log-prob| must be within `rollout.check_tolerance`, and under
   half of the same gap measured against the stale weights, so a sync that silently did nothing
   fails even where a quantized rollout needs a loose tolerance.

Each result is cached by its configuration key in <results>/<matrix>/engine_checks/<key>.json;
a sweep runs the check before the first run of each key and records a failed check as the runs'
error, so their cell reads "Error" with the reason instead of a misleading verdict.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from harness.common.files import write_json_atomic
from harness.config.run import RunConfig
from harness.results.layout import read_json

PLANTS = ("stale-adapter",)  # faults a user can plant to see the check catch them


class EngineCheckFailed(RuntimeError):
    pass


def check_key(cfg: RunConfig, device: torch.device) -> str:
    """What the check depends on: not the seed, the task or the training budget."""
    from harness.rollout.vllm import vllm_version

    d = cfg.model_dump(mode="json")
    key = {k: d[k] for k in ("model", "quant", "modelopt", "lora", "rollout")} | {
        "trainable": cfg.train.trainable, "dtype": cfg.train.dtype, "device": device.type, "vllm": vllm_version()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cached(cfg: RunConfig, root: Path, device: torch.device, force: bool = False) -> tuple[Path, dict]:
    """(its file, the check's record) for this configuration, from root/engine_checks/ unless `force`, absent
    or failed for a passing reason (an engine that could not start while a neighbour freed GPU memory); then the
    check runs and is saved there."""
    path = root / "engine_checks" / f"{check_key(cfg, device)}.json"
    if path.exists() and not force and not (record := read_json(path)).get("transient"):
        return path, record
    record = check_in_right_process(cfg, device, root / "engine_checks")
    write_json_atomic(path, record)
    return path, record


def require(cfg: RunConfig, root: Path, device: torch.device) -> dict:
    """The cached check for this configuration, run first if there is none; raises when it failed."""
    path, record = cached(cfg, root, device)
    if not record["ok"]:
        raise EngineCheckFailed(f"engine check failed ({path}): {'; '.join(record['failures'])}")
    return record


def check_in_right_process(cfg: RunConfig, device: torch.device, workdir: Path, plant: str | None = None) -> dict:
    """run_check, in a process of its own where the engine needs one (executor.own_process_needed)."""
    from harness.execution.isolation import in_own_process, own_process_needed

    if own_process_needed(cfg, device):
        return in_own_process(run_check, cfg, device, workdir, plant)
    return run_check(cfg, device, workdir, plant)


def perturb(model, lora: bool, seed: int = 0, scale: float = 0.05) -> None:
    """Move the trained weights far enough that a stale engine is obvious: LoRA B (zero at the
    start) gets N(0, scale); full weights get `scale` of their own spread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad or (lora and "lora_B" not in name):
                continue
            noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.add_(noise * (scale if lora else scale * p.float().std().item()))


def run_check(cfg: RunConfig, device: torch.device, workdir: Path, plant: str | None = None, n_prompts: int = 64) -> dict:
    """Build the trainer and its vLLM engine as a run would, and check them (see the module doc)."""
    from harness.chat import model_task
    from harness.common.system import compute_dtype
    from harness.models.loading import load_policy, reference
    from harness.recipes.rl_math import completion_logprobs, mismatch_metrics
    from harness.rollout.hf import HFEngine
    from harness.rollout.vllm import TRANSIENT_START_FAILURE, VLLMEngine

    t0 = time.perf_counter()
    record = {"ok": False, "failures": [], "plant": plant, "colocation": cfg.rollout.colocation, "quant": cfg.quant,
              "vllm_quantization": cfg.vllm_quantization or "none", "tolerance": cfg.rollout.check_tolerance}
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg, device, compute_dtype(device, cfg.train.dtype))
    prompts = [p.prompt for p in model_task(cfg.task, tokenizer, cfg.model).eval[:n_prompts]]
    try:
        engine = VLLMEngine(model, tokenizer, cfg, device, workdir)
    except Exception as e:  # an engine that cannot start fails its check with the reason
        record["failures"].append(f"vLLM did not start: {type(e).__name__}: {e}"[:1500])
        record["transient"] = TRANSIENT_START_FAILURE in str(e)  # not kept: checked again by the next run
        return record | {"seconds": round(time.perf_counter() - t0, 1)}
    try:
        record |= {"engine": engine.facts}
        greedy = engine.generate(prompts, greedy=True).texts
        trainer_greedy = HFEngine(model, tokenizer, cfg).generate(prompts, greedy=True).texts
        record["greedy_agreement_with_trainer"] = sum(a == b for a, b in zip(greedy, trainer_greedy)) / len(prompts)
        if engine.sleeps:
            engine.release()
            freed = engine.pop_metrics().get("memory/sleep_freed_gib")
            after = engine.generate(prompts, greedy=True).texts
            same = sum(a == b for a, b in zip(greedy, after))
            record["sleep"] = {"level": cfg.rollout.sleep_level, "freed_gib": freed, "identical": same, "of": len(prompts)}
            if same != len(prompts):
                bad = next(i for i, (a, b) in enumerate(zip(greedy, after)) if a != b)
                record["failures"].append(f"greedy output changed after sleep(level={cfg.rollout.sleep_level})/wake_up in "
                                          f"{len(prompts) - same}/{len(prompts)} prompts, e.g. {greedy[bad]!r} -> {after[bad]!r}")
        else:
            record["sleep"] = engine.facts["hand_off"]

        perturb(model, lora=cfg.train.trainable == "lora")
        if plant == "stale-adapter":
            engine.mark_synced()  # the fault: vLLM keeps the adapter it had
        batch = engine.generate(prompts * 4)
        args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, cfg.rollout.temperature)
        # vLLM reports log-probs of the truncated distribution it sampled from: the trainer's are taken under the same
        # top-k / top-p, or a truncating config would read as a mismatch (rl_math.truncated_logprobs)
        r = cfg.rollout
        truncation = (r.top_k, r.top_p) if r.top_k or r.top_p < 1 else None
        with torch.no_grad():
            trainer_logp = completion_logprobs(model, *args, truncation=truncation, with_entropy=False)[-1 if truncation else 0]
            with reference(model) as stale:
                stale_logp = completion_logprobs(stale, *args, truncation=truncation, with_entropy=False)[-1 if truncation else 0]

        def diff_from(logp):  # mean |Δ| per token; a token outside the trainer's nucleus is left out (-inf)
            return mismatch_metrics(logp, batch.sampler_logprobs, batch.completion_mask, 2.0)["mismatch/logprob_diff_mean"]

        diff, stale_diff = diff_from(trainer_logp), diff_from(stale_logp)
        record |= {"logprob_diff_mean": diff, "stale_logprob_diff_mean": stale_diff}
        if diff > cfg.rollout.check_tolerance:
            record["failures"].append(f"after an adapter sync vLLM's log-probs differ from the trainer's by {diff:.4f} per token "
                                      f"(rollout.check_tolerance {cfg.rollout.check_tolerance})")
        if not diff < stale_diff / 2:
            record["failures"].append(f"vLLM samples like the stale weights ({stale_diff:.4f} from them, {diff:.4f} from the "
                                      "trainer's): the sync did not take effect")
    except Exception as e:  # e.g. a wake-up that cannot restore the weights: the engine fails its check, with the reason
        record["failures"].append(f"{type(e).__name__}: {e}"[:1500])
    finally:
        engine.close()
    record["ok"] = not record["failures"]
    return record | {"seconds": round(time.perf_counter() - t0, 1)}
