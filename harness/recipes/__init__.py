"""One module per algorithm, readable top to bottom. Each exposes run(cfg, run_dir, tracker, device, progress)."""


class NonFinite(RuntimeError):
    """A loss or gradient became NaN/inf: the run stops and is recorded as diverged."""


class Pruned(Exception):
    """The caller (a tuning study's pruner) stopped the run early: recorded as pruned, not failed."""
