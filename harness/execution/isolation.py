"""Runs and checks that need a fresh process of their own (vLLM's sleep-mode allocator on CUDA)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from harness.config.run import RunConfig


def own_process_needed(cfg: RunConfig, device: torch.device) -> bool:
    """vLLM's sleep-mode allocator (CuMem) serves one engine per process and is not handed back
    when an engine closes, so each colocated vLLM engine on CUDA (a run, a check) gets a fresh process."""
    return cfg.rollout.colocation == "colocated" and device.type == "cuda"


def in_own_process(fn, *args):
    """fn(*args) in a freshly spawned Python process (not forked: CUDA is initialised here); its
    return value or its exception comes back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
