"""Runs per minute with several runs packed on each GPU (`harness sweep --runs-per-gpu`), on a GPU machine:

    python bench/packing.py smoke --runs-per-gpu 1 2 4 8 auto --seeds 8 --out reports/bench/packing-h200.json
    python bench/packing.py smoke --runs-per-gpu 1 4 --steps 20 --out /tmp/packing.json   # a quick look

The matrix (a name under matrices/ or a YAML path) is copied once, without its `eval:` block (lm-eval is not
installed on the GPU machines; --keep-eval keeps it) and with --steps / --seeds applied when given, then swept
once per value, each time into a fresh results folder under --work, as `harness sweep` runs it (local executor,
--wandb off). Printed and written to --out (JSON, rewritten after each sweep so a cut-off bench keeps what
finished): the sweep's wall time, finished and ok runs, runs per minute (finished runs / wall minutes), the
median run's wall_s (a packed run is slower alone: the GPU is shared), the largest peak_memory_gib, the
runs_per_gpu each run recorded in env.json (what auto chose), and, where nvidia-smi is present, the mean GPU
utilization and the most memory used on each GPU while the sweep ran.

Before the first sweep the shipped tiny model is checked and the run's libraries are imported once, so the
first value does not also pay for a cold disk cache. Needs only what the harness needs (torch, transformers,
peft, pydantic, pyyaml); no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.common.files import write_json_atomic  # noqa: E402
from harness.results.layout import read_json  # noqa: E402

# the device README: NVLink multicast stays off in NCCL, PyTorch and NVSHMEM, in every child too
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def prepare(matrix: str, work: Path, steps: int | None, seeds: int | None, keep_eval: bool) -> Path:
    """The matrix as it will be swept: work/<its name>.yaml."""
    from harness.api import matrices_dir
    from harness.config.matrix import find_matrix

    source = find_matrix(matrix, matrices_dir())
    spec = yaml.safe_load(source.read_text())
    if not keep_eval:
        spec.pop("eval", None)
    if steps:
        spec.setdefault("base", {}).setdefault("train", {})["steps"] = steps
        for key in ("eval_every", "checkpoint_every"):  # a period longer than the run would skip its evaluations
            every = spec["base"]["train"].get(key)
            if every and every > steps:
                spec["base"]["train"][key] = steps
    if seeds:
        spec["seeds"] = list(range(seeds))
    path = work / source.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


class Sampler:
    """nvidia-smi once a second in a child process: (time, {gpu index: (util %, MiB used)}) rows."""

    def __init__(self, path: Path):
        self.path, self.proc = path, None
        if shutil.which("nvidia-smi"):
            self.log = open(path, "w")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-l", "1"], stdout=self.log,
                                         stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.log.close()

    def window(self, t0: float, t1: float) -> dict | None:
        """Mean utilization and most MiB used per GPU over the samples taken in [t0, t1]."""
        if self.proc is None:
            return None
        per_gpu: dict[str, list[tuple[float, float]]] = {}
        for line in self.path.read_text().splitlines():
            parts = [x.strip() for x in line.split(",")]
            if len(parts) != 4:
                continue
            try:
                t = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
                util, mib = float(parts[2]), float(parts[3])
            except ValueError:  # "[N/A]" where a reading is not supported
                continue
            if t0 - 1 <= t <= t1 + 1:
                per_gpu.setdefault(parts[1], []).append((util, mib))
        return {gpu: {"mean_util_pct": round(statistics.mean(u for u, _ in rows), 1),
                      "max_mib": max(m for _, m in rows), "samples": len(rows)} for gpu, rows in per_gpu.items()}


def sweep(value: str, matrix: Path, work: Path, args, env: dict, sampler: Sampler) -> dict:
    results, reports = work / f"rpg-{value}" / "results", work / f"rpg-{value}" / "reports"
    shutil.rmtree(work / f"rpg-{value}", ignore_errors=True)
    cmd = [sys.executable, "-m", "harness", "sweep", str(matrix), "--results", str(results), "--reports", str(reports),
           "--runs-per-gpu", value, "--wandb", "off", "--device", args.device]
    cmd += ["--jobs", str(args.jobs)] if args.jobs else []
    t0 = time.time()
    with open(work / f"sweep-rpg-{value}.log", "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    t1 = time.time()
    runs = [d for d in sorted((results / matrix.stem).glob("*")) if (d / "summary.json").exists()]
    summaries = [read_json(d / "summary.json") for d in runs]
    envs = [read_json(d / "env.json") for d in runs if (d / "env.json").exists()]
    statuses = Counter(s.get("status") for s in summaries)
    finished = sum(n for status, n in statuses.items() if status != "infeasible")
    walls = [s["wall_s"] for s in summaries if s.get("wall_s") is not None]
    peaks = [s["peak_memory_gib"] for s in summaries if s.get("peak_memory_gib") is not None]
    chose = [line for line in (work / f"sweep-rpg-{value}.log").read_text().splitlines() if "runs per GPU auto" in line]
    return {"runs_per_gpu": value, "exit": code, "wall_s": round(t1 - t0, 1), "runs": len(runs), "finished": finished,
            "ok": statuses.get("ok", 0), "statuses": dict(statuses),
            "runs_per_minute": round(finished / ((t1 - t0) / 60), 2) if t1 > t0 else None,
            "ok_per_minute": round(statuses.get("ok", 0) / ((t1 - t0) / 60), 2) if t1 > t0 else None,
            "median_run_wall_s": round(statistics.median(walls), 1) if walls else None,
            "max_peak_gib": round(max(peaks), 3) if peaks else None,
            "env_runs_per_gpu": dict(Counter(e.get("runs_per_gpu") for e in envs)), "auto": chose[-1].strip() if chose else None,
            "gpus": sampler.window(t0, t1), "log": str(work / f"sweep-rpg-{value}.log"), "command": " ".join(cmd)}


def table(rows: list[dict]) -> str:
    lines = ["| --runs-per-gpu | exit | wall s | finished (ok) | runs/min | median run s | peak GiB | env runs_per_gpu |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runs_per_gpu']} | {r['exit']} | {r['wall_s']} | {r['finished']} ({r['ok']}) "
                     f"| {r['runs_per_minute']} | {r['median_run_wall_s']} | {r['max_peak_gib']} | {r['env_runs_per_gpu']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("matrix", help="a matrix name (matrices/NAME.yaml) or a path to a YAML file")
    ap.add_argument("--runs-per-gpu", nargs="+", default=["1", "auto"], help="values to sweep with, e.g. 1 2 4 8 auto")
    ap.add_argument("--out", type=Path, required=True, help="the JSON summary")
    ap.add_argument("--steps", type=int, help="train.steps of every run (default: the matrix's)")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 per cell (default: the matrix's); more runs to pack")
    ap.add_argument("--jobs", type=int, help="passed to harness sweep: runs at a time in all")
    ap.add_argument("--device", default="auto", help="passed to harness sweep (auto, cuda, cuda:N)")
    ap.add_argument("--keep-eval", action="store_true", help="keep the matrix's eval: block (lm-eval installed)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/packing"), help="the sweeps' results and logs")
    args = ap.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    matrix = prepare(args.matrix, work, args.steps, args.seeds, args.keep_eval)

    from harness.models.tiny_arith import shipped

    shipped()  # once, before any sweep is timed
    env = os.environ | NO_MULTICAST
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, harness.execution.lifecycle"], cwd=ROOT,
                   env=env, check=True)  # a warm disk cache for the first sweep's workers, as for the others

    sampler, rows = Sampler(work / "nvidia-smi.csv"), []
    try:
        for value in args.runs_per_gpu:
            rows.append(sweep(value, matrix, work, args, env, sampler))
            print(f"--runs-per-gpu {value}: exit {rows[-1]['exit']}, {rows[-1]['wall_s']} s, {rows[-1]['finished']} runs "
                  f"finished ({rows[-1]['ok']} ok), {rows[-1]['runs_per_minute']} runs/min"
                  + (f"; {rows[-1]['auto']}" if rows[-1]["auto"] else ""), flush=True)
            write_json_atomic(args.out, {"matrix": args.matrix, "swept": str(matrix), "steps": args.steps, "seeds": args.seeds,
                                         "sweeps": rows})
    finally:
        sampler.stop()
    print(table(rows))


if __name__ == "__main__":
    main()
