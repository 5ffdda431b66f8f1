"""Trainer quantization formats (registries.QUANT): a frozen quantized base under BF16 LoRA.

bitsandbytes formats quantize the base's linear layers at load; the LoRA adapters are the only
trainable parameters (QLoRA). Everything else stays in the compute dtype: embeddings, norms and
lm_head, so hidden states, the KV cache and logits are bf16 on a GPU, as in the bf16 format. The
adapters are float32 (peft's autocast_adapter_dtype; loading.load_policy says why): each LoRA branch
casts its input to float32 and its output back, so float32 is confined to the adapters' own math.
peft's prepare_model_for_kbit_training is not used: it casts every parameter that is not 4/8-bit
(embeddings, norms, lm_head) to float32, which made the whole residual stream, attention and the
logits float32 (at 1.3B on a GPU, nf4 peaked above bf16: 14.6 vs 11.9 GiB, at 1.7x its step time).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


# workaround(bitsandbytes 0.50): it logs this on every int8 matmul (24k lines in one smoke sweep), burying real output.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropCastNotice())


@dataclass(frozen=True)
class BnbFormat:
    """A quant.base.QuantFormat."""

    name: str
    kind: str | None  # None: not quantized; "int8"; or the 4-bit type "nf4"/"fp4"
    double_quant: bool = True
    calibrated: bool = False  # no amax to (re)calibrate
    fake_quant: ClassVar[bool] = False

    @property
    def quantized(self) -> bool:
        return self.kind is not None

    @property
    def trains_full_weights(self) -> bool:
        return self.kind is None  # 4- and 8-bit bitsandbytes weights are storage, not parameters

    def load_base(self, source: str, cfg, device, dtype):
        from harness.models.loading import load_model

        model = load_model(source, device, dtype, self.hf_quantization_config(dtype))
        for module in model.modules():
            # workaround(bitsandbytes 0.50): it repacks a 4-bit layer for an inference-only CPU kernel the first
            # time it runs in eval mode and never unpacks it on train(); after the first held-out evaluation
            # every training forward would then go through that kernel. RL alternates the two modes.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        if self.quantized:
            # what QLoRA needs of prepare_model_for_kbit_training: a frozen base. Gradient checkpointing
            # (loading.load_policy) is transformers' non-reentrant kind, which also makes the embeddings'
            # output require grad; the float32 upcast is left out (see the module's docstring)
            model.requires_grad_(False)
        return model

    def resolve_config(self, quant_cfg: str | None, device: torch.device) -> None:
        return None  # not a ModelOpt format

    def hf_quantization_config(self, compute_dtype: torch.dtype):
        if self.kind is None:
            return None
        import torch  # here, not at the top: validating a config loads the format, and must not import torch
        from transformers import BitsAndBytesConfig

        if self.kind == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.kind,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.bfloat16,  # the QLoRA recipe's storage; also what FSDP needs
        )


BF16 = BnbFormat("bf16", None)
INT8 = BnbFormat("int8", "int8")
NF4 = BnbFormat("nf4", "nf4")
FP4 = BnbFormat("fp4", "fp4")


def quantized_linear_stats(model) -> dict:
    """Bytes actually stored per base weight parameter across the quantized linear layers.

    Counts the packed weights and every quantization constant (absmax, its own quantization
    state under double quantization, int8 row scales), divided by the logical parameter count.
    """
    stored, logical = 0, 0
    for module in model.modules():
        if not type(module).__module__.startswith("bitsandbytes"):
            continue  # peft's LoRA wrappers share the class names and expose the same weight
        weight = getattr(module, "weight", None)
        cls = type(module).__name__
        if cls == "Linear4bit":
            qs = weight.quant_state
            stored += weight.numel() * weight.element_size() + _tensor_bytes(qs.absmax)
            if qs.state2 is not None:
                stored += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code) + _tensor_bytes(qs.offset)
            logical += qs.shape.numel()
        elif cls == "Linear8bitLt":
            stored += weight.numel() * weight.element_size() + _tensor_bytes(getattr(weight, "SCB", None))
            logical += weight.numel()
    if logical == 0:
        return {"quantized_linear_params": 0, "bytes_per_param": None}
    return {"quantized_linear_params": logical, "bytes_per_param": stored / logical}


def _tensor_bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()
