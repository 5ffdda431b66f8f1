"""What bench/scale.py's sides measure with, apart from the sides themselves (bench/scale_sides.py, scale_raw.py):
device memory, the medians of a side's timed steps, and the train phase's model FLOPs and MFU (bench/scale.py's
docstring defines them)."""

from __future__ import annotations

import torch

from harness.common.numbers import median
from harness.common.system import GIB, compute_dtype, device_name
from harness.config.run import RunConfig

# bf16 dense peak FLOP/s by torch.cuda.get_device_name; the first key found in the name wins (PCIe and NVL first)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(name: str) -> float | None:
    return next((v for key, v in PEAK_BF16 if key in name), None)


def device_used(device: torch.device) -> float | None:
    """The whole device's used memory (vLLM's own pool included, which torch's allocator does not see)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GIB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_alloc(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def vllm_checkpoint(cfg: RunConfig, device: torch.device) -> str:
    """vLLM's weights folder for the model; for a shape written on first use (15 GB at 7B), so before any clock starts."""
    from harness.models.loading import checkpoint, resolve

    return checkpoint(resolve(cfg.model), device, compute_dtype(device, cfg.train.dtype))


def summarize(steps: dict[str, list], spec: dict, device: torch.device, used: list) -> dict:
    """Medians of the per-step lists (already the timed steps only), MFU of the train phase."""
    out = {"per_step": steps, "device_used_gib": max((u for u in used if u is not None), default=None),
           "peak_alloc_gib": peak_alloc(device)}
    for key, values in steps.items():
        out[f"{key}_median"] = median(values)
    tps = [c / r for c, r in zip(steps["completion_tokens"], steps["rollout_s"]) if r]
    out["rollout_tokens_per_s"] = median(tps)
    flops = [model_flops(spec, t, c) for t, c in zip(steps["train_tokens"], steps["completion_tokens"])]
    out["train_flops_median"] = median(flops)
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    mfu = [f / (s * peak) for f, s in zip(flops, steps["train_s"]) if peak and s]
    out |= {"peak_bf16_flops": peak, "mfu": median(mfu)}
    return out


_SIZES: dict[str, tuple] = {}


def model_flops(spec: dict, tokens: float, completion_tokens: float) -> float:
    """Model FLOPs of one train phase (bench/scale.py's docstring gives the formula): the policy's forward and its
    backward (activation gradients only) and the reference's forward, 2 N FLOPs a token each, the LM head over the
    completion tokens only, attention 4 L d s a token forward and twice that backward."""
    if spec["model"] not in _SIZES:
        from transformers import AutoConfig, AutoModelForCausalLM

        from harness.models.loading import resolve

        cfg = AutoConfig.from_pretrained(resolve(spec["model"]))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        head = model.get_output_embeddings()
        body = sum(m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, torch.nn.Linear) and m is not head)
        text = cfg.get_text_config()
        d = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        _SIZES[spec["model"]] = (body, head.in_features * head.out_features, text.num_hidden_layers, d)
    body, head, layers, d = _SIZES[spec["model"]]
    seq = tokens / (spec["prompts"] * spec["group"])  # mean sequence length (prompt + completion)
    return 3 * (2 * body * tokens + 2 * head * completion_tokens) + (4 + 8 + 4) * layers * d * seq * tokens
