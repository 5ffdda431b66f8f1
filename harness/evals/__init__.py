"""Evaluation beyond the greedy held-out reward: pass@k and avg@k of sampled completions (passk), lm-evaluation-harness
tasks (lm_eval)."""
