"""Where runs go: the local executor's slots (a visible GPU, `--runs-per-gpu N` times, or one of
`--jobs N` on CPU), the CPU threads each run gets, and how many runs `--runs-per-gpu auto` packs on
a GPU. Light: torch is imported only to list the GPUs.

Slots are dealt round-robin over the GPUs (GPU 0, GPU 1, ..., then GPU 0 again), so `--jobs`
narrows them evenly and a GPU gets a second run only once every GPU has one. Every run gets
OMP_NUM_THREADS = cores // runs at a time (at least 1): N runs with all the cores each would thrash.

`auto`: floor(capacity x SAFETY / the largest fit_gib among the runs to launch), the memory-fit
estimate of what a run must find free on the GPU (CUDA context included); at most the cores per GPU
(a run's process needs a core of its own) and the runs per GPU there are; at least 1. A run whose
memory cannot be estimated makes it 1: packing blind would OOM its neighbours. The pre-check then
gives each run capacity / runs sharing its GPU (`shared_by`), so a run that cannot fit its share is
recorded infeasible instead of being launched. Host memory is not counted: each run's process holds
about a GiB of it, and a run per core stays well within what GPU hosts have per core.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from harness.execution.jobs import ExecutorSettings, Job

if TYPE_CHECKING:
    import torch

AUTO = "auto"
SAFETY = 0.8  # of a GPU's memory that auto packs estimates into: estimate error, fragmentation, the driver's reserve


@dataclass(frozen=True)
class Slot:
    device: str  # what the run sees: "cuda" (its one GPU) or "cpu"
    env: dict


def parse_runs_per_gpu(value: int | str | None) -> int | str | None:
    """None (the default: 1), a whole number of runs >= 1 (as an int or its digits) or "auto"; ValueError naming
    the valid values otherwise."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"runs_per_gpu {value!r}: give a whole number >= 1 of runs sharing each GPU, or auto "
                     "(as many as the memory-fit estimates allow)")


