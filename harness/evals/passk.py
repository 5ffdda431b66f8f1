"""pass@k and avg@k of sampled held-out completions: pure functions, no torch.

With `eval.samples` k > 0 every held-out evaluation samples k completions per prompt (rollout.hf.held_out_metrics)
and logs, besides the greedy eval/reward:
  eval/avg@k    the mean reward over all k x prompts samples: an estimate of pass@1 (the expected reward of one
                sample) with k times the completions behind it
  eval/pass@j   for j = 1, 2, 4, ... below k, and k: the chance that at least one of j samples is correct, by
                Chen et al. 2021's unbiased estimator 1 - C(n-c, j)/C(n, j) per prompt (n = k samples, c correct),
                averaged over prompts. It is a property of the policy, not of k: pass@2 from 8 samples and from
                2 estimate the same number, the first with less noise.
  eval/samples  k
A sample is correct when its reward reaches CORRECT (1.0, the tasks' full mark: arith's and boxed's exact answer,
math's math-verify match). avg@k averages the rewards themselves, so for a task with partial credit it can exceed
pass@1; for the harness's tasks, whose held-out reward is 0 or 1, the two are equal.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

CORRECT = 1.0  # a sample's reward at or above this counts as correct for pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased estimator of pass@k from n samples of which c are correct, in its numerically stable
    product form: 1 - prod_{i=n-c+1}^{n} (1 - k/i) = 1 - C(n-c, k)/C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k holds a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k: int) -> list[int]:
    """The j of the eval/pass@j logged for k samples: the powers of 2 below k, then k (8: 1, 2, 4, 8; 6: 1, 2, 4, 6)."""
    return [2**i for i in range(k.bit_length()) if 2**i < k] + [k]


def avg_name(k: int) -> str:
    return f"eval/avg@{k}"


def sample_metrics(rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """eval/avg@k, eval/pass@j and eval/samples from rewards[i] = the rewards of prompt i's k samples."""
    if not rewards:
        raise ValueError("no prompts")
    k = len(rewards[0])
    if k < 1 or any(len(r) != k for r in rewards):
        raise ValueError(f"every prompt needs the same number (>= 1) of samples, got {sorted({len(r) for r in rewards})}")
    correct = [sum(x >= CORRECT for x in r) for r in rewards]
    out = {avg_name(k): math.fsum(x for r in rewards for x in r) / (k * len(rewards))}
    for j in pass_ks(k):
        out[f"eval/pass@{j}"] = math.fsum(pass_at_k(k, c, j) for c in correct) / len(rewards)
    return out | {"eval/samples": k}


def samples_of(name: str) -> int:
    """k of an eval/avg@k name."""
    return int(name.rpartition("@")[2])


def eval_seed(run_seed: int, step: int) -> int:
    """The seed of the held-out samples at `step` of the run with `run_seed`: one of its own, so sampling them draws
    nothing from the rollouts' stream, and the same at a resumed step."""
    return int.from_bytes(hashlib.sha256(f"eval-samples:{run_seed}:{step}".encode()).digest()[:4], "big")
