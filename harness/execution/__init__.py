"""Running runs: a run's lifecycle, the local/Ray/sequential executors, the worker process, memory fit."""
