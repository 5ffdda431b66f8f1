"""The benchmark's own accounting: exclusive times (a call's timed children are not counted twice), and the record
bench/scale.py keeps of its rows and the calls that measured them (bench/scale_rows.py: which row a call keeps, a
side's expected time, a row's peak memory, the tables)."""

import json
import os
import statistics
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import overhead  # noqa: E402


def test_exclusive_timer_subtracts_nested_calls(monkeypatch):
    clock = iter(range(100))  # each perf_counter() call is one second later
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: next(clock))
    timer = overhead.ExclusiveTimer(cuda=False)
    inner = timer.wrap("forward", lambda: next(clock))  # 2 s inside: start, body tick, end
    outer = timer.wrap("generate", lambda: [inner(), inner(), next(clock)])
    outer()
    # forward: 2 calls x (end - start = 2); generate: (end - start = 8) - 4 spent in forward
    assert timer.totals == {"forward": 4, "generate": 4}


def test_scale_bench_keeps_rows_and_the_calls_that_measured_them(tmp_path):
    """bench/scale.py on the tiny model, as the GPU machine runs it: a side's row, a vLLM side skipped on a CPU, and
    every invocation recorded in scale.json's calls (a later --skip-done call keeps the rows and points nowhere new;
    --redo measures a side again)."""
    import json
    import subprocess

    def scale(*args):
        cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--model", "builtin:tiny-arith", "--task", "arith",
               "--max-new", "5", "--quants", "bf16", "--warmup", "0", "--steps", "1", "--device", "cpu",
               "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads((tmp_path / "out" / "scale.json").read_text())

    first = scale("--sides", "harness,harness-vllm", "--copy-to", str(tmp_path / "copy"))
    assert json.loads((tmp_path / "copy" / "scale.json").read_text()) == first  # the GPU machine's $OUT
    rows = {r["side"]: r for r in first["rows"]}
    assert rows["harness"]["status"] == "ok" and rows["harness"]["step_s_median"] > 0
    assert rows["harness"]["completion_tokens_median"] > 0 and rows["harness"]["call"] == 0
    assert rows["harness-vllm"]["status"] == "skipped" and "CUDA" in rows["harness-vllm"]["error"]
    second = scale("--sides", "harness", "--skip-done", "--max-model-len", "64")
    assert [c["config"]["max_model_len"] for c in second["calls"]] == [None, 64] and "command" not in second
    assert second["rows"] == first["rows"]  # the ok row was kept, not measured again
    assert rows["harness"]["exit_code"] == 0 and first["calls"][0]["device"] == rows["harness"]["device"]
    third = scale("--sides", "harness", "--skip-done", "--redo", "harness")
    assert [r["call"] for r in third["rows"] if r["side"] == "harness"] == [2]  # measured again, the old row replaced
    # a row of another card is not this machine's to keep: --skip-done measures it again (pairs share a machine)
    for r in third["rows"]:
        r["machine"] = "another card"
    (tmp_path / "out" / "scale.json").write_text(json.dumps(third))
    fourth = scale("--sides", "harness", "--skip-done")
    assert [(r["call"], r.get("machine")) for r in fourth["rows"] if r["side"] == "harness"] == [(3, None)]
    # a side an earlier row says would outrun the call's deadline is left for the next call, not started and stopped
    for r in fourth["rows"]:
        r["wall_s"] = 1000.0
    (tmp_path / "out" / "scale.json").write_text(json.dumps(fourth))
    fifth = scale("--sides", "harness,harness-vllm", "--redo", "harness", "--deadline", "300")
    assert [r["call"] for r in fifth["rows"] if r["side"] == "harness"] == [3] and len(fifth["calls"]) == 5
    assert fifth["calls"][4]["deferred"]["side"] == "harness" and fifth["calls"][4]["deferred"]["expected_s"] >= 1000
    # the sides after it wait too (a pair is measured on one machine): harness-vllm's row is the first call's
    assert [r["call"] for r in fifth["rows"] if r["side"] == "harness-vllm"] == [0]


