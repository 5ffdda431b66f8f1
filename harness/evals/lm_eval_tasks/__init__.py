"""The harness's own lm-evaluation-harness tasks (qrl_*.yaml), scored by utils.py with the
harness's reward functions. The YAMLs are templates: harness.evals.lm_eval writes, per run, a YAML
that includes one and fills in the run's held-out JSONL and generation length."""
