"""The resume point in `<run>/adapter/`: LoRA weights (or all weights), quantizer amax,
optimizer state, RNG states, step.

Written to a temporary folder, flushed to disk and swapped in by rename, so a kill (or a host
crash) leaves the previous checkpoint or the new one, never a torn one; one found unreadable
anyway is passed over for the previous one, or for none.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import torch

from harness.common.files import fsync

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
    for path in [*tmp.iterdir(), tmp]:  # without it a host crash can keep the rename and lose the bytes
        fsync(path)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter")


def _extra_state(model) -> dict:
    """What the adapter file does not hold: every weight when all of them train, and always the
    quantizers' calibrated amax, which must survive a resume unchanged."""
    return {k: v for k, v in model.state_dict().items() if not is_peft(model) or k.endswith("_amax")}


def restore(run_dir: Path, model, optimizer, rng: random.Random) -> int:
    """Load the last checkpoint into model/optimizer/rng; the step it was taken at (0: none)."""
    found = _latest(run_dir)
    if found is None:
        return 0
    folder, state = found
    final = run_dir / "adapter"
    if folder != final:  # the next save() replaces .adapter.old: make it the current one first
        shutil.rmtree(final, ignore_errors=True)
        os.replace(folder, final)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if is_peft(model):
        set_peft_model_state_dict(model, load_file(final / "adapter_model.safetensors"))
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])  # moves each state tensor to its parameter's device
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def saved_step(run_dir: Path) -> int:
    """The step of the checkpoint restore() would load; -1 when there is none (no metric row survives)."""
    found = _latest(run_dir)
    return -1 if found is None else found[1]["step"]


def discard(run_dir: Path) -> None:
    """Drop every checkpoint: the run starts again from step 0."""
    for folder in (run_dir / "adapter", run_dir / ".adapter.old", run_dir / ".adapter.tmp"):
        shutil.rmtree(folder, ignore_errors=True)


def _latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, state) of the newest readable checkpoint: adapter/, else .adapter.old/ (a kill
    between save()'s two renames, or adapter/ torn by a crash before its bytes reached the disk)."""
    from safetensors import SafetensorError, safe_open

    for folder in (run_dir / "adapter", run_dir / ".adapter.old"):
        if not (folder / STATE).exists():
            continue
        try:
            state = torch.load(folder / STATE, map_location="cpu", weights_only=False)  # on CPU: no GPU copy of it all
            if (folder / "adapter_model.safetensors").exists():
                with safe_open(folder / "adapter_model.safetensors", "pt"):
                    pass
        except (EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError):
            continue
        return folder, state
    return None
