"""bench/scale.py's raw-vLLM sides (`vllm`, `vllm-lora`, their eager twins): LLM.generate alone, the limit a side's
rollout tokens/s is held against, and the random adapter the LoRA ones serve."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch
from scale_measure import device_used, peak_alloc, reset_peak, vllm_checkpoint
from scale_sides import SIDES, config, gvt

from harness.common.numbers import median
from harness.common.system import compute_dtype


def random_adapter(spec: dict, r: int, alpha: float) -> Path:
    """A LoRA adapter of rank r on every linear layer of the model with small random weights, as peft saves one
    (what the harness hands vLLM each sync), made from the config on the meta device: no weights are loaded."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.models.loading import resolve

    out = Path(spec["work"]) / "adapters" / f"{spec['model'].replace(':', '-').replace('/', '-')}-r{r}"
    if (out / "adapter_config.json").exists():
        return out
    source = resolve(spec["model"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    state = get_peft_model_state_dict(get_peft_model(model, lora))
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    lora.base_model_name_or_path = source
    lora.save_pretrained(str(out))
    return out


def raw_side(spec: dict, device: torch.device) -> dict:
    """vLLM's LLM.generate alone: the harness's engine arguments (sleep off), the harness's 16 prompts x 8 as token
    ids, the same max tokens and temperature, ignore_eos; a "step" is one generate call of all of them."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as the colocated sides have it
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from harness.chat import model_task
    from harness.models.loading import load_tokenizer, resolve
    from harness.rollout.hf import encode_prompts
    from harness.rollout.vllm import engine_args

    _, opts = SIDES[spec["side"]]
    cfg = config(spec)
    dtype = compute_dtype(device, cfg.train.dtype)
    args = engine_args(cfg, vllm_checkpoint(cfg, device), dtype, sleep=False, device=device)
    if not opts["lora"]:
        for k in ("enable_lora", "max_lora_rank", "max_loras"):
            args.pop(k, None)
    adapter = random_adapter(spec, cfg.lora.r, cfg.lora.alpha) if opts["lora"] else None
    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    task = model_task(cfg.task, tokenizer, cfg.model)
    problems = random.Random(cfg.seed).sample(task.train, spec["prompts"])
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in problems for _ in range(spec["group"])], torch.device("cpu"))
    prompts = [TokensPrompt(prompt_token_ids=i[m.bool()].tolist()) for i, m in zip(ids, mask)]
    t0 = time.perf_counter()
    llm = LLM(**args)
    start_s = time.perf_counter() - t0
    request = LoRARequest("random", 1, str(adapter)) if adapter else None
    # logprobs=0: the sampled token's log-prob, which the harness asks for too
    params = SamplingParams(max_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
                            ignore_eos=True, logprobs=0)
    seconds, tokens, used, cached = [], [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            reset_peak(device)
        # a repeated batch would find its prompts' KV blocks cached by the call before (vLLM's prefix caching, on by
        # default), as no RL step does: each draws new prompts and, in the harness, a new adapter. Within the call
        # a group's copies still share their prompt's blocks, as the harness's do
        if not llm.reset_prefix_cache():  # vLLM refuses while requests run: none should be here
            raise RuntimeError("vLLM did not reset its prefix cache before a timed generate")
        gvt._sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        tokens.append(sum(len(o.outputs[0].token_ids) for o in outs))
        cached.append(sum(o.num_cached_tokens or 0 for o in outs))  # prompt tokens served from cached KV blocks
        used.append(device_used(device))
    timed = slice(spec["warmup"], None)
    steps = {"step_s": seconds[timed], "rollout_s": seconds[timed], "completion_tokens": tokens[timed],
             "cached_prompt_tokens": cached[timed]}
    used = [u for u in used if u is not None]  # none on a CPU (tests/test_bench_vllm_limit.py runs it there)
    out = {"per_step": steps, "device_used_gib": max(used, default=None), "peak_alloc_gib": peak_alloc(device),
           "step_s_median": median(steps["step_s"]), "rollout_s_median": median(steps["rollout_s"]),
           "completion_tokens_median": median(tokens[timed]),
           "rollout_tokens_per_s": median([t / s for t, s in zip(tokens[timed], seconds[timed])])}
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  the process ends next anyway
        pass
    # rows without `prefix_cache` (before stop 47) timed each step after an identical call, on its cached prompt blocks
    return out | {"engine_start_s": start_s, "setup_s": start_s, "engine_args": args,
                  "prefix_cache": "reset before each step"}
