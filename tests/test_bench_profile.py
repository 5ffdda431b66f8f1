"""bench/scale.py --profile-train (bench/scale_profile.py): the train phase's attention ops, step by step, with the
first call of each op and shape in the process told apart from the others (issue 23: does cuDNN attention cost a
setup per new shape?), and profiled figures kept out of the rows the tables compare."""

import json
import subprocess
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import scale_profile  # noqa: E402


def _attention_step(widths: list[int], seen: set) -> dict:
    """Forward and backward SDPA at each sequence width, under the bench's profiler, summarised as a step."""
    x = torch.randn(2, 4, 16, 8, requires_grad=True)
    prof = scale_profile.profiler(torch.device("cpu"))
    prof.start()
    for w in widths:
        part = x[:, :, :w]
        torch.nn.functional.scaled_dot_product_attention(part, part, part, is_causal=True).sum().backward()
    prof.stop()
    return scale_profile.summary(prof, 1, None, False, seen)


def test_the_first_call_of_each_attention_op_and_shape_in_the_process_is_counted_apart():
    seen = set()
    first = _attention_step([16, 8, 16], seen)
    # CPU's backend: one forward and one backward op a call; widths 16 and 8 are new, the second 16 is not
    assert first["attention_calls"] == 6 and first["first_calls"] == 4
    forward = next(op for name, op in first["attention"].items() if name.endswith("attention_for_cpu"))
    assert sorted((s["shape"][:15], s["count"], s["first_seen"]) for s in forward["shapes"]) == [
        ("[[2, 4, 16, 8],", 2, True), ("[[2, 4, 8, 8], ", 1, True)]
    assert first["attention_cpu_s"] > 0 and first["repeat_call_cpu_s_median"] > 0
    second = _attention_step([8, 4], seen)  # a later step: width 8 seen before, 4 new
    assert second["attention_calls"] == 4 and second["first_calls"] == 2
    assert [s["first_seen"] for s in second["attention"][scale_profile.DISPATCHER]["shapes"]] == [False, True]
    assert scale_profile.line(second).startswith("step 1: train 0.00 s; attention: 4 calls")


def test_one_attention_call_is_one_backend_event_on_every_backend():
    """Flash and efficient SDPA ops call a nested op (aten::_flash_attention_forward under
    aten::_scaled_dot_product_flash_attention); cuDNN's and the CPU's do not. Only the outermost backend op counts.
    The events are stand-ins: those backends run on GPUs only, so no profile made here has them."""
    from types import SimpleNamespace as Event

    dispatcher = Event(name=scale_profile.DISPATCHER, cpu_parent=None)
    flash = Event(name="aten::_scaled_dot_product_flash_attention", cpu_parent=dispatcher)
    nested = Event(name="aten::_flash_attention_forward", cpu_parent=flash)
    backward = Event(name="aten::_scaled_dot_product_cudnn_attention_backward", cpu_parent=Event(
        name="ScaledDotProductCudnnAttentionBackward0", cpu_parent=None))
    assert [scale_profile.backend_call(e) for e in (dispatcher, flash, nested, backward)] == [False, True, False, True]


def test_a_profiled_call_keeps_its_figures_apart_from_the_rows(tmp_path):
    """The tiny model through bench/scale.py as the GPU machine runs it: the row the call had stays; the profiled
    run's row, with a profile of every step's train phase (the warm-up's too), goes under `profiles`."""
    def scale(*args):
        cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--model", "builtin:tiny-arith", "--task", "arith",
               "--max-new", "5", "--quants", "bf16", "--warmup", "1", "--steps", "1", "--device", "cpu",
               "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)

    done = scale("--sides", "harness")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = scale("--sides", "harness", "--skip-done", "--profile-train")  # profiled although its row is done
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert [(r["side"], r["call"], "profile" in r) for r in result["rows"]] == [("harness", 0, False)]
    assert [(r["side"], r["call"]) for r in result["profiles"]] == [("harness", 1)]
    steps = result["profiles"][0]["profile"]
    assert [(s["step"], s["warmup"]) for s in steps] == [(1, True), (2, False)]
    assert all(s["attention_calls"] > 0 and s["train_s"] > 0 for s in steps) and steps[0]["first_calls"] > 0
    shapes = {(op, sh["shape"]) for s in steps for op, a in s["attention"].items() for sh in a["shapes"]
              if op != scale_profile.DISPATCHER}
    assert sum(s["first_calls"] for s in steps) == len(shapes)  # each op and shape is new once in the process
    assert "profile step 2: train" in done.stdout and result["calls"][1]["config"]["profile_train"] is True
    refused = scale("--sides", "harness,trl", "--profile-train")
    assert refused.returncode == 2 and "trl not harness sides" in refused.stderr


def test_a_side_that_crashes_keeps_the_profiles_of_the_steps_it_finished(monkeypatch, tmp_path):
    """An OOM in step 2's train phase: the crashed row still holds step 1's profile, and step 2's profiler stops."""
    import scale_sides

    from harness.recipes import grpo

    calls, apply = [], grpo.apply_gradients

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("a stand-in for the device running out in step 2")
        return apply(*args, **kwargs)

    monkeypatch.setattr(grpo, "apply_gradients", second_fails)
    spec = {"model": "builtin:tiny-arith", "task": "arith", "quant": "bf16", "max_new": 5, "side": "harness",
            "prompts": 4, "group": 2, "warmup": 1, "steps": 2, "gpu_memory_utilization": 0.3, "device": "cpu",
            "work": str(tmp_path), "profile_train": True}
    row = scale_sides.run(spec)
    assert row["status"] == "crashed" and "OutOfMemoryError" in row["error"]
    assert [(p["step"], p["warmup"]) for p in row["profile"]] == [(1, True)]
    assert not torch.autograd.profiler._is_profiler_enabled
    assert grpo.sample_groups.__module__ == "harness.recipes.common"  # the side's hooks are gone
