"""The resume point in `<run>/adapter/`: LoRA weights (or all weights), quantizer amax,
optimizer state, RNG states, step.

Written to a temporary folder and swapped in by rename, so a kill leaves the previous
checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.pt"


def save(run_dir: Path, model, optimizer, rng: random.Random, step: int) -> None:
    final, tmp, old = run_dir / "adapter", run_dir / ".adapter.tmp", run_dir / ".adapter.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_peft(model):
        model.save_pretrained(tmp)
    state = {
        "model": _extra_state(model),
        "step": step,
        "optimizer": optimizer.state_dict(),
        "python_rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, tmp / STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter")


def _extra_state(model) -> dict:
    """What the adapter file does not hold: every weight when all of them train, and always the
    quantizers' calibrated amax, which must survive a resume unchanged."""
    return {k: v for k, v in model.state_dict().items() if not is_peft(model) or k.endswith("_amax")}


def restore(run_dir: Path, model, optimizer, rng: random.Random) -> int:
    """Load the last checkpoint into model/optimizer/rng; the step it was taken at (0: none)."""
    final, old = run_dir / "adapter", run_dir / ".adapter.old"
    if not (final / STATE).exists() and (old / STATE).exists():
        os.replace(old, final)  # killed between the two renames of save()
    if not (final / STATE).exists():
        return 0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(final / STATE, weights_only=False)
    if is_peft(model):
        set_peft_model_state_dict(model, load_file(final / "adapter_model.safetensors"))
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def saved_step(run_dir: Path) -> int:
    """The step of the checkpoint restore() would load; -1 when there is none (no metric row survives)."""
    for folder in (run_dir / "adapter", run_dir / ".adapter.old"):
        if (folder / STATE).exists():
            return torch.load(folder / STATE, weights_only=False)["step"]
    return -1
