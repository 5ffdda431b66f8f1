"""The train phase of every harness step, the warm-up's too, under torch.profiler (bench/scale.py --profile-train):
what the attention ops cost on the host and on the device, step by step, and the ops that cost most.

Why (issue 23, stop 45): at 1.5B bf16 the harness's first timed train phase took 13.01 s with cuDNN attention and
7.00-7.51 after it; without cuDNN no step stood out. A one-time cost per new attention shape (cuDNN building an
execution plan on the host) fits every reading and was not tested. Plan building is host time inside the SDPA
ops, forward and backward, with their device time unchanged; a slower kernel is device time. So a profile gives,
per step, each attention op's count, host time (with and without its children) and device time, per input shape,
and the calls of an op and shape not seen in an earlier profiled step apart from the others.

The profiler's own cost per op makes a profiled step slower than an unprofiled one, so bench/scale.py keeps a
profiled side's figures apart from the rows that the tables compare (scale.json's `profiles`). Reading the events
back costs more, after train_s is taken: torch parsed 210k events (about a 1.5B step's ops and kernels, by a count
per layer) in 11.5 s on a CPU (a loop of small ops, stop 47), so expect tens of seconds a side.
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


DISPATCHER = "aten::scaled_dot_product_attention"  # picks a backend; the backend's op below it does the work


def is_attention(name: str) -> bool:
    """The SDPA ops of every backend, forward and backward: aten::_scaled_dot_product_cudnn_attention(_backward),
    _scaled_dot_product_flash_attention and the _flash_attention_forward it calls, ..._flash_attention_for_cpu,
    and the dispatcher."""
    return name.startswith("aten::") and "attention" in name


def backend_call(event) -> bool:
    """A backend's outermost op of one attention call: not the dispatcher, nor an op that another backend op called
    (flash and efficient nest one, cuDNN none: counted this way, one call is one event on every backend)."""
    parent = event.cpu_parent
    return event.name != DISPATCHER and not (parent is not None and is_attention(parent.name)
                                             and parent.name != DISPATCHER)


def _s(us: float) -> float:
    return round(us / 1e6, 6)  # microseconds: a repeated attention call takes tens of them


def summary(prof: torch.profiler.profile, step: int, train_s: float | None, warmup: bool, seen: set) -> dict:
    """One profiled train phase. `attention`: each SDPA op's count, host s (with its children, and self) and device
    s, and per shape of its first three inputs (forward: query, key, value; backward: grad_out, query, key) its
    count, host self s, device s, and `first_seen`: whether this process's profiled train phases first called it
    with that shape in this step (`seen`: the earlier steps' op-shapes; updated here). Over the backends' calls
    (backend_call): how many were first seen (`first_calls`), their host time with children (`first_call_cpu_s`),
    and the median host time of the others: a per-shape setup cost on the host shows as first calls far above that
    median. `top_cpu`, `top_device`: the TOP ops by self time, each [name, count, s]."""
    events = prof.key_averages()
    attention = {e.key: {"count": e.count, "cpu_s": _s(e.cpu_time_total), "self_cpu_s": _s(e.self_cpu_time_total),
                         "device_s": _s(e.device_time_total), "shapes": {}}
                 for e in events if is_attention(e.key)}
    first, repeats = [], []
    calls = sorted((e for e in prof.events() if is_attention(e.name)), key=lambda e: e.time_range.start)
    for e in calls:
        shape = str(e.input_shapes[:3])
        new = (e.name, shape) not in seen
        seen.add((e.name, shape))
        cell = attention[e.name]["shapes"].setdefault(shape, {"count": 0, "self_cpu_s": 0.0, "device_s": 0.0,
                                                              "first_seen": False})
        cell["count"] += 1
        cell["self_cpu_s"] += e.self_cpu_time_total / 1e6
        cell["device_s"] += e.device_time_total / 1e6
        cell["first_seen"] |= new
        if backend_call(e):
            (first if new else repeats).append(e.cpu_time_total)
    for op in attention.values():
        op["shapes"] = [{"shape": shape} | {k: round(v, 6) if isinstance(v, float) else v for k, v in cell.items()}
                        for shape, cell in op["shapes"].items()]

    def top(by) -> list[list]:
        ranked = sorted(events, key=by, reverse=True)[:TOP]
        return [[e.key, e.count, _s(by(e))] for e in ranked if by(e) > 0]

    return {"step": step, "warmup": warmup, "train_s": train_s, "attention": attention,
            "attention_calls": len(first) + len(repeats),
            "attention_cpu_s": round(sum(a["self_cpu_s"] for a in attention.values()), 6),
            "attention_device_s": _s(sum(e.self_device_time_total for e in events if is_attention(e.key))),
            "first_calls": len(first), "first_call_cpu_s": _s(sum(first)),
            "repeat_call_cpu_s_median": _s(statistics.median(repeats)) if repeats else None,
            "top_cpu": top(lambda e: e.self_cpu_time_total), "top_device": top(lambda e: e.self_device_time_total)}


def line(profile: dict) -> str:
    """A profiled train phase in one line, for the call's output."""
    median = profile["repeat_call_cpu_s_median"]
    return (f"step {profile['step']}{' (warm-up)' if profile['warmup'] else ''}: train {profile['train_s'] or 0:.2f} s;"
            f" attention: {profile['attention_calls']} calls, host {profile['attention_cpu_s']:.3f} s self "
            f"({profile['first_calls']} calls of an op and shape first seen: {profile['first_call_cpu_s']:.3f} s; the "
            f"others' median {'-' if median is None else f'{median * 1e3:.2f} ms'}), device "
            f"{profile['attention_device_s']:.3f} s")
