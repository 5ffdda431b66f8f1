"""What a full-weight sync writes into vLLM (`rollout.lora_sync: merged`, or a full-weight run): every weight of the
trainer's policy, a LoRA adapter merged into its layer, and what storing the merged weight in its dtype loses."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def policy_weights(model, rounding: dict | None = None):
    """(HF name, tensor) of every weight of the trainer's policy, a LoRA adapter merged into its layer's weight
    (W + scale BA, computed in float32, one layer at a time: a 7B's merged copy would be 14 GB at once): what a
    full-weight run, or `rollout.lora_sync: merged`, writes into vLLM.

    `rounding`, when given, adds up over the merged layers what storing W + scale BA in the weight's dtype costs:
    "err_sq", the squared distance of the stored weight from the float32 sum, and "delta_sq", scale BA's (0-d
    tensors). A bf16 weight has 8 significant bits, so an update smaller than half a step of W is lost whole; the
    trainer adds the adapter's output, summed over the input features, to the base layer's output before rounding
    it, and loses far less of it (merge_rel_err)."""
    from peft.tuners.lora import LoraLayer

    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    listed = {n.removesuffix(".base_layer.weight") for n, _ in model.named_parameters() if n.endswith(".base_layer.weight")}
    if missing := set(lora) - listed:  # a weight tied to another (lm_head to the embeddings) is listed once
        raise ValueError(f"rollout.lora_sync: merged cannot write an adapter on a tied weight ({sorted(missing)[0]}): "
                         "leave it out of lora.target_modules, or use lora_sync adapter")
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        layer, _, leaf = name.rpartition(".base_layer.")
        if not layer:
            yield name.removeprefix("base_model.model."), p.detach()
            continue
        module, weight = lora[layer], p.detach()
        if leaf == "weight":
            # an adapter peft merged is in the weight already; a disabled one is not the policy
            pending = [] if module.disable_adapters else [
                a for a in module.active_adapters if a in module.lora_A and a not in module.merged_adapters]
            if pending:
                delta = sum(module.get_delta_weight(a).float() for a in pending)
                exact = weight.float() + delta
                weight = exact.to(p.dtype)
                if rounding is not None:  # summed on the device: an .item() per layer would wait for each
                    rounding["err_sq"] = rounding.get("err_sq", 0.0) + (weight.float() - exact).square().sum()
                    rounding["delta_sq"] = rounding.get("delta_sq", 0.0) + delta.square().sum()
        yield f"{layer.removeprefix('base_model.model.')}.{leaf}", weight


def merge_rel_err(rounding: dict) -> float:
    """||stored(W + scale BA) - (W + scale BA)|| / ||scale BA|| over every merged layer (Frobenius): 0 when the
    weights' dtype holds the merged update exactly, 1 when the stored weights are W unchanged, the update lost."""
    return math.sqrt(float(rounding["err_sq"]) / float(rounding["delta_sq"]))
