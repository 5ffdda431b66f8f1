"""Peak memory of scoring completions and of its backward, in float32 [N, C, V] copies: how the trainer turns the
model's logits into each token's log-prob and each position's entropy. `pieces`: rl_math.completion_logprobs
(TokenScores), what grpo, rloo, dpo and sft train through; `whole`: completion_logits and token_logprobs_and_entropy
on the whole float32 tensor, as distill scores. At a 152k vocabulary this is the train phase's largest term: on an
H100 the memory-fit estimate, 4 copies of 9.3 GiB, was 37 of the measured 66 GiB peak at 1.5B x 16 completions of
1024 tokens (issue 23).

CPU only, each measurement in a fresh process: peak RSS above the process before the model's bf16 logits exist,
over the size of one float32 copy (large tensors are mmapped, so RSS follows what is alive). The logits come from a
bf16 matmul, as lm_head's do, so nothing but the scoring keeps them.

    python bench/logit_memory.py                      # pieces; N 16, C 512, V 32768: 1 GiB a copy
    python bench/logit_memory.py --path whole         # the whole tensor
    python bench/logit_memory.py --n 8 --c 256 --v 151936 --temperature 0.7
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(n: int, c: int, v: int, temperature: float, path: str) -> dict:
    import torch

    from harness.recipes.rl_math import completion_logits, completion_logprobs, token_logprobs_and_entropy

    class Head(torch.nn.Module):  # the model's output: bf16 logits of every completion position, as on a GPU
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.hidden = torch.nn.Parameter(torch.randn(n, c + 1, 8, dtype=torch.bfloat16))
            self.head = torch.nn.Parameter(torch.randn(v, 8, dtype=torch.bfloat16))

        def forward(self, input_ids, logits_to_keep, **_):
            # lm_head's matmul: its output is kept by nothing but the caller, as a real model's; a plain namespace
            # is freed on return as transformers' output is (a class made here would sit in a reference cycle)
            return types.SimpleNamespace(logits=self.hidden[:, -logits_to_keep:] @ self.head.T)

    ids, comp = torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, c, dtype=torch.long)
    copy = n * c * v * 4
    head = Head()
    start = rss_bytes()
    if path == "pieces":  # what grpo, rloo, dpo and sft train through
        logp, entropy = completion_logprobs(head, ids, torch.ones_like(ids), comp, torch.ones_like(comp), temperature)
    else:  # distill's, which needs every position's distribution at once
        logits = completion_logits(head, ids, torch.ones_like(ids), comp, torch.ones_like(comp), temperature)
        logp, entropy = token_logprobs_and_entropy(logits, comp)
        del logits
    forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logp.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"forward_copies": round((forward - start) / copy, 2), "peak_copies": round((peak - start) / copy, 2),
            "copy_gib": round(copy / 2**30, 3), "entropy_mean": round(entropy.mean().item(), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="completions per micro-batch")
    p.add_argument("--c", type=int, default=512, help="completion tokens")
    p.add_argument("--v", type=int, default=32768, help="vocabulary")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--path", choices=("pieces", "whole"), default="pieces",
                   help="pieces: completion_logprobs (grpo, rloo, dpo, sft); whole: completion_logits + "
                        "token_logprobs_and_entropy (distill)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.n, a.c, a.v, a.temperature, a.path)))
        return
    cmd = [sys.executable, __file__, "--one", "--n", str(a.n), "--c", str(a.c), "--v", str(a.v),
           "--temperature", str(a.temperature), "--path", a.path]
    print(subprocess.run(cmd, check=True, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2"}).stdout.strip())


if __name__ == "__main__":
    main()
