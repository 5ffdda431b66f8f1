"""Where a run's metrics go: local JSONL files, and W&B when asked."""
