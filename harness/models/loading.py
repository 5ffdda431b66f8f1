"""Models: `builtin:<name>` (registries.MODELS, made locally), `shape:<name>` (registries.SHAPES: a released
architecture with random weights, models/shape.py) or any HF id / local HF folder, loaded with the run's
quantization and wrapped with LoRA."""

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
    if model.startswith("shape:"):
        from harness.models import shape

        return str(shape.folder(model.removeprefix("shape:")))
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def identity(model: str) -> dict:
    """Which weights a run trained: the name and, where the weights are a local folder of at most
    100 MB (the built-in models, a small local checkpoint), their sha256. Large or remote models are
    named only: hashing gigabytes per run would cost more than the run's first steps. A shape has no
    weights to hash: its facts say so (random_weights, the shape, its parameter count, its tokenizer)."""
    from harness.models import shape

    out = {"name": model}
    folder = Path(resolve(model))
    if shape.is_shape(folder):  # `shape:<name>`, or a copy of its folder
        return out | shape.facts(folder)
    weights = folder / "model.safetensors"
    if weights.is_file() and weights.stat().st_size <= 100 * 2**20:
        from harness.models.tiny_arith import SHIPPED, checksum

        out["sha256"] = checksum(folder)
        if folder == SHIPPED:
            out["shipped"] = SHIPPED.name
    return out


def load_model(source: str, device: torch.device, dtype: torch.dtype, quantization_config=None):
    """`AutoModelForCausalLM.from_pretrained(source)` on `device` in `dtype`, quantized at load as
    `quantization_config` (BitsAndBytesConfig) says; for a shape's folder, its random weights made in place
    (models/shape.py): no checkpoint is read or written. What every format's load_base calls."""
    from harness.models import shape

    if shape.is_shape(source):
        return shape.load(source, device, dtype, quantization_config)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=quantization_config,
                                                device_map={"": device})


def checkpoint(source: str, device: torch.device, dtype: torch.dtype) -> str:
    """A folder of weights that vLLM can read for `source` (what resolve gave): itself, or for a shape, its random
    weights as the trainer on `device` makes them in `dtype`, written once (models/shape.py)."""
    from harness.models import shape

    return str(shape.weights(source, device, dtype)) if shape.is_shape(source) else source


def load_tokenizer(source: str, model: str | None = None):
    """The tokenizer of `source` (what resolve gave), as its folder defines it. transformers 5's AutoTokenizer picks the
    class from config.json's model type: a folder whose tokenizer_config.json names the generic TokenizersBackend
    (the character tokenizers made here, under a qwen2 config) got Qwen2Tokenizer, whose byte-level pre-tokenizer
    dropped every space and newline of a prompt. Such a folder is loaded as its tokenizer.json says."""
    import json

    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    folder = Path(source)
    try:
        declared = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):  # an HF id, or a folder without one: transformers decides
        declared = None
    try:
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (folder / "tokenizer.json").is_file():
            tokenizer = TokenizersBackend.from_pretrained(source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:  # transformers' message names neither the field nor, offline, the id
        raise OSError(f"model {model or source!r} (an HF id, as no such folder exists) could not be loaded: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(cfg: RunConfig, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer): the quantized base with trainable LoRA adapters on top (default), or
    with every weight trainable (`train.trainable: full`, QAT through the fake quantizer)."""
    from peft import LoraConfig, get_peft_model

    source = resolve(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
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