def test_a_side_the_harness_refuses_is_skipped_with_its_reason():
    """Merged weights of an nf4 base: the harness's own config check refuses it, and the bench row says why."""
    import scale_sides

    spec = {"model": "builtin:tiny-arith", "task": "arith", "quant": "nf4", "max_new": 5, "side": "harness-vllm-merged",
            "prompts": 4, "group": 2, "warmup": 0, "steps": 1, "gpu_memory_utilization": 0.3, "device": "cpu"}
    row = scale_sides.run(spec)
    assert row["status"] == "skipped" and "lora_sync: merged" in row["error"] and "quant is nf4" in row["error"]


def test_the_grid_takes_the_first_cards_figure_and_says_why_a_cell_has_none(tmp_path):
    """bench/scale_grid.py: a configuration's cell shows the first card's ok row, falls back to the next card's, and
    without one names the failure, the known incompatibility (TRL's vLLM path with nf4) or `not run`."""
    import json

    import scale_grid

    def card(name, rows):
        folder = tmp_path / f"bench-scale-{name}"
        folder.mkdir()
        (folder / "scale.json").write_text(json.dumps({"rows": [
            {"model": "shape:qwen2.5-7b", "quant": q, "max_new": 256, "side": s, "status": st, "step_s_median": v}
            for q, s, st, v in rows]}))
        return folder

    first = card("h200", [("nf4", "harness-vllm", "ok", 20.25), ("bf16", "trl", "crashed", None)])
    second = card("h100", [("nf4", "harness-vllm", "ok", 21.86), ("nf4", "trl", "ok", 52.11),
                           ("bf16", "trl", "timeout", None)])
    text = scale_grid.grid([first, second])
    nf4 = next(line for line in text.splitlines() if line.startswith("| qwen2.5-7b | nf4 | 256 |")).split(" | ")
    bf16 = next(line for line in text.splitlines() if line.startswith("| qwen2.5-7b | bf16 | 256 |")).split(" | ")
    # columns: shape, quant, new, harness, trl, harness-vllm, trl-vllm, vllm-lora
    assert nf4[3:8] == ["not run", "H100 52.11", "H200 20.25",
                        "cannot run: vLLM 0.26 refuses TRL's merged, packed 4-bit weights", "not run |"]
    assert bf16[4] == "H200 crashed; H100 timeout" and bf16[6] == "not run"
    assert text.rstrip().endswith("2 of 40 cells measured on some card.")


def test_a_redo_that_does_not_finish_keeps_the_figures_it_was_to_replace():
    """scale_rows.keep (bench/scale.py's): a new row replaces its side's old one (the call keeps replaced figures),
    unless it crashed or was stopped where the old one was ok (a redo stopped at the call's deadline must not erase a
    measured row); the call then records the attempt."""
    import scale_rows

    side = {"model": "shape:qwen2.5-1.5b", "quant": "bf16", "max_new": 1024, "side": "harness-vllm"}
    result = {"rows": [side | {"status": "ok", "step_s_median": 21.98, "call": 0}], "calls": [{}, {}]}
    scale_rows.keep(result, side | {"status": "stopped", "error": "stopped by the time limit after 117 s", "call": 1})
    assert result["rows"] == [side | {"status": "ok", "step_s_median": 21.98, "call": 0}]
    assert result["calls"][1]["not_replaced"] == [side | {"status": "stopped",
                                                          "error": "stopped by the time limit after 117 s"}]
    scale_rows.keep(result, side | {"status": "ok", "step_s_median": 20.5, "call": 1})
    assert result["rows"] == [side | {"status": "ok", "step_s_median": 20.5, "call": 1}]
    assert result["calls"][1]["superseded"] == [side | {"status": "ok", "step_s_median": 21.98, "call": 0}]
    other = side | {"side": "trl-vllm"}
    scale_rows.keep(result, other | {"status": "crashed", "error": "exit 1"})  # nothing measured to keep: the failure stays
    assert [r["status"] for r in result["rows"]] == ["ok", "crashed"]
    # a config the harness now refuses voids the old figures: the skip replaces them, the call keeps them
    scale_rows.keep(result, side | {"status": "skipped", "error": "lora_sync: merged needs ...", "call": 1})
    assert [r["status"] for r in result["rows"]] == ["crashed", "skipped"]
    assert [r["step_s_median"] for r in result["calls"][1]["superseded"]] == [21.98, 20.5]


