"""Rollout engines: the trainer's own HF model, vLLM (colocated or a server), and the check of an engine."""
