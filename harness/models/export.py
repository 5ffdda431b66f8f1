"""`harness export RUN`: the trained policy as a plain BF16 HF checkpoint.

The LoRA adapter is merged into the *dequantized* base, never into 4-bit storage: the base the
adapter was trained against is the quantized one (NF4, INT8, ModelOpt fake quant), so its
dequantized weights plus the merged adapter compute what the run trained, in a format every
tool loads. With `trainable: full` the trained weights are taken, dequantized the same way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from harness.config.run import RunConfig
from harness.models import checkpoint
from harness.models.loading import load_policy, resolve
from harness.registries import QUANT
from harness.results.layout import read_json


def run_dtype(run_dir: Path) -> torch.dtype:
    """The dtype the run computed in (summary.json), so the export reproduces what was trained:
    fake-quantizing float32 weights rounds differently than bf16 ones. bf16 when unrecorded."""
    summary = run_dir / "summary.json"
    name = read_json(summary).get("compute_dtype") if summary.exists() else None
    return getattr(torch, name) if name in ("bfloat16", "float16", "float32") else torch.bfloat16


def dequantized_weight(module) -> torch.Tensor | None:
    """The weight a quantized linear computes with, in full precision; None if not quantized."""
    cls, weight = type(module).__name__, getattr(module, "weight", None)
    if type(module).__module__.startswith("bitsandbytes"):
        import bitsandbytes.functional as F

        if cls == "Linear4bit":
            return F.dequantize_4bit(weight.data, weight.quant_state)
        if cls == "Linear8bitLt":
            return F.int8_vectorwise_dequant(weight.data, weight.SCB)
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is not None and quantizer.is_enabled:
        with torch.no_grad():
            return quantizer(weight)
    return None


def export(run_dir: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not checkpoint.saved_step(run_dir) > 0:
        raise ValueError(f"{run_dir}: no checkpoint in adapter/ to export")
    cfg = RunConfig.model_validate(read_json(run_dir / "config.json"))
    device, dtype = torch.device("cpu"), run_dtype(run_dir)
    trained, tokenizer = load_policy(cfg, device, dtype)
    params = [p for p in trained.parameters() if p.requires_grad]
    step = checkpoint.restore(run_dir, trained, torch.optim.AdamW(params), random.Random())

    plain = AutoModelForCausalLM.from_pretrained(resolve(cfg.model), dtype=dtype)
    inner = trained.get_base_model() if checkpoint.is_peft(trained) else trained
    if not checkpoint.is_peft(trained):  # every weight trained: start from the trained ones
        plain.load_state_dict({k: v for k, v in inner.state_dict().items() if k in plain.state_dict()}, strict=False)
    with torch.no_grad():
        for name, module in inner.named_modules():
            weight = dequantized_weight(module)
            if weight is not None:
                plain.get_submodule(name.removesuffix(".base_layer")).weight.copy_(weight.to(dtype))
    if checkpoint.is_peft(trained):
        plain = PeftModel.from_pretrained(plain, run_dir / "adapter").merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    fmt = QUANT.get(cfg.quant)
    if fmt.fake_quant:  # a ModelOpt format: its fake quantizers are exported too
        from modelopt.torch.export import export_hf_checkpoint

        from harness.quant.modelopt import calibration_loop, quantize

        if checkpoint.is_peft(trained):
            quantize(plain, fmt.resolve_config(cfg.modelopt.quant_cfg, device), calibration_loop(plain, cfg, device))
            inner = plain
        # workaround(modelopt 0.47): dtype given explicitly: after peft's merge the config carries it as a
        # string, which ModelOpt then passes to Tensor.to() as a device name
        export_hf_checkpoint(inner, dtype=dtype, export_dir=out / "modelopt")
    (out / "export.json").write_text(json.dumps({
        "run_id": cfg.run_id, "step": step, "quant": cfg.quant, "trainable": cfg.train.trainable,
        "how": "adapter merged into the dequantized base" if checkpoint.is_peft(trained) else "trained weights, dequantized",
    }, indent=2))
    return out