def test_the_tables_pair_rows_of_one_machine_only():
    """A harness/TRL or rollout-vs-limit ratio is computed only between rows measured on the same card."""
    import scale_rows

    case = {"model": "shape:qwen2.5-1.5b", "quant": "bf16", "max_new": 256, "status": "ok", "completion_tokens_median": 1}
    harness = case | {"side": "harness-vllm", "step_s_median": 9.0, "rollout_tokens_per_s": 14711.0, "machine": "A"}
    limit = case | {"side": "vllm-lora", "step_s_median": 2.4, "rollout_tokens_per_s": 13503.0}
    trl = case | {"side": "trl-vllm", "step_s_median": 10.0, "machine": "A"}
    text = scale_rows.markdown([harness, limit | {"machine": "B"}, trl])
    assert "| 9.00 | 10.00 | 0.90 |" in text and "n/a (other machines) of vllm-lora" in text
    assert "1.09 of vllm-lora (prompts cached) |" in scale_rows.markdown([harness, limit | {"machine": "A"}, trl])
    # a limit timed from an empty prefix cache each step (scale_raw, since stop 47) is the RL step's: no mark
    fresh = limit | {"machine": "A", "prefix_cache": "reset before each step"}
    assert "1.09 of vllm-lora |" in scale_rows.markdown([harness, fresh, trl])


def test_a_pair_that_generated_from_different_prompts_says_so():
    """Prompt tokens are a step's train tokens less its completion tokens: equal on both sides, the ratio stands
    alone; different (a TRL side that drew its own prompts, as before stop 41), the ratio says so; unknown (a row
    without train tokens), nothing is claimed. The figures are stop 40's and stop 43's 7B nf4 rows."""
    import scale_rows

    case = {"model": "shape:qwen2.5-7b", "quant": "nf4", "max_new": 1024, "status": "ok", "machine": "A"}
    harness = case | {"side": "harness", "step_s_median": 210.54,
                      "per_step": {"train_tokens": [174616.0], "completion_tokens": [131072.0]}}
    trl = case | {"side": "trl", "step_s_median": 158.67,
                  "per_step": {"train_tokens": [172760], "completion_tokens": [131072.0]}}
    assert scale_rows.prompt_tokens(harness) == [43544.0]
    assert scale_rows.same_prompts(harness, trl) is False
    assert "| 210.54 | 158.67 | 1.33 (different prompts) |" in scale_rows.markdown([harness, trl])
    same = trl | {"step_s_median": 242.34, "per_step": {"train_tokens": [174616], "completion_tokens": [131072.0]}}
    assert scale_rows.same_prompts(harness, same) is True
    assert "| 210.54 | 242.34 | 0.87 |" in scale_rows.markdown([harness, same])
    # a side that stopped early on end-of-text has fewer completion and train tokens, the same prompt tokens
    early = harness | {"per_step": {"train_tokens": [173739.0], "completion_tokens": [130195.0]}}
    assert scale_rows.same_prompts(early, same) is True
    assert scale_rows.same_prompts(harness, trl | {"per_step": {"step_s": [158.67]}}) is None
    assert scale_rows.same_prompts(harness, trl | {"per_step": {"train_tokens": [None], "completion_tokens": [1.0]}}) is None
    assert "| 1.33 |" in scale_rows.markdown([harness, trl | {"per_step": {}}])


def test_a_sides_expected_time_scales_its_earlier_run_to_this_calls_steps():
    """expected_s: the earlier run's wall time with its warm-up and timed steps swapped for this call's, at its
    median step: 100 s for 1 warm-up + 2 timed steps of 20 s is 120 s for 1 + 3; nothing from a failed row."""
    import scale_rows

    row = {"status": "ok", "wall_s": 100.0, "step_s_median": 20.0, "per_step": {"step_s": [19.0, 21.0]}, "call": 0}
    calls = [{"config": {"warmup": 1}}]
    assert scale_rows.expected_s(row, calls, warmup=1, steps=3) == 120.0
    assert scale_rows.expected_s(row, [{"config": {"warmup": 0}}], warmup=0, steps=1) == 80.0  # 2 steps ran: 100 - 20
    assert scale_rows.expected_s(row | {"status": "stopped"}, calls, 1, 3) is None
    # no per-step list: the call's own steps; no call on record: 1 warm-up and 1 timed step
    assert scale_rows.expected_s(row | {"per_step": {}}, [{"config": {"warmup": 1, "steps": 2}}], 1, 3) == 120.0
    assert scale_rows.expected_s(row | {"per_step": {}, "call": None}, calls, 1, 3) == 140.0
    assert scale_rows.expected_s(None, calls, 1, 3) is None


