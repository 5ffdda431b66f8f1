"""Models: `builtin:<name>` (registries.MODELS, made locally) or any HF id / local HF folder,
loaded with the run's quantization and wrapped with LoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from harness.config import RunConfig
from harness.registries import MODELS, QUANT


def resolve(model: str) -> str:
    """A path or HF id that `from_pretrained` accepts."""
    if model.startswith("builtin:"):
        return str(MODELS.get(model.removeprefix("builtin:"))())
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def load_policy(cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    """(peft model, tokenizer): the quantized, frozen base with trainable LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(cfg.model)
    fmt = QUANT.get(cfg.quant)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        quantization_config=fmt.hf_quantization_config(dtype),
        device_map={"": device},
    )
    for module in model.modules():
        # bitsandbytes 0.50 repacks a 4-bit layer for an inference-only CPU kernel the first time
        # it runs in eval mode and never unpacks it on train(); after the first held-out evaluation
        # every training forward would then go through that kernel. RL alternates the two modes.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if fmt.quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules if cfg.lora.target_modules == "all-linear" else list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    # peft keeps the adapters in float32 whatever the base's dtype: AdamW steps of ~1e-3 on
    # bf16 weights would round away, and every format then trains the same adapter numerics.
    return get_peft_model(model, lora), tokenizer
