"""Bytes stored per weight of each format's quantized linear layers, measured against the theory.

    python bench/bytes_per_param.py [--device cuda] [--hidden 1024 --layers 4]

Measured: every tensor a quantized linear layer keeps (packed weights, absmax, the double
quantization's own state, int8 row scales; harness.quant.bnb.quantized_linear_stats), and, as a check
independent of that bookkeeping, the model's whole footprint against the bf16 model's.
Theory, from the layers' shapes:
  nf4/fp4 (double quant): 0.5 (4 bits) + 1/64 (a uint8 absmax per 64) + 4/(64*256) (a float32 absmax
                          per 256 absmaxes), + a 256-entry float32 code book and offset per layer
  int8:                   1 + 4/in_features (a float32 scale per output row)
  ModelOpt fake quant:    the compute dtype's bytes (weights stay unquantized while training) + amax;
                          once exported: NVFP4 0.5 + 1/16 (an FP8 scale per 16 weights), FP8 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from harness.common.text import number

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_memory_fit import wide_model  # noqa: E402

FORMATS = ["bf16", "nf4", "fp4", "int8", "nvfp4_w4a16", "fp8"]


def theory(quant: str, linears: list[torch.nn.Linear], dtype_bytes: int) -> float | None:
    n = sum(m.in_features * m.out_features for m in linears)
    if quant in ("nf4", "fp4"):
        per_layer = 256 * 4 + 4
        return 0.5 + 1 / 64 + 4 / (64 * 256) + per_layer * len(linears) / n
    if quant == "int8":
        return 1 + sum(4 * m.out_features for m in linears) / n
    return float(dtype_bytes)  # bf16, and ModelOpt's fake quant: weights kept in the compute dtype while training


# What a ModelOpt format stores once exported as a real quantized checkpoint (harness export): NVFP4 packs 4 bits
# with an FP8 scale per 16 weights (+ a per-tensor float32 scale), FP8 one byte (+ per-tensor scales).
EXPORTED = {"nvfp4_w4a16": 0.5 + 1 / 16, "nvfp4_w4a4": 0.5 + 1 / 16, "fp8": 1.0}


def measure(model_dir: Path, device: torch.device, quants: list[str]) -> list[dict]:
    from harness.common.system import compute_dtype
    from harness.config.run import RunConfig
    from harness.models.loading import load_policy
    from harness.quant.bnb import quantized_linear_stats

    dtype = compute_dtype(device, "auto")
    rows, bf16_footprint = [], None
    for quant in quants:
        cfg = RunConfig(model=str(model_dir), quant=quant, modelopt={"quant_calib_size": 8})
        try:
            model, _ = load_policy(cfg, device, dtype)
        except Exception as e:  # noqa: BLE001  (a format this machine cannot run is reported, not fatal)
            rows.append({"quant": quant, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        base = model.get_base_model()
        head = base.get_output_embeddings()
        # the base's linear layers (peft keeps them as `base_layer` under its wrappers); not the head, not LoRA's own
        linears = [m for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name]
        n_linear = sum(m.in_features * m.out_features for m in linears)
        stats = quantized_linear_stats(model)
        lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
        footprint = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) - lora
        if quant == "bf16":
            bf16_footprint = footprint
        # the footprint check: only the linear weights differ from the bf16 model (norms, embeddings and
        # head stay in the compute dtype, or float32 under bitsandbytes' prepare_model_for_kbit_training)
        by_footprint = None if bf16_footprint is None or quant.startswith(("nf", "fp4", "int8")) else \
            dtype.itemsize + (footprint - bf16_footprint) / n_linear
        rows.append({"quant": quant, "linear_params": n_linear, "layers": len(linears),
                     "measured": stats["bytes_per_param"] if stats["bytes_per_param"] is not None else by_footprint,
                     "theory": theory(quant, linears, dtype.itemsize), "exported_theory": EXPORTED.get(quant),
                     "model_bytes": footprint,
                     "compute_dtype": str(dtype).removeprefix("torch.")})
        del model
    return rows


def run(device: torch.device, quants: list[str] = FORMATS, hidden: int = 1024, layers: int = 4) -> list[dict]:
    from harness.models.tiny_arith import shipped

    with tempfile.TemporaryDirectory() as tmp:
        return measure(wide_model(Path(tmp) / "m", shipped(), hidden, layers), device, quants)


def markdown(rows: list[dict]) -> str:
    lines = ["| format | measured bytes/param (training) | theory | exported checkpoint (theory) | linear params |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['quant']} | not run: {r['error']} | | | |")
            continue
        lines.append(f"| {r['quant']} | {number(r['measured'], 4)} | {number(r['theory'], 4)} | "
                     f"{number(r.get('exported_theory') or r['theory'], 4)} | "
                     f"{r['linear_params']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", nargs="+", default=FORMATS)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = run(torch.device(args.device), args.quant, args.hidden, args.layers)
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
