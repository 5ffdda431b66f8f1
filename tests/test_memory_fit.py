"""harness.execution.memory_fit against measured runs: each run trains in a fresh process (as in a sweep, where the
measured CPU peak is that process's RSS), then its summary's peak_memory_gib is compared with the estimate."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config.run import RunConfig
from harness.execution.memory_fit import capacity_gib, estimate, fits
from harness.results.layout import read_metrics

CPU = torch.device("cpu")
TOLERANCE = 0.30  # the acceptance criterion
RUN = "import sys, torch; from pathlib import Path; from harness.config.run import RunConfig; " \
      "from harness.execution.lifecycle import run_one\n" \
      "cfg = RunConfig.model_validate_json(sys.argv[1]); run_one(cfg, Path(sys.argv[2]), torch.device(sys.argv[3]))"


def measured_peak(cfg: RunConfig, run_dir: Path) -> float:
    # on the threads the estimate's runtime probe assumed (this process's: one, see conftest.py)
    subprocess.run([sys.executable, "-c", RUN, cfg.model_dump_json(), str(run_dir), "cpu"], check=True, timeout=600,
                   capture_output=True, env=os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads())})
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary.get("error")
    return summary["peak_memory_gib"]


def report(name: str, est: dict, measured: float) -> str:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in est["parts"].items() if v)
    return (f"{name}: estimated {est['peak_gib']:.3f} GiB vs measured {measured:.3f} GiB "
            f"({est['peak_gib'] / measured - 1:+.0%}); {parts}")


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_tiny_model_smoke_shapes(tiny_model, tmp_path, quant):
    """The smoke matrix's per-step shapes for a few steps: here the runtime dominates."""
    cfg = RunConfig(quant=quant, task={"name": "arith", "eval_size": 500}, rollout={"max_new_tokens": 5},
                    lora={"r": 16, "alpha": 32},
                    train={"steps": 3, "prompts_per_step": 16, "group_size": 8, "eval_every": 25, "checkpoint_every": 25})
    est = estimate(cfg, CPU)
    measured = measured_peak(cfg, tmp_path / cfg.run_id)
    print(report(f"tiny {quant}", est, measured))
    assert abs(est["peak_gib"] / measured - 1) <= TOLERANCE, report(f"tiny {quant}", est, measured)


