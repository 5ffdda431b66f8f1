"""Optuna searches over a cell's `tune:` space, and their report."""
