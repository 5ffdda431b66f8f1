"""Optuna searches over a cell's `tune:` space: the study, a session from start to end, the report."""