def test_the_train_phase_model_flops_and_mfu_are_the_docstrings_formula_on_the_released_shape():
    """bench/scale.py's MFU, by hand for Qwen2.5-1.5B (hidden 1536, MLP 8960, 28 layers, 12 heads of 128, 2 KV heads,
    vocabulary 151,936): per layer q and o 1536 x 1536, k and v 1536 x 256, gate, up and down 1536 x 8960."""
    import scale_measure
    import torch

    body = 28 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960)  # 1,310,195,712: the LM head left out
    head = 1536 * 151936
    spec = {"model": "shape:qwen2.5-1.5b", "prompts": 16, "group": 8}

    def by_hand(tokens, completion):
        return 3 * (2 * body * tokens + 2 * head * completion) + 16 * 28 * 1536 * (tokens / 128) * tokens

    tokens, completion = 75_600, 32_768  # the 1.5B bf16 256-token pair's step: 42,832 prompt tokens
    assert scale_measure.model_flops(spec, tokens, completion) == pytest.approx(by_hand(tokens, completion), rel=1e-12)
    # and the committed H100 rows of that cell were computed with it: their MFU is these FLOPs over train s x the peak
    rows = json.loads((REPO / "reports/bench-scale-h100/scale.json").read_text())["rows"]
    row = next(r for r in rows if (r["model"], r["quant"], r["max_new"], r["side"]) == (spec["model"], "bf16", 256, "harness"))
    step = row["per_step"]
    flops = [by_hand(t, c) for t, c in zip(step["train_tokens"], step["completion_tokens"])]
    assert row["mfu"] == pytest.approx(statistics.median(f / (s * 989e12) for f, s in zip(flops, step["train_s"])), rel=1e-9)
    steps = {"step_s": [2.0], "rollout_s": [1.0], "train_s": [1.0], "completion_tokens": [completion],
             "train_tokens": [tokens]}
    assert scale_measure.summarize(steps, spec, torch.device("cpu"), [])["mfu"] is None  # no peak known for a CPU
    assert scale_measure.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert scale_measure.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert scale_measure.peak_flops("NVIDIA H200") == 989e12


def test_the_harness_step_peak_is_the_larger_phase_peak():
    """The recipe resets the allocator's peak at each phase, so a harness row's own peak_alloc_gib is
    its last train phase's: the tables show the larger of the phases' peaks; a TRL row, without phases, its own."""
    import scale_rows

    harness = {"peak_alloc_gib": 23.99, "per_step": {"rollout_peak_gib": [41.23, 32.80], "train_peak_gib": [23.99, 21.88]}}
    assert scale_rows.peak_alloc_gib(harness) == 41.23
    assert scale_rows.peak_alloc_gib({"peak_alloc_gib": 37.97, "per_step": {"step_s": [45.4]}}) == 37.97
    assert scale_rows.peak_alloc_gib({"peak_alloc_gib": 20.0, "per_step": {"rollout_peak_gib": [None]}}) == 20.0
    # on a CPU the phase peaks are the process's RSS and the row has no allocator peak: none is shown
    assert scale_rows.peak_alloc_gib({"peak_alloc_gib": None, "per_step": {"rollout_peak_gib": [0.7]}}) is None
    case = {"model": "shape:qwen2.5-7b", "quant": "bf16", "max_new": 256, "side": "harness", "status": "ok",
            "step_s_median": 47.26}
    assert "| 41.23 |" in scale_rows.markdown([case | harness])