def per_gpu(settings: ExecutorSettings) -> int:
    """Runs sharing one GPU, as a number: auto not yet resolved (`resolve`) counts as 1."""
    return settings.runs_per_gpu if isinstance(settings.runs_per_gpu, int) else 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's cpuset), else the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_slots(gpus: list[str], runs_per_gpu: int, cores: int, jobs: int | None = None) -> list[Slot]:
    """`runs_per_gpu` slots on each of `gpus` (CUDA_VISIBLE_DEVICES names), dealt round-robin and cut to `jobs`;
    each with cores // slots threads and QRL_RUNS_PER_GPU, the runs sharing its GPU (recorded in env.json)."""
    order = [g for _ in range(runs_per_gpu) for g in gpus][:jobs]
    threads, sharing = str(max(1, cores // max(1, len(order)))), Counter(order)
    return [Slot("cuda", {"CUDA_VISIBLE_DEVICES": g, "OMP_NUM_THREADS": threads, "QRL_RUNS_PER_GPU": str(sharing[g])})
            for g in order]


def cpu_slots(jobs: int, cores: int) -> list[Slot]:
    return [Slot("cpu", {"OMP_NUM_THREADS": str(max(1, cores // jobs))})] * jobs


def slots(settings: ExecutorSettings) -> list[Slot]:
    """The local executor's slots on this machine. ValueError, saying what to fix, where one would be a slot no
    run can start on (pinned_gpus) or where runs_per_gpu asks to share a GPU this machine does not have."""
    import torch

    dev = settings.device
    if dev == "cpu" or (dev == "auto" and not torch.cuda.is_available()):
        if per_gpu(settings) > 1:
            raise ValueError(f"runs_per_gpu {settings.runs_per_gpu}: torch {torch.__version__} sees no CUDA GPU here; "
                             "on CPU, --jobs N (jobs=N in Python) runs N at a time, each with 1/N of the cores")
        return cpu_slots(settings.jobs or 1, usable_cores())
    return gpu_slots(pinned_gpus(dev), per_gpu(settings), usable_cores(), settings.jobs)


def pinned_gpus(device: str) -> list[str]:
    """The GPUs a sweep on `device` (auto, cuda, cuda:N) pins its runs to, as CUDA_VISIBLE_DEVICES
    names them (ids or UUIDs). ValueError, saying what to fix, where a slot would be one no run
    can start on: each of its runs would fail at once and the queue drain into failed summaries."""
    import torch

    if device not in ("auto", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise ValueError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    listed, seen = os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()
    gpus = [str(i) for i in range(seen)] if listed is None else [g.strip() for g in listed.split(",") if g.strip()]
    if not seen:
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU (CUDA_VISIBLE_DEVICES={listed}); "
                         "--device cpu runs on the CPU")
    if len(gpus) != seen:  # CUDA drops a listed GPU that does not exist, and every one after it
        raise ValueError(f"CUDA_VISIBLE_DEVICES={listed} names {len(gpus)} GPUs but torch sees {seen}: "
                         "list only GPUs this host has (nvidia-smi -L)")
    if device.startswith("cuda:"):
        i = int(device.removeprefix("cuda:"))
        if i >= len(gpus):
            raise ValueError(f"--device {device}: {len(gpus)} GPU(s) visible ({', '.join(gpus)}), "
                             f"so cuda:0 to cuda:{len(gpus) - 1}")
        gpus = [gpus[i]]
    return gpus


def describe(free: list[Slot]) -> str:
    """'8 runs at a time: 4 per GPU on 2 GPUs (0, 1), 2 CPU threads each'."""
    threads = free[0].env.get("OMP_NUM_THREADS", "all") if free else "all"
    if not free or free[0].device == "cpu":
        return f"{len(free)} runs at a time on the CPU, {threads} threads each"
    gpus = Counter(s.env["CUDA_VISIBLE_DEVICES"] for s in free)
    most = max(gpus.values())
    shared = f"{most} per GPU on " if most > 1 else "one per GPU on "
    return f"{len(free)} runs at a time: {shared}{len(gpus)} GPU(s) ({', '.join(gpus)}), {threads} CPU threads each"


def auto_runs_per_gpu(fits: list[float | None], capacity_gib: float, gpus: int = 1, cores: int | None = None,
                      jobs: int | None = None, safety: float = SAFETY) -> tuple[int, str]:
    """(Runs per GPU, why) for `auto`, from the fit_gib estimates of the runs to launch (None: no estimate) on
    `gpus` GPUs of `capacity_gib` each; at most `cores` // gpus (None: no core limit, as on Ray, whose
    num_cpus=1 per run limits them) and the runs per GPU there are (at most `jobs` at a time)."""
    runnable = [f for f in fits if f is None or f <= capacity_gib]  # the others are infeasible even alone
    if not runnable:
        return 1, "no run fits a GPU alone"
    if any(f is None for f in runnable):
        return 1, "a run's memory could not be estimated, so none is packed beside it"
    largest = max(runnable)
    limits = {f"the largest estimate, {largest:.2f} GiB, fits {capacity_gib:.1f} GiB x {safety} that often":
              math.floor(capacity_gib * safety / largest) if largest > 0 else len(runnable),
              f"{len(runnable)} run(s) over {gpus} GPU(s)": math.ceil(min(len(runnable), jobs or len(runnable)) / gpus)}
    if cores is not None:
        limits[f"{cores} cores over {gpus} GPU(s), a core per run"] = cores // gpus
    why = min(limits, key=limits.get)
    return max(1, limits[why]), why


def resolve(settings: ExecutorSettings, jobs: list[Job], device: torch.device,
            capacity_gib: float) -> tuple[ExecutorSettings, str | None]:
    """`settings` with runs_per_gpu auto made a number from the jobs' memory-fit estimates on `device`
    (`capacity_gib` each GPU), and a line saying what it chose and why (None when there was nothing to choose)."""
    if settings.runs_per_gpu != AUTO:
        return settings, None
    if device.type != "cuda" or settings.executor not in ("local", "ray"):
        return replace(settings, runs_per_gpu=1), None
    from harness.execution.memory_fit import estimate

    fits = [est.get("fit_gib") if est.get("peak_gib") is not None else None for est in (estimate(j.cfg, device) for j in jobs)]
    if settings.executor == "local":
        gpus = len(pinned_gpus(settings.device)[:settings.jobs])
        n, why = auto_runs_per_gpu(fits, capacity_gib, gpus, usable_cores(), settings.jobs)
    else:  # a Ray cluster's GPUs and cores are its own: each of them gets at most n
        n, why = auto_runs_per_gpu(fits, capacity_gib)
    return replace(settings, runs_per_gpu=n), f"runs per GPU auto: {n} (bound by {why})"


def shared_by(settings: ExecutorSettings, device: torch.device) -> int:
    """How many runs at a time share one `device`'s memory: what the pre-check divides its capacity by."""
    if device.type == "cpu":
        return (settings.jobs or 1) if settings.executor == "local" else 1
    if settings.executor == "local":
        return max(Counter(s.env["CUDA_VISIBLE_DEVICES"] for s in slots(settings)).values(), default=1)
    return per_gpu(settings) if settings.executor == "ray" else 1
