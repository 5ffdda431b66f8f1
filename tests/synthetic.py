"""Synthetic sweeps for verdict and report tests, written with the writers a real run uses."""

import math

from harness.common.files import write_json_atomic
from harness.config.matrix import load_matrix
from harness.tracking.files import JsonlTracker


def write_sweep(tmp_path, matrix_yaml: str, name: str = "v"):
    """(results root, {cell name: [run dirs]}) with matrix.json saved as a sweep would."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(matrix_yaml)
    m = load_matrix(path)
    root = tmp_path / "results" / name
    write_json_atomic(root / "matrix.json", m.to_json())
    return root, {c.name: [root / r.run_id for r in c.runs] for c in m.cells}


def fake_run(run_dir, start, end, *, kl=0.1, entropy=0.5, status="ok", error=None, nan_at=None, completion="42"):
    """A run the way run_one writes it: the numbers are planted, the files are real."""
    t = JsonlTracker(run_dir)
    t.log({"eval/reward": start}, 0)
    for step in range(1, 11):
        row = {"kl": kl if step > 5 else 0.05, "entropy": entropy, "reward/mean": 0.5, "throughput/rollout_tokens_per_s": 1000.0}
        if step == nan_at:
            row["loss"] = math.nan
        if step == 10:
            row["eval/reward"] = end
        t.log(row, step)
        if step in (1, 10):
            t.log_samples([{"prompt": "1+1=", "completion": completion, "reward": 0.0}], step)
    t.finish({"status": status, "error": error, "peak_memory_gib": 0.5, "median_step_s": 0.1})


def curve_run(run_dir, evals, kls, *, entropy=0.5, status="ok", eval_n=500):
    """A run with planted curves: `evals` [(step, eval/reward)], `kls` the kl of steps 1..len(kls)."""
    t = JsonlTracker(run_dir)
    at = dict(evals)
    if 0 in at:
        t.log({"eval/reward": at[0], "eval/n": eval_n}, 0)
    for step, kl in enumerate(kls, start=1):
        row = {"kl": kl, "entropy": entropy, "reward/mean": 0.5, "loss": 0.1}
        if step in at:
            row |= {"eval/reward": at[step], "eval/n": eval_n}
        t.log(row, step)
    t.finish({"status": status, "error": None, "peak_memory_gib": 0.5, "median_step_s": 0.1})


def plant(runs, name, ends, start=0.40, **kw):
    for d, end in zip(runs[name], ends):
        if end is not None:
            fake_run(d, start, end, **kw)
