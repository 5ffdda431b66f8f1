"""Models: `builtin:<name>` (registries.MODELS, made locally) or any HF id / local HF folder,
loaded with the run's quantization and wrapped with LoRA."""

from __future__ import annotations

import contextlib
import copy
import weakref
from pathlib import Path

import torch

from harness.config.run import RunConfig
from harness.registries import MODELS, QUANT


def resolve(model: str) -> str:
    """A path or HF id that `from_pretrained` accepts."""
    if model.startswith("builtin:"):
        return str(MODELS.get(model.removeprefix("builtin:"))())
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def identity(model: str) -> dict:
    """Which weights a run trained: the name and, where the weights are a local folder of at most
    100 MB (the built-in models, a small local checkpoint), their sha256. Large or remote models are
    named only: hashing gigabytes per run would cost more than the run's first steps."""
    out = {"name": model}
    folder = Path(resolve(model))
    weights = folder / "model.safetensors"
    if weights.is_file() and weights.stat().st_size <= 100 * 2**20:
        from harness.models.tiny_arith import SHIPPED, checksum

        out["sha256"] = checksum(folder)
        if folder == SHIPPED:
            out["shipped"] = SHIPPED.name
    return out


def load_policy(cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): the quantized base with trainable LoRA adapters on top (default), or
    with every weight trainable (`train.trainable: full`, QAT through the fake quantizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    source = resolve(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:  # transformers' message names neither the field nor, offline, the id
        raise OSError(f"model {cfg.model!r} (an HF id, as no such folder exists) could not be loaded: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = QUANT.get(cfg.quant).load_base(source, cfg, device, dtype)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.train.trainable == "full":
        _REFERENCES[model] = copy.deepcopy(model).requires_grad_(False).eval()
        return model.requires_grad_(True), tokenizer
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


# full-weight training keeps a frozen copy of the starting model as the KL reference; kept
# beside the model rather than on it, so it is not a submodule (no optimizer, no checkpoint)
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def reference(model):
    """The model that scores reference log-probs: the same quantized base with the LoRA adapter
    disabled, or the frozen starting copy when every weight trains."""
    if model in _REFERENCES:
        yield _REFERENCES[model]
    else:
        with model.disable_adapter():
            yield model
