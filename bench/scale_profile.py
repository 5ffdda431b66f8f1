"""The train phase of each timed harness step under torch.profiler (bench/scale.py --profile-train): what the
attention ops cost on the host and on the device, step by step, and the ops that cost most.

Why (issue 23, stop 45): at 1.5B bf16 the harness's first timed train phase took 13.01 s with cuDNN attention and
7.00-7.51 after it; without cuDNN no step stood out. A one-time cost per new attention shape (cuDNN building an
execution plan on the host) fits every reading and was not tested. Plan building is host time inside the SDPA
ops, forward and backward, with their device time unchanged; a slower kernel is device time. So a profile gives,
per step, each attention op's count, host time (with and without its children) and device time.

The profiler's own cost per op makes a profiled step slower than an unprofiled one, so bench/scale.py keeps a
profiled side's figures apart from the rows that the tables compare (scale.json's `profiles`). Reading the events
back costs more, after train_s is taken: torch parsed 210k events (about a 1.5B step's ops and kernels, by a count
per layer) in 11.5 s on this CPU, so expect tens of seconds a side.
"""

from __future__ import annotations

import statistics

import torch

TOP = 15  # ops listed per step, by host and by device self time


def profiler(device: torch.device) -> torch.profiler.profile:
    """A profiler of host ops, and of the device's kernels on CUDA, with input shapes (the attention ops are told
    apart by them); no stacks or memory (less overhead)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=True)


def _device_us(event, total: bool) -> float:
    """A key_averages entry's device time in microseconds (torch renamed cuda_* to device_* in 2.4; both read)."""
    names = ("device_time_total", "cuda_time_total") if total else ("self_device_time_total", "self_cuda_time_total")
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


DISPATCHER = "aten::scaled_dot_product_attention"  # picks a backend; the backend's op below it does the work


def is_attention(name: str) -> bool:
    """The SDPA ops of every backend, forward and backward: aten::_scaled_dot_product_cudnn_attention(_backward),
    _flash_attention_forward, _efficient_attention_backward, ..._flash_attention_for_cpu, and the dispatcher."""
    return name.startswith("aten::") and "attention" in name


def _s(us: float) -> float:
    return round(us / 1e6, 6)  # microseconds: a repeated attention call takes tens of them


def summary(prof: torch.profiler.profile, step: int, train_s: float | None, warmup: bool, seen: set) -> dict:
    """One profiled train phase. `attention`: each SDPA op's count, host s (with its children, and self) and device
    s, and per input shape (query, key, value) its count, host self s, device s, and whether its first call in this
    process was in this step. Over the backends' calls (the dispatcher's left out): the calls whose op and shape
    are new to the process (`seen`: the earlier steps'; updated here), their host self time (`first_call_cpu_s`),
    and the median host self time of the other calls: a per-shape setup cost on the host shows as the first
    calls' times far above that median. `top_cpu`, `top_device`: the TOP ops by self time, each [name, count, s]."""
    events = prof.key_averages()
    attention = {e.key: {"count": e.count, "cpu_s": _s(e.cpu_time_total), "self_cpu_s": _s(e.self_cpu_time_total),
                         "device_s": _s(_device_us(e, total=True)), "shapes": {}}
                 for e in events if is_attention(e.key)}
    first, repeats = [], []
    calls = sorted((e for e in prof.events() if is_attention(e.name)), key=lambda e: e.time_range.start)
    for e in calls:
        shape = str(e.input_shapes[:3])
        new = (e.name, shape) not in seen
        seen.add((e.name, shape))
        cell = attention[e.name]["shapes"].setdefault(shape, {"count": 0, "self_cpu_s": 0.0, "device_s": 0.0,
                                                              "first_in_process": False})
        cell["count"] += 1
        cell["self_cpu_s"] += e.self_cpu_time_total / 1e6
        cell["device_s"] += _device_us(e, total=True) / 1e6
        cell["first_in_process"] |= new
        if e.name != DISPATCHER:
            (first if new else repeats).append(e.self_cpu_time_total)
    for op in attention.values():
        op["shapes"] = [{"shape": shape} | {k: round(v, 6) if isinstance(v, float) else v for k, v in cell.items()}
                        for shape, cell in op["shapes"].items()]

    def top(by) -> list[list]:
        ranked = sorted(events, key=by, reverse=True)[:TOP]
        return [[e.key, e.count, _s(by(e))] for e in ranked if by(e) > 0]

    return {"step": step, "warmup": warmup, "train_s": train_s, "attention": attention,
            "attention_calls": len(first) + len(repeats),
            "attention_cpu_s": round(sum(a["self_cpu_s"] for a in attention.values()), 6),
            "attention_device_s": _s(sum(_device_us(e, total=False) for e in events if is_attention(e.key))),
            "first_calls": len(first), "first_call_cpu_s": _s(sum(first)),
            "repeat_call_cpu_s_median": _s(statistics.median(repeats)) if repeats else None,
            "top_cpu": top(lambda e: e.self_cpu_time_total), "top_device": top(lambda e: _device_us(e, total=False))}


def line(profile: dict) -> str:
    """A profiled train phase in one line, for the call's output."""
    median = profile["repeat_call_cpu_s_median"]
    return (f"step {profile['step']}{' (warm-up)' if profile['warmup'] else ''}: train {profile['train_s'] or 0:.2f} s;"
            f" attention: {profile['attention_calls']} calls, host {profile['attention_cpu_s']:.3f} s self "
            f"({profile['first_calls']} first calls of an op and shape: {profile['first_call_cpu_s']:.3f} s; the "
            f"others' median {'-' if median is None else f'{median * 1e3:.2f} ms'}), device "
            f"{profile['attention_device_s']:.3f} s")
