"""Device, compute dtype and memory readings: the facts about the machine a run records."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch

GIB = 1024**3


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """`requested` (train.dtype) unless auto; then bf16 where the hardware computes in it natively,
    float32 elsewhere.

    On CPUs without native bf16, bf16 matmuls are emulated and about twice as slow as float32,
    so the CPU path trades the bf16 numerics for speed. The chosen dtype is recorded per run.
    """
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def dtype_reason(device: torch.device, requested: str = "auto") -> str:
    """Why a run computes in the dtype compute_dtype gives it: what env.json and the report say, so that
    a dtype that follows the machine (auto on CPU) is never a silent difference between two reports."""
    dtype = str(compute_dtype(device, requested)).removeprefix("torch.")
    if requested != "auto":
        return f"{dtype}: train.dtype"
    if device.type == "cuda":
        return f"{dtype}: auto, this GPU's"
    if dtype == "bfloat16":
        return ("bfloat16: auto, as this CPU computes bf16 natively (avx512_bf16/amx); a CPU without it computes float32 "
                "under auto, with other numbers: set train.dtype to compare across machines")
    return ("float32: auto, as this CPU has no native bf16 (no avx512_bf16/amx); a CPU with it computes bfloat16 "
            "under auto, with other numbers: set train.dtype to compare across machines")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name and the flags that change a run's numbers: runs of one config are bit-identical on
    one kind of CPU and differ on another (other kernels, other rounding), so a report names the kind."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    kinds = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    return ", ".join(filter(None, [name or platform.processor() or platform.machine(), " ".join(kinds[:2])]))


# torch reads its CUDA allocator's settings from these, once per process (execution.isolation.allocator_env sets one
# for a run's own process)
ALLOCATOR_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_settings(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The allocator variables `environ` sets (what env.json and the benchmarks record)."""
    return {v: environ[v] for v in ALLOCATOR_VARS if v in environ}


def device_identity(device: torch.device) -> dict:
    """Which GPU a run had (a sweep over several GPUs pins one per run): the slot's CUDA_VISIBLE_DEVICES,
    the device's UUID and PCI bus id, as nvidia-smi names them; and how many runs the executor packed
    on it (--runs-per-gpu: their step times shared the GPU)."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    bus = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_uuid": f"GPU-{getattr(props, 'uuid', '?')}",
            "runs_per_gpu": int(os.environ.get("QRL_RUNS_PER_GPU") or 1),
            # the CUDA allocator's settings (an executor gives an in-process run expandable segments: execution.isolation)
            "cuda_alloc_conf": allocator_settings() or None,
            "gpu_pci_bus_id": f"{bus[0]:08X}:{bus[1]:02X}:{bus[2]:02X}.0" if None not in bus else None}


class PeakMemory:
    """Peak memory of a phase: the CUDA allocator's peak on GPU, the process peak RSS (VmHWM) on CPU.

    On Linux the RSS high-water mark can be reset by writing 5 to /proc/self/clear_refs, which
    gives per-phase peaks on CPU too; where that is not allowed the peak is since process start.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def git_commit(where: Path | None = None) -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it: a run's code is then not that commit's
    (a copy of a working tree on another machine keeps the .git of an older commit)."""
    here = where or Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=20, cwd=here)
        return out.stdout.strip() + ("+dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic", "harness"):
        try:
            out[name] = version(name if name != "harness" else "quant-rl-harness")
        except PackageNotFoundError:
            out[name] = None
    return out
