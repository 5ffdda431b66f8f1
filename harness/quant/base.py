"""What a quant format (registries.QUANT) is: the attributes and methods its callers use.

The registry's targets are instances (bnb.BF16, modelopt.NVFP4_W4A4, ...); every one has every
member below, so callers (config validation, loading, the memory estimate, export) read them
directly instead of probing a format for the attributes one family happens to have.
Imports nothing heavy: validating a matrix loads the formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from harness.config.run import RunConfig


@runtime_checkable
class QuantFormat(Protocol):
    @property
    def name(self) -> str:
        """The `quant:` name it is registered under."""

    @property
    def kind(self) -> str | None:
        """The bitsandbytes storage of the base's linear weights: "int8", "nf4" or "fp4"; None where
        they are held in the compute dtype (bf16, and every ModelOpt format: fake quantization)."""

    @property
    def double_quant(self) -> bool:
        """With kind nf4 or fp4: the absmax constants are quantized too (read for those kinds only)."""

    @property
    def fake_quant(self) -> bool:
        """The forward runs through ModelOpt fake quantizers (amax buffers per linear; exported with ModelOpt)."""

    @property
    def calibrated(self) -> bool:
        """It has amax to calibrate, so `modelopt.recalibrate_every` applies."""

    @property
    def trains_full_weights(self) -> bool:
        """Its base weights are parameters that can train (`train.trainable: full`), not packed storage."""

    def load_base(self, source: str, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> Any:
        """The base model from `source` (an HF folder), quantized as this format says, on `device`."""
        ...

    def resolve_config(self, quant_cfg: str | None, device: torch.device) -> dict | None:
        """The ModelOpt config it fake-quantizes with (`quant_cfg`: modelopt.quant_cfg, read by the `modelopt`
        format); None for a format that is not ModelOpt's."""
        ...
