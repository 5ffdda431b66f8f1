"""ModelOpt fake-quantization formats (registries.QUANT): quantization-aware RL as in NeMo RL's QARL.

The base is loaded in the compute dtype, fake-quantized by `mtq.quantize` with amax calibrated on
the task's training prompts, and trained through the quantizers (straight-through gradients):
LoRA on top by default, or every weight with `train.trainable: full`. Generation in `in_process`
mode runs the same quantized forward, so rollouts and training see the same quantization. The
calibrated amax buffers stay fixed through training (saved in checkpoints) unless
`modelopt.recalibrate_every` asks for re-calibration.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import yaml

if TYPE_CHECKING:
    import torch  # imported where used: validating a config loads the format, and must not import torch


@dataclass(frozen=True)
class ModelOptFormat:
    """A quant.base.QuantFormat."""

    name: str
    config_name: str | None  # a ModelOpt *_CFG; None: taken from modelopt.quant_cfg
    trains_full_weights: bool = True
    calibrated: bool = True
    kind: ClassVar[None] = None  # weights stay in the compute dtype: fake quantization, not bitsandbytes storage
    double_quant: ClassVar[bool] = False
    fake_quant: ClassVar[bool] = True

    def load_base(self, source: str, cfg, device, dtype):
        from harness.models.loading import load_model

        model = load_model(source, device, dtype)
        quantize(model, self.resolve_config(cfg.modelopt.quant_cfg, device), calibration_loop(model, cfg, device))
        return model

    def resolve_config(self, quant_cfg: str | None, device: torch.device) -> dict:
        import modelopt.torch.quantization as mtq

        source = self.config_name or quant_cfg
        if source.endswith((".yaml", ".yml")):
            config = yaml.safe_load(Path(source).read_text())
        else:
            names = sorted(n for n in dir(mtq) if n.endswith("_CFG"))
            if source not in names:
                close = difflib.get_close_matches(source, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"modelopt.quant_cfg: unknown ModelOpt config {source!r}{hint} Valid: {', '.join(names)}")
            config = copy.deepcopy(getattr(mtq, source))
        return route_nvfp4_to_cpu(config) if device.type == "cpu" else config


def route_nvfp4_to_cpu(config: dict) -> dict:
    """Point every NVFP4 quantizer at the pure-torch CPU backend (ModelOpt's kernel needs CUDA)."""
    # workaround(modelopt 0.47): its NVFP4 fake-quant kernel asserts CUDA; quant/nvfp4_cpu.py is the CPU stand-in
    from harness.quant import nvfp4_cpu
    nvfp4_cpu.register()
    for entry in config.get("quant_cfg", []):
        c = entry.get("cfg") if isinstance(entry, dict) else None
        if (isinstance(c, dict) and c.get("num_bits") in ((2, 1), [2, 1])
                and (c.get("block_sizes") or {}).get("type") == "dynamic"):
            c["backend"] = nvfp4_cpu.BACKEND
    return config


def quantize(model, config: dict, forward_loop) -> None:
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, config, forward_loop)


def recalibrate_if_due(model, cfg, device, step: int) -> None:
    """Re-measure amax every `modelopt.recalibrate_every` steps (0: keep the first calibration)."""
    every = cfg.modelopt.recalibrate_every
    if every and step % every == 0:
        import modelopt.torch.quantization as mtq

        # workaround(modelopt 0.47): it finds two states through the peft wrapper; the wrapped model still runs the adapters
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        mtq.calibrate(inner, algorithm="max", forward_loop=calibration_loop(inner, cfg, device))


def calibration_texts(cfg, tokenizer) -> list[str]:
    """The first `quant_calib_size` texts of `quant_calib_dataset`, or of the task's training prompts as the run
    prompts the model (chat-rendered where it is: amax is calibrated on the activations training will see)."""
    opts, n = cfg.modelopt, cfg.modelopt.quant_calib_size
    source = opts.quant_calib_dataset
    if source is None:
        from harness.chat import model_task

        return [p.prompt for p in model_task(cfg.task, tokenizer, cfg.model).train[:n]]
    if Path(source).exists():
        rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        try:
            import datasets
        except ImportError:
            raise ValueError(f"modelopt.quant_calib_dataset {source!r} is not a file; "
                             "an HF dataset needs `pip install quant-rl-harness[eval]`") from None
        rows = datasets.load_dataset(source, split="train").select(range(n))
    texts = [r.get("text") or r.get("prompt") or r.get("question") for r in list(rows)[:n]]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"modelopt.quant_calib_dataset {source}: every row needs a 'text', 'prompt' or 'question' string")
    return texts


def calibration_loop(model, cfg, device):
    """A forward loop over the calibration texts, batched and truncated as NeMo RL's knobs say."""
    import torch

    from harness.models.loading import load_tokenizer, resolve

    opts = cfg.modelopt
    tokenizer = load_tokenizer(resolve(cfg.model), cfg.model)
    tokenizer.padding_side = "left"
    texts = calibration_texts(cfg, tokenizer)

    @torch.no_grad()
    def loop(m):
        for i in range(0, len(texts), opts.quant_batch_size):
            enc = tokenizer(texts[i : i + opts.quant_batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=opts.quant_sequence_length, add_special_tokens=False).to(device)
            m(**enc)

    return loop


NVFP4_W4A16 = ModelOptFormat("nvfp4_w4a16", "W4A16_NVFP4_CFG")
NVFP4_W4A4 = ModelOptFormat("nvfp4_w4a4", "NVFP4_DEFAULT_CFG")
FP8 = ModelOptFormat("fp8", "FP8_DEFAULT_CFG")
INT8_SQ = ModelOptFormat("int8_sq", "INT8_SMOOTHQUANT_CFG")
INT4_AWQ = ModelOptFormat("int4_awq", "INT4_AWQ_CFG")
CUSTOM = ModelOptFormat("modelopt", None)
