"""Runs and checks that need a fresh process of their own (vLLM's sleep-mode allocator on CUDA), and the CUDA
allocator setting a run's own process starts with."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from harness.common.system import ALLOCATOR_VARS

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


def allocator_env(cfg: RunConfig, device: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a run's own process (one run, then exit) gets in its environment for the CUDA allocator: expandable
    segments where it runs on a GPU with no vLLM engine (its rollouts, if any, generate in-process) and the caller's
    environment sets neither variable; nothing otherwise.

    An in-process rollout's KV cache grows by one concatenation per layer and decode step; after the shared prompt
    prefill the caching allocator cannot reuse the freed, shorter blocks and keeps them. On an H100 the 1.5B nf4 rollout
    of 1024 tokens reserved 67.9 GiB for an 8.5 GiB peak, 9.3 with expandable segments, and ran no slower (83 against
    98 s); a 7B bf16 run's process held 77.8 of the card's ~79 GiB for a 31 GiB peak (bench/decode_steps.py,
    reports/bench-scale-h100/, stop 42), which a run packed beside it (--runs-per-gpu) would need. vLLM 0.26's
    sleep-mode allocator refuses expandable segments, so a run with a vLLM engine keeps the default, and so does a
    process that may host one later."""
    if not device.startswith("cuda") or cfg.rollout.engine != "hf" or any(v in environ for v in ALLOCATOR_VARS):
        return {}
    return {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
