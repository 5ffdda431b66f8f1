"""The rows of bench/scale.py and what is read from them: the grid's axes and sides, a row's key, how a call's new row
takes an old one's place (keep), how long a side is expected to take (for a call's deadline), a row's peak memory,
and the tables (tables.md). A row is one side of one configuration (model, quant, max_new), as bench/scale_sides.py
returns it, with the parent's `call`, `wall_s`, `log` and `exit_code`; `machine` is the card's CUDA UUID (or a
stop's label)."""

from __future__ import annotations

SHAPES = ("qwen2.5-1.5b", "qwen2.5-7b")
QUANTS = ("bf16", "nf4")
MAX_NEW = (256, 1024)
SIDE_NAMES = ("vllm", "vllm-eager", "vllm-lora", "vllm-lora-eager", "harness", "trl", "harness-vllm",
              "harness-vllm-eager", "harness-vllm-merged", "trl-vllm")
# diagnostic sides, run only when named (not grid cells): the in-process sides with no cuDNN attention anywhere in
# the step, training included, as the harness's decode has none (rollout.hf.DECODE_ATTENTION): whether PyTorch's
# first choice on an H100 costs the train phase (the harness's 1.5B train phase took 1.2-1.4x TRL's, stop 43)
DIAGNOSTIC_SIDES = ("harness-nocudnn", "trl-nocudnn")
ALL_SIDES = SIDE_NAMES + DIAGNOSTIC_SIDES
# the raw-vLLM variant each side's rollout tokens/s is held against: the same policy form (an unmerged LoRA,
# or TRL's merged weights) and the same CUDA-graph setting; in-process sides against the best vLLM does
LIMIT = {"harness": "vllm-lora", "trl": "vllm-lora", "harness-vllm": "vllm-lora",
         "harness-vllm-eager": "vllm-lora-eager", "harness-vllm-merged": "vllm", "trl-vllm": "vllm",
         "harness-nocudnn": "vllm-lora", "trl-nocudnn": "vllm-lora"}


def key(row: dict) -> tuple:
    return row["model"], row["quant"], row["max_new"], row["side"]


def keep(result: dict, row: dict) -> None:
    """A side's new row in place of its key's old one, which the call keeps (`superseded`) when it had figures; but
    a side that crashed or was stopped leaves the ok row it was to replace, and the call records the attempt
    (`not_replaced`). A side now skipped (the harness refuses the config) does replace it: those figures are void."""
    old = next((r for r in result["rows"] if key(r) == key(row)), None)
    ok_before = _ok(old)
    if row["status"] in ("crashed", "stopped") and ok_before:
        result["calls"][-1].setdefault("not_replaced", []).append(
            {k: row.get(k) for k in ("model", "quant", "max_new", "side", "status", "error")})
        return
    if ok_before:
        result["calls"][-1].setdefault("superseded", []).append(old)
    result["rows"] = [r for r in result["rows"] if key(r) != key(row)] + [row]


def expected_s(row: dict | None, calls: list[dict], warmup: int, steps: int) -> float | None:
    """Seconds a side is expected to take, from an earlier ok row of it (any machine): its wall time with its own
    warm-up and timed steps swapped for `warmup` + `steps` of its median step. None without such a row. A rough
    figure: cards differ (1.47x between two H100s), a first run on a machine also writes the shape's weights, and a
    warm-up step is slower than the median."""
    if not _ok(row) or not row.get("wall_s") or not row.get("step_s_median"):
        return None
    call = row.get("call")
    config = (calls[call].get("config") or {}) if isinstance(call, int) and 0 <= call < len(calls) else {}
    timed = len((row.get("per_step") or {}).get("step_s") or []) or config.get("steps", 1)
    ran = config.get("warmup", 1) + timed
    return max(0.0, row["wall_s"] + (warmup + steps - ran) * row["step_s_median"])


def peak_alloc_gib(row: dict) -> float | None:
    """The row's peak allocated GPU memory over its timed steps, as the tables show it. The harness's recipe resets the
    allocator's peak at each phase, so a harness row's own peak_alloc_gib is its last train phase's alone; the largest
    of the phases' peaks and its own is the figure. None where the row has none (a CPU run: its phase peaks are the
    process's RSS)."""
    if row.get("peak_alloc_gib") is None:
        return None
    phases = [v for k in ("rollout_peak_gib", "train_peak_gib") for v in (row.get("per_step") or {}).get(k) or []]
    return max([row["peak_alloc_gib"]] + [v for v in phases if v is not None])


# --- tables

