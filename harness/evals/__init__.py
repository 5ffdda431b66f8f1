"""Evaluation beyond the held-out reward: lm-evaluation-harness tasks."""