def test_scale_starts_the_harness_side_as_the_executors_start_an_in_process_run(no_allocator_setting, tmp_path):
    """bench/scale.py's in-process harness side runs in a process with the allocator setting the harness's executors
    give an in-process run on a GPU; TRL's sides and the harness's vLLM sides get none."""
    import json
    import subprocess

    import scale

    seen = {}

    def started(cmd, **kw):  # a fake side: this machine has no GPU to run one on; what it was started with is the point
        seen[json.loads(cmd[-1])["side"]] = kw["env"].get("PYTORCH_CUDA_ALLOC_CONF")
        return subprocess.CompletedProcess(cmd, 0, stdout='{"status": "ok"}\n', stderr="")

    no_allocator_setting.setattr(scale.subprocess, "run", started)
    rows = {}
    for side in ("harness", "trl", "harness-vllm", "trl-vllm", "harness-nocudnn", "trl-nocudnn"):
        spec = {"model": "shape:qwen2.5-1.5b", "quant": "bf16", "max_new": 8, "side": side, "device": "cuda"}
        rows[side] = scale.run_side(spec, None, tmp_path / f"{side}.log")
    assert seen == {"harness": "expandable_segments:True", "trl": None, "harness-vllm": None, "trl-vllm": None,
                    "harness-nocudnn": "expandable_segments:True", "trl-nocudnn": None}
    assert {side: r["alloc_conf"] for side, r in rows.items()} == {  # each row says how its side was started
        side: {"PYTORCH_CUDA_ALLOC_CONF": v} if v else {} for side, v in seen.items()}


def test_the_nocudnn_sides_keep_every_attention_of_the_step_off_cudnn():
    """The diagnostic sides (scale_rows.DIAGNOSTIC_SIDES) run their whole step, training included, with the SDPA
    backends the harness decodes with, and leave PyTorch's settings as they were; every other side changes nothing.
    They are no grid cells: named only, listed in the per-side table, never as "not run"."""
    import scale_rows
    import scale_sides
    import torch

    backends = (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
                torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in backends]
    assert before[0], "PyTorch's default allows cuDNN attention"
    for side in ("harness-nocudnn", "trl-nocudnn"):
        with scale_sides.step_attention(side):
            assert [f() for f in backends] == [False, True, True, True], side
        assert [f() for f in backends] == before
    for side in ("harness", "trl", "harness-vllm"):
        with scale_sides.step_attention(side):
            assert [f() for f in backends] == before, side
    assert scale_sides.config({"side": "harness-nocudnn", "model": "builtin:tiny-arith", "task": "arith", "quant": "bf16",
                               "warmup": 0, "steps": 1, "max_new": 8, "gpu_memory_utilization": 0.3, "prompts": 2,
                               "group": 2}).rollout.colocation == "in_process"
    row = {"model": "m", "quant": "bf16", "max_new": 8, "side": "harness-nocudnn", "status": "ok", "step_s_median": 1.0}
    text = scale_rows.markdown([row, row | {"side": "harness"}])
    assert "| harness-nocudnn | 1.00 |" in text and "nocudnn" not in text.split("Not run")[-1]