def wide_model(folder: Path, tiny: Path, hidden: int = 512, layers: int = 2, intermediate: int | None = None) -> Path:
    """A randomly initialised Qwen2 with the tiny model's character tokenizer. Its vocabulary (32768) is far
    larger than the tokenizer's (98): the logits and embeddings are then the size of a real model's, and ids
    the tokenizer lacks, which the random policy samples, decode to nothing (their reward is 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=intermediate or 3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=32768, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    return folder


def boxed_questions(path: Path, n: int = 40, fillers: tuple[int, int] = (0, 4)) -> Path:
    """Word problems of uneven lengths (~70-190 characters with 0-4 fillers, one token each): batches are left-padded,
    as real ones are."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        filler = " Each of them is counted once." * rng.randint(*fillers)
        rows.append({"question": f"Tom has {a} apples and buys {b} more.{filler} How many apples does he have?",
                     "answer": f"#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fixed_mmap_threshold(monkeypatch):
    """glibc's allocator with a fixed mmap threshold, for the estimate and the measured run alike (measured_peak passes
    this environment on). With glibc's default, dynamic threshold the RSS peak keeps part of the freed transients, and
    how much varies from run to run: the wide model's peak measured 2.00, 2.13, 2.16 and 2.26 GiB in four identical
    runs (0.3-0.6 retained transients, against the estimate's 1: +15% to +30.4%, a test that failed at the tolerance
    now and then). Fixed, the live tensors decide and the estimate leaves out its retention term (memory_fit)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")


def long_prompt_run(tiny_model, tmp_path: Path, eval_size: int) -> RunConfig:
    """A wide MLP (8192), 16 prompts of ~330-400 tokens a step and small training micro-batches: the prefill's
    intermediate-wide temporaries are the run's peak."""
    model = wide_model(tmp_path / "wide", tiny_model, hidden=256, intermediate=8192)
    return RunConfig(model=str(model),
                     task={"name": "boxed", "source": str(boxed_questions(tmp_path / "q.jsonl", 100, (9, 11))),
                           "eval_size": eval_size},
                     rollout={"max_new_tokens": 8},
                     train={"steps": 1, "prompts_per_step": 16, "group_size": 2, "eval_every": 25, "dtype": "float32",
                            "checkpoint_every": 25, "micro_batch_size": 2})


@pytest.mark.slow  # a 16-micro-batch float32 train step, 45-50 s (make test took 8m57s with it, stop 44): make test-slow
def test_a_long_prompt_rollout_peaks_at_its_prefill(tiny_model, tmp_path, fixed_mmap_threshold):
    """In-process generation's first forward takes every distinct prompt, padded, at once: its intermediate-wide
    temporaries are this run's peak (issue 23's 7B rollouts, which prefilled all 128 copies, peaked at 41 GiB where
    the train phase took 24). Without the prefill term the estimate is about 40% low."""
    cfg = long_prompt_run(tiny_model, tmp_path, eval_size=4)
    est = estimate(cfg, CPU)
    measured = measured_peak(cfg, tmp_path / cfg.run_id)
    print(report("long prompts", est, measured))
    assert est["phase"] == "rollout" and est["shapes"]["prompt_tokens"] >= 330, (est["phase"], est["shapes"])
    assert est["parts"]["rollout_prefill"] >= 0.4 * est["peak_gib"], est["parts"]
    assert abs(est["peak_gib"] / measured - 1) <= TOLERANCE, report("long prompts", est, measured)


@pytest.mark.slow  # 40 s more of make test's 10 minutes: make test-slow (CI) runs it
def test_a_held_out_eval_prefills_no_more_at_once_than_a_rollout(tiny_model, tmp_path, fixed_mmap_threshold):
    """The held-out eval's 40 distinct prompts are prefilled 16 at a time, 32 to a generate (a rollout's prompts
    and rows), and the run's peak, its evals' included, stays the estimate's. With the eval's 40
    prompts at once, as they were, this run peaked at 2.98 GiB against the estimate's 1.66 (1.67 now)."""
    cfg = long_prompt_run(tiny_model, tmp_path, eval_size=40)
    est = estimate(cfg, CPU)
    measured = measured_peak(cfg, tmp_path / cfg.run_id)
    print(report("long-prompt eval", est, measured))
    assert abs(est["peak_gib"] / measured - 1) <= TOLERANCE, report("long-prompt eval", est, measured)
    evals = [r["memory/eval_peak_gib"] for r in read_metrics(tmp_path / cfg.run_id) if "eval/reward" in r]
    assert len(evals) == 2 and max(evals) <= measured, evals  # step 0's and the last step's, within the run's peak


@pytest.mark.slow  # training runs of the wide model, 55 s that make test's 10 minutes cannot spare: make test-slow (CI) runs it
def test_micro_batches_lower_the_peak_as_estimated(tiny_model, tmp_path, fixed_mmap_threshold):
    """A wide model's weights, activations and logits of a few hundred MB each: the model terms, not the runtime,
    decide the peak, and the estimate meets it (float32 whatever the CPU, so the terms have those sizes on
    bf16-capable CPUs too). Then grpo's train.micro_batch_size: the training logits and activations of a quarter of
    the batch at a time."""
    model = wide_model(tmp_path / "wide", tiny_model)
    base = dict(model=str(model), task={"name": "boxed", "source": str(boxed_questions(tmp_path / "q.jsonl")), "eval_size": 4},
                rollout={"max_new_tokens": 16})
    train = {"steps": 2, "prompts_per_step": 8, "group_size": 4, "eval_every": 25, "dtype": "float32", "checkpoint_every": 25}
    peaks = {}
    for micro in (None, 8):
        cfg = RunConfig(**base, train=train | {"micro_batch_size": micro})
        est = estimate(cfg, CPU)
        peaks[micro] = (est["peak_gib"], measured_peak(cfg, tmp_path / cfg.run_id))
        print(report(f"wide micro {micro}", est, peaks[micro][1]))
        assert abs(est["peak_gib"] / peaks[micro][1] - 1) <= TOLERANCE, report(f"wide micro {micro}", est, peaks[micro][1])
        if micro is None:
            assert est["peak_gib"] - est["parts"]["runtime"] >= 0.5 * est["peak_gib"], est["parts"]
            assert min(est["parts"][k] for k in ("base_weights", "activations", "logits")) >= 0.1, est["parts"]
    assert est["shapes"]["micro_batch"] == 8
    assert peaks[8][0] < peaks[None][0] and peaks[8][1] < peaks[None][1], peaks


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    est = estimate(RunConfig(model="no-such-org/no-such-model-memory-fit"), CPU)
    assert est["peak_gib"] is None and est["reason"]
    assert fits(est, 1.0)  # unknown is not infeasible


def test_capacity_cpu():
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    cap = capacity_gib(CPU)
    assert 0 < cap <= total / 1024**3
    assert not fits({"peak_gib": 1.0, "fit_gib": cap + 1}, cap) and fits({"peak_gib": 1.0, "fit_gib": cap / 2}, cap)


def test_a_gpu_estimate_without_a_gpu_takes_vllms_share_of_an_assumed_h100(tiny_model):
    """`memory-fit --device cuda` on a CPU-only machine: with no GPU to ask, vLLM's part is gpu_memory_utilization of
    an assumed H100 80GB."""
    from harness.execution.memory_fit import ASSUMED_GPU_GIB

    if torch.cuda.is_available():
        pytest.skip("the case of a machine without a GPU")
    cfg = RunConfig(rollout={"colocation": "colocated", "quantization": "bf16", "gpu_memory_utilization": 0.05})
    est = estimate(cfg, torch.device("cuda"))
    assert est["parts"]["vllm"] == pytest.approx(0.05 * ASSUMED_GPU_GIB, rel=1e-6)
