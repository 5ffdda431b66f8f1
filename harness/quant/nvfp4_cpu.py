"""NVFP4 fake quantization in plain torch, for CPU tensors (ModelOpt's kernel asserts CUDA).

NVFP4: 16-element blocks of E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} (and negatives), one E4M3
scale per block, one FP32 global scale amax / (6 * 448) per tensor. Rounding follows ModelOpt's
NVFP4QTensor (nearest, ties at 0.75/1.75/3.5 up, at 0.25/1.25/2.5/5 down): that is round half
to even on the grid's local step (0.5 below 2, 1 below 4, 2 above), which torch.round does
without a table search. The backward pass is straight-through. Registered as a ModelOpt quant backend; harness
configs select it only for runs on CPU, so GPU runs go through ModelOpt's own CUDA kernel.
"""

from __future__ import annotations

import torch

BACKEND = "qrl_nvfp4_cpu"
E2M1_MAX, E4M3_MAX = 6.0, 448.0


def nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Quantize-dequantize x (last dim in blocks of `block`) with global amax; same dtype out."""
    shape, dtype = x.shape, x.dtype
    pad = (-shape[-1]) % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)).reshape(-1, block)
    scale2 = amax.float().reshape(()) / (E2M1_MAX * E4M3_MAX)
    block_scale = xf.abs().amax(-1, keepdim=True) / (E2M1_MAX * scale2)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    block_scale = block_scale.clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn).float()
    scaled = xf / (block_scale * scale2)
    mag = scaled.abs()
    step = torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))
    q = (torch.round(mag / step) * step).clamp(max=E2M1_MAX) * torch.sign(scaled) * block_scale * scale2
    q = q.reshape(*shape[:-1], shape[-1] + pad)[..., : shape[-1]].to(dtype)
    return x + (q - x).detach()  # straight-through estimator


def entrypoint(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """ModelOpt backend signature: (inputs, TensorQuantizer) -> fake-quantized inputs."""
    amax = quantizer._get_amax(inputs)  # the calibrated per-tensor amax ModelOpt's kernel would use
    if not isinstance(inputs, torch.nn.Parameter):
        return nvfp4_fake_quant(inputs, amax, quantizer.block_sizes[-1])
    # A weight is quantized again on every forward (each generated token too) but changes only
    # when the optimizer updates it in place, which bumps its version counter.
    key = (id(inputs), inputs._version, float(amax))
    cached = getattr(quantizer, "_qrl_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, nvfp4_fake_quant(inputs.detach(), amax, quantizer.block_sizes[-1]))
        quantizer._qrl_cache = cached
    return inputs + (cached[1] - inputs).detach()


def register() -> None:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, entrypoint)