def test_decode_steps_starts_the_harness_arms_as_the_executors_start_an_in_process_run():
    """Every harness arm of bench/decode_steps.py but harness-cached gets the allocator setting the harness's
    executors give an in-process run's process on a GPU; TRL's arms, and a CPU, get none; harness-cached runs
    without the user's own setting too (PyTorch's default allocator), the other arms with it."""
    import decode_steps

    alloc = lambda arm, device, env: decode_steps.arm_env(arm, device, env).get("PYTORCH_CUDA_ALLOC_CONF")  # noqa: E731
    got = {arm: alloc(arm, "cuda", {"PATH": "/bin"}) for arm in decode_steps.ARMS}
    cached = ("harness-cached", "trl", "trl-eval")
    assert got == {arm: None if arm in cached else "expandable_segments:True" for arm in decode_steps.ARMS}
    assert all(alloc(arm, "cpu", {}) is None for arm in decode_steps.ARMS)
    assert decode_steps.arm_env("harness", "cuda", {"PATH": "/bin"})["PATH"] == "/bin"
    mine = {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"}
    assert decode_steps.arm_env("harness-cached", "cuda", mine) == {}
    assert all(decode_steps.arm_env(arm, "cuda", mine) == mine for arm in decode_steps.ARMS if arm != "harness-cached")


@pytest.mark.slow  # a process per arm loading the model, ~50 s of make test's 10 minutes: make test-slow runs it
def test_decode_steps_counts_a_shared_prefill_apart_from_the_decode_steps(tmp_path):
    """bench/decode_steps.py (the GPU profile of the in-process rollout) on a CPU: the harness's rollout runs one
    forward more than it generates tokens (the prompt cache's prefill of 2 distinct prompts), TRL's call none;
    every arm's decode steps are timed, its CPU time counted and four of its forwards profiled."""
    import json
    import subprocess

    import decode_steps

    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(REPO / "bench" / "decode_steps.py"), "--model", "builtin:tiny-arith", "--task", "arith",
           "--quant", "bf16", "--device", "cpu", "--prompts", "2", "--group", "2", "--max-new", "8",
           "--arms", ",".join(decode_steps.ARMS), "--profile", "1", "--out", str(out)]
    # a user's allocator setting (no effect on a CPU): every arm's process runs with it but harness-cached's
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ALLOC_CONF"} | mine
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert {arm: r["alloc_conf"] for arm, r in rows.items()} == {
        arm: {} if arm == "harness-cached" else mine for arm in rows}
    assert set(rows) == set(decode_steps.ARMS), rows
    assert len({r["prompt_width"] for r in rows.values()}) == 1, rows  # every arm generates from the same prompts
    for arm, r in rows.items():
        shared = arm != "harness-noshare" and arm.startswith("harness")
        assert r["forwards"] == r["new_tokens"] + shared, (arm, r)
        assert len(r["decode_ms_by_quarter"]) == min(4, r["new_tokens"] - 1), (arm, r)
        assert r["cpu_s"] > 0, (arm, r)
        # the profiler ran over forwards 1-4 of the timed rollout, where it had four
        assert ("profile" in r) == (r["forwards"] >= 5), (arm, r)
        if "profile" in r:
            assert "aten::" in r["profile"]["by_device_time"], r["profile"]


def test_trl_reads_the_prompts_the_harness_draws_step_by_step(tmp_path, monkeypatch):
    """bench/scale_sides.harness_prompt_order replays the harness recipe's draws, the order TRL's side reads its
    dataset in: each step both sides generate from the same prompts (drawn apart, stop 40's 7B nf4 1024 pair had
    padded its batches to 657 and 484 tokens)."""
    import grpo_vs_trl
    import scale_sides
    import torch

    from harness.chat import model_task
    from harness.models.loading import load_tokenizer, resolve
    from harness.recipes import grpo
    from harness.rollout.hf import HFEngine

    spec = {"model": "builtin:tiny-arith", "task": "arith", "quant": "bf16", "max_new": 3, "side": "harness",
            "warmup": 0, "steps": 3, "prompts": 4, "group": 2, "gpu_memory_utilization": 0.3}
    cfg = scale_sides.config(spec)
    drawn = []
    generate = HFEngine.generate

    def recording(self, prompts, greedy=False, temperature=None, seed=None):
        if not greedy and temperature is None:  # a training rollout, not a held-out eval
            drawn.append(prompts[:: cfg.train.group_size])
        return generate(self, prompts, greedy, temperature, seed)

    monkeypatch.setattr(HFEngine, "generate", recording)
    grpo.run(cfg, tmp_path, grpo_vs_trl._Rows(), torch.device("cpu"))
    train = model_task(cfg.task, load_tokenizer(resolve(cfg.model), cfg.model), cfg.model).train
    order = scale_sides.harness_prompt_order(cfg, len(train), len(drawn))
    assert len(drawn) == cfg.train.steps == 4
    assert drawn == [[train[i].prompt for i in order[k * 4:(k + 1) * 4]] for k in range(4)]
    assert len(set(order)) > 4  # the steps draw different prompts: a fixed order would not pass as the same draws


def test_the_scoring_benchmark_times_both_passes():
    import scoring_time
    import torch

    out = scoring_time.measure(2, 3, 50, 1, torch.device("cpu"))
    assert out["with_entropy_s"] > 0 and out["without_entropy_s"] > 0 and (out["n"], out["c"], out["v"]) == (2, 3, 50)
