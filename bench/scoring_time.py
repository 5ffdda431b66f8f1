"""Seconds to score completions without a gradient (the reference's pass) through rl_math.completion_logprobs, with
the entropy and without it (with_entropy=False, what the recipes' reference passes ask for): the exp, product and
sum over the vocabulary that the entropy adds to each position. The model is a fixed bf16 logits tensor, so only
the scoring is timed; the median of `--repeat` runs of each, alternating.

    python bench/scoring_time.py                          # N 16, C 256, V 151936 (Qwen2.5's), 5 repeats
    python bench/scoring_time.py --n 4 --c 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_vs_trl import _sync  # noqa: E402

from harness.common.system import device_name  # noqa: E402
from harness.recipes.rl_math import completion_logprobs  # noqa: E402


class _Logits(torch.nn.Module):
    """A 'model' whose output is fixed logits: the scoring is all that runs."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})


def measure(n: int, c: int, v: int, repeat: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, c + 1, v, generator=gen, device=device).to(torch.bfloat16)
    tokens = torch.randint(0, v, (n, c), generator=gen, device=device)
    ids = torch.zeros(n, 1, dtype=torch.long, device=device)
    model, times = _Logits(logits), {True: [], False: []}
    for _ in range(repeat):
        for with_entropy in (True, False):
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                completion_logprobs(model, ids, torch.ones_like(ids), tokens, torch.ones_like(tokens),
                                    with_entropy=with_entropy)
            _sync(device)
            times[with_entropy].append(time.perf_counter() - t0)
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    return {"device": device_name(device), "threads": torch.get_num_threads(), "n": n, "c": c, "v": v,
            "repeat": repeat, "with_entropy_s": round(with_s, 4), "without_entropy_s": round(without_s, 4),
            "ratio": round(with_s / without_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="completions")
    p.add_argument("--c", type=int, default=256, help="completion tokens")
    p.add_argument("--v", type=int, default=151936, help="vocabulary")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(json.dumps(measure(a.n, a.c, a.v, a.repeat, torch.device(a.device))))


if __name__ == "__main__":
    main()
