"""What a rollout engine (registries.ROLLOUT_ENGINES) is: every method and attribute its callers use
(the recipes' shared loop in recipes/common.py, rollout.hf.evaluate, rollout/engine_check.py).

An engine class is built as Engine(model, tokenizer, cfg, device, workdir) from the trainer's policy,
its tokenizer, the RunConfig, the trainer's device and the run's folder; the registry checks that
the class declares every member below. Imports nothing heavy: the registry imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from harness.rollout.hf import Rollout


@runtime_checkable
class RolloutEngine(Protocol):
    facts: dict
    """What summary.json records about the engine (its name, version, how it hands the device back, ...)."""

    sleeps: bool
    """release() puts the engine to sleep, freeing its device memory, and the next generate() wakes it."""

    eval_batch: int
    """The most prompts one held-out generate() is given (rollout.hf.evaluate splits the held-out set by it)."""

    def sync(self) -> None:
        """Make the engine generate from the trainer's current weights (wake it first if it sleeps)."""
        ...

    def generate(self, prompts: list[str], greedy: bool = False, temperature: float | None = None,
                 seed: int | None = None) -> Rollout:
        """Completions of `prompts`, sampled (with the sampler's log-probs) or greedy; syncs first when the weights changed.
        temperature: sample at this temperature from the untruncated policy (top_p 1, no top_k) instead of the run's
        rollout sampling, without the sampler's log-probs (the held-out eval's samples). seed: draw from generators
        seeded with it (a prompt's own per prompt where the engine has them) and leave the engine's stream, the one
        the rollouts draw from, where it was."""
        ...

    def release(self) -> None:
        """Hand the device back to the trainer before it trains."""
        ...

    def pop_metrics(self) -> dict:
        """Sync/sleep/wake timings and memory readings since the last call (time/sync_s always)."""
        ...

    def mark_synced(self) -> None:
        """Take the trainer's current weights as already pushed (check-engine's planted stale-adapter fault)."""
        ...

    def close(self) -> None:
        """Free the engine (stop its server); it must not outlive its run."""
        ...
