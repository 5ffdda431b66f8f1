"""The vLLM rollout options of a run config checked against each other and the rest of the run (RunConfig calls this
for a run on the vllm engine, before anything runs). Each refusal names the field, why, and what would do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.config.run import RunConfig


# rollout.quantization `same`: the vLLM in-flight quantization that matches each trainer format
VLLM_SAME = {"bf16": None, "nf4": "bitsandbytes", "fp8": "fp8"}
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks


def check_vllm_options(cfg: RunConfig) -> None:
    r, lora = cfg.rollout, cfg.train.trainable == "lora"
    if r.colocation == "server" and not lora:
        raise ValueError("rollout.colocation: server syncs LoRA adapters over HTTP; vLLM's server has no endpoint to replace "
                         "full weights, so train.trainable: full needs colocation colocated (weights pushed in-process)")
    if r.lora_sync == "merged":
        why = ("train.trainable is full" if not lora else "colocation is server (no endpoint replaces weights)"
               if r.colocation == "server" else f"quant is {cfg.quant}" if cfg.quant != "bf16" else
               f"vLLM's weights are {cfg.vllm_quantization}" if cfg.vllm_quantization else
               "rollout_model is set" if r.rollout_model else None)
        if why:
            raise ValueError(f"rollout.lora_sync: merged writes base + adapter into vLLM's unquantized copy of the "
                             f"trainer's LoRA base, colocated; here {why} (valid: lora_sync adapter)")
    else:  # vLLM's LoRA slots bound the adapter only where vLLM loads one
        if lora and r.max_lora_rank is not None and r.max_lora_rank < cfg.lora.r:
            raise ValueError(f"rollout.max_lora_rank {r.max_lora_rank} is below lora.r {cfg.lora.r}: "
                             "vLLM could not load the adapter")
        if cfg.lora.r > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"lora.r {cfg.lora.r} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]} "
                             "(rollout.lora_sync: merged has no such bound)")
    if r.max_model_len is not None and r.max_model_len <= r.max_new_tokens:
        # vLLM stops a sequence at max_model_len without an error: completions would be cut short silently
        raise ValueError(f"rollout.max_model_len {r.max_model_len} leaves no room for a prompt and "
                         f"rollout.max_new_tokens {r.max_new_tokens}: give the longest prompt + max_new_tokens")
    if r.quantization == "same" and r.rollout_model is None and cfg.quant not in VLLM_SAME:
        raise ValueError(f"rollout.quantization: same: vLLM has no in-flight equivalent of {cfg.quant}; choose one of "
                         "bf16, bitsandbytes, fp8, or give rollout.rollout_model (e.g. a pre-quantized export)")