def _f(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _why(row: dict | None) -> str:
    if row is None:
        return "not run: not measured"
    first = (row.get("error") or row["status"]).strip().splitlines()
    return f"not run: {row['status']}: {(first[-1] if first else '')[:120]}".replace("|", "/")


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _cell(row: dict | None, field: str, digits: int = 2) -> str:
    return _f(row.get(field), digits) if _ok(row) else _why(row)


def prompt_tokens(row: dict) -> list[float] | None:
    """Each timed step's prompt tokens, unpadded (its train tokens less its completion tokens), or None when a row
    did not record both (raw vLLM, rows before train tokens were kept)."""
    steps = row.get("per_step") or {}
    train, completion = steps.get("train_tokens"), steps.get("completion_tokens")
    if not train or not completion or len(train) != len(completion) or None in train or None in completion:
        return None
    return [t - c for t, c in zip(train, completion)]


def same_prompts(a: dict, b: dict) -> bool | None:
    """Whether two sides' timed steps generated from the same prompts, as far as their token counts tell (None: a
    side did not record them). A pair is the same work only then: a batch's prompts set its prefill, its padded width
    and the length every decode step attends over, and before stop 41 each TRL side drew its own."""
    pa, pb = prompt_tokens(a), prompt_tokens(b)
    if pa is None or pb is None:
        return None
    return len(pa) == len(pb) and all(abs(x - y) < 0.5 for x, y in zip(pa, pb))


def _ratio(a: dict | None, b: dict | None, field: str = "step_s_median") -> str:
    """a / b where both rows were measured on one machine (the same `machine`: a UUID, a stop's label, or none on a
    CPU); else no ratio. A ratio of two sides that generated from different prompts says so."""
    if _ok(a) and _ok(b) and a.get(field) and b.get(field):
        if a.get("machine") != b.get("machine"):
            return "n/a (other machines)"
        return f"{a[field] / b[field]:.2f}" + (" (different prompts)" if same_prompts(a, b) is False else "")
    return "n/a"


def markdown(rows: list[dict]) -> str:
    """The step-time pairs (harness/TRL below 1: the harness is faster), then every side with its rollout tokens/s
    against its raw-vLLM limit, MFU and memory. A side that did not run says why."""
    by = {key(r): r for r in rows}
    cases = sorted({key(r)[:3] for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    devices = sorted({r["device"] for r in rows if r.get("device")})
    lines = [f"Device: {', '.join(devices) or 'unknown'}. Medians of the timed steps; s/step; "
             "harness/TRL below 1: the harness is faster; a ratio pairs rows of one machine only, and is marked (different "
             "prompts) where the sides' recorded prompt tokens differ: not the same work.", "",
             "| model | quant | new tokens | harness in-process | TRL in-process | harness/TRL | harness vLLM "
             "(graphs) | TRL vLLM | harness/TRL (vLLM) | harness vLLM (eager) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        h, t, hv, tv, he = (by.get(case + (s,)) for s in ("harness", "trl", "harness-vllm", "trl-vllm",
                                                           "harness-vllm-eager"))
        lines.append(f"| {case[0]} | {case[1]} | {case[2]} | {_cell(h, 'step_s_median')} | {_cell(t, 'step_s_median')} | "
                     f"{_ratio(h, t)} | {_cell(hv, 'step_s_median')} | {_cell(tv, 'step_s_median')} | {_ratio(hv, tv)} | "
                     f"{_cell(he, 'step_s_median')} |")
    lines += ["", "Per side. Rollout tok/s: completion tokens / rollout s; vs limit: over the raw-vLLM variant named "
              "(same policy form and CUDA-graph setting); (prompts cached): that limit timed each call after an identical "
              "one, its prompts' KV blocks in vLLM's prefix cache, as no RL step has them (raw rows before stop 47). "
              "MFU: train phase. Peak: torch max allocated / device used (GiB). Start: setup s (engine start s).", "",
              "| model | quant | new | side | step s | rollout s | sync s | train s | completion tok/step | rollout tok/s "
              "| vs limit | MFU | peak alloc | device used | start s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for side in ALL_SIDES:
            r = by.get(case + (side,))
            head = f"| {case[0]} | {case[1]} | {case[2]} | {side} |"
            if r is None:
                continue
            if not _ok(r):
                lines.append(f"{head} {_why(r)} |" + " |" * 10)
                continue
            limit = by.get(case + (LIMIT[side],)) if side in LIMIT else None
            vs = (f"{_ratio(r, limit, 'rollout_tokens_per_s')} of {LIMIT[side]}" if side in LIMIT else "(limit)")
            if _ok(limit) and "prefix_cache" not in limit and vs[0].isdigit():  # scale_raw: limits before stop 47
                vs += " (prompts cached)"
            mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            start = _f(r.get("setup_s"), 1) + (f" ({_f(r['engine_start_s'], 1)})" if r.get("engine_start_s") else "")
            lines.append(f"{head} {_f(r.get('step_s_median'))} | {_f(r.get('rollout_s_median'))} | "
                         f"{_f(r.get('sync_s_median'))} | {_f(r.get('train_s_median'))} | "
                         f"{_f(r.get('completion_tokens_median'), 0)} | {_f(r.get('rollout_tokens_per_s'), 0)} | {vs} | "
                         f"{mfu} | {_f(peak_alloc_gib(r))} | {_f(r.get('device_used_gib'))} | {start} |")
    missing = [f"{c[0]} {c[1]} {c[2]}: {s}" for c in cases for s in SIDE_NAMES if c + (s,) not in by]
    if missing:
        lines += ["", "Not run: not measured in this invocation or an earlier one: " + "; ".join(missing) + "."]
    return "\n".join(lines)
