"""One sweep spread over the GPUs of one host by the local executor, one run pinned to each GPU:

    python bench/multi_gpu_sweep.py OUT          # writes OUT/multi_gpu.md and OUT/multi_gpu.json

Four runs (the smoke matrix's bf16 and nf4 cells, seeds 0 and 1, no lm-eval) are swept three
times: over every visible GPU; over GPU 0 alone, named by UUID (the wall-time comparison, and
the UUID form of CUDA_VISIBLE_DEVICES); and over every GPU again with the first run on the last
GPU SIGKILLed once it has trained a quarter of its steps (the other runs must finish). On a
one-GPU host the first two are the same sweep, so only the UUID one runs.

nvidia-smi is sampled every second (utilization and memory per GPU, and which processes hold a
context on which GPU) so "every GPU busy at once" is counted, not eyeballed. Each run's env.json
says which GPU it had. The tiny model is built before any sweep, so no sweep's time includes it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.common.files import write_json_atomic  # noqa: E402
from harness.results.layout import read_json, read_metrics  # noqa: E402

# the device README: NVLink multicast stays off in NCCL, PyTorch and NVSHMEM, in every child too
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def smi(query: str, fields: str) -> list[list[str]]:
    """nvidia-smi's rows with every field present ("No running processes found" and the like dropped)."""
    out = subprocess.run(["nvidia-smi", f"--query-{query}={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[x.strip() for x in line.split(",")] for line in out.strip().splitlines()]
    return [r for r in rows if len(r) == fields.count(",") + 1]


def number(text: str) -> float:
    return float(text) if text.replace(".", "", 1).isdigit() else 0.0  # "[N/A]" where a reading is not supported


class Sampler(threading.Thread):
    """nvidia-smi once a second: [(time, {gpu index: (util %, MiB used)}, [(gpu uuid, pid, a run's worker?)])]."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.errors, self.stopped = [], [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            t = time.time()
            try:
                gpus = {int(i): (number(u), number(m)) for i, u, m in smi("gpu", "index,utilization.gpu,memory.used")}
                runs = {str(pid) for pid in workers()}  # the sweep process itself must not count as a run
                apps = [(u, p, p in runs) for u, p in smi("compute-apps", "gpu_uuid,pid")]
                self.samples.append((t, gpus, apps))
            except (subprocess.CalledProcessError, ValueError) as e:  # one lost sample, not a dead sampler
                self.errors.append(f"{t:.0f}: {e}")
            self.stopped.wait(max(0.0, 1.0 - (time.time() - t)))


def busy(samples, t0: float, t1: float, n_gpus: int) -> dict:
    """Seconds (1 s samples) in [t0, t1] where each GPU, and every GPU at once, computed (util > 0)
    and held a run (a harness.execution.worker with a CUDA context on it); and where a process that is not a
    run (the sweep itself) held one."""
    window = [s for s in samples if t0 <= s[0] <= t1]
    computing = [{i for i, (u, _) in g.items() if u > 0} for _, g, _ in window]
    holding = [{u for u, _, run in apps if run} for _, _, apps in window]
    return {"samples": len(window),
            "util_gt0_s": {i: sum(i in c for c in computing) for i in range(n_gpus)},
            "all_util_gt0_s": sum(len(c) == n_gpus for c in computing),
            "all_hold_run_s": sum(len(h) == n_gpus for h in holding),
            "other_process_s": sum(any(not run for *_, run in apps) for _, _, apps in window),
            "max_mib": {i: max((g[i][1] for _, g, _ in window), default=0) for i in range(n_gpus)}}


def workers(results: Path | None = None) -> dict[int, tuple[Path, str]]:
    """pid -> (run dir, CUDA_VISIBLE_DEVICES) of each harness.execution.worker (under `results`, when given)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"harness.execution.worker" not in argv or (
                    results and not any(a.decode().startswith(str(results)) for a in argv)):
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
            found[int(proc.name)] = (Path(argv[argv.index(b"harness.execution.worker") + 1].decode()),
                                     env.get("CUDA_VISIBLE_DEVICES"))
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours
    return found


def sweep(name: str, matrix: Path, work: Path, out: Path, env: dict, on_running=None) -> dict:
    results, reports = work / f"results-{name}", work / f"reports-{name}"
    t0 = time.time()
    with open(out / f"sweep-{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness", "sweep", str(matrix), "--results", str(results),
                                 "--reports", str(reports)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        extra = on_running(proc, results) if on_running else {}
        code = proc.wait()
    t1 = time.time()
    runs = {}
    for d in sorted((results / matrix.stem).iterdir()):
        if (d / "env.json").exists():
            e, s = read_json(d / "env.json"), read_json(d / "summary.json") if (d / "summary.json").exists() else {}
            runs[d.name] = {k: e.get(k) for k in ("cuda_visible_devices", "gpu_uuid", "gpu_pci_bus_id", "gpu")} | {
                "quant": read_json(d / "config.json").get("quant") if (d / "config.json").exists() else None,
                "status": s.get("status"), "steps_completed": s.get("steps_completed"), "error": (s.get("error") or "")[:160]}
    if (reports / matrix.stem / "report.md").exists():
        shutil.copy(reports / matrix.stem / "report.md", out / f"report-{name}.md")
    return {"name": name, "exit": code, "t0": t0, "t1": t1, "wall_s": round(t1 - t0, 1), "runs": runs} | extra


def kill_on_last_gpu(last_gpu: str, steps: int):
    """on_running hook: SIGKILL the first worker pinned to `last_gpu` once it has trained steps // 4
    steps; note which other runs were training at that moment (they must finish)."""
    def hook(proc: subprocess.Popen, results: Path) -> dict:
        while proc.poll() is None:
            live = workers(results)
            mine = [(pid, d) for pid, (d, gpu) in live.items() if gpu == last_gpu]
            for pid, d in mine:
                if (step := max((r["step"] for r in read_metrics(d)), default=0)) >= steps // 4:
                    os.kill(pid, signal.SIGKILL)
                    return {"killed": {"run": d.name, "pid": pid, "gpu": last_gpu, "at_step": step, "t": time.time()},
                            "running_elsewhere": {d2.name: gpu2 for p2, (d2, gpu2) in live.items() if p2 != pid}}
            time.sleep(0.2)
        return {"killed": None}
    return hook


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, help="train.steps of every run (default: the smoke matrix's); fewer to check the script")
    ap.add_argument("--work", type=Path, default=Path("/tmp/multi_gpu"), help="results/ and reports/ of the sweeps")
    args = ap.parse_args()
    out, work = args.out.resolve(), args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    spec = yaml.safe_load((ROOT / "matrices" / "smoke.yaml").read_text())
    for block in ("eval", "include", "tune"):  # lm-eval is not on the GPU machines; the zero-lr control is not needed
        spec.pop(block, None)
    spec["axes"]["quant"] = ["bf16", "nf4"]
    spec["base"]["train"]["steps"] = args.steps or spec["base"]["train"]["steps"]
    matrix = work / "smoke4.yaml"
    matrix.write_text(yaml.safe_dump(spec, sort_keys=False))
    steps = spec["base"]["train"]["steps"]

    from harness.models.tiny_arith import shipped
    shipped()  # once, before any sweep is timed

    gpus = smi("gpu", "index,uuid,pci.bus_id,name")
    env = os.environ | NO_MULTICAST
    sampler = Sampler()
    sampler.start()
    plan = [("one-gpu-by-uuid", env | {"CUDA_VISIBLE_DEVICES": gpus[0][1]}, None),
            ("kill", env, kill_on_last_gpu(gpus[-1][0], steps))]
    if len(gpus) > 1:
        plan.insert(0, ("all-gpus", env, None))
    sweeps = []
    for name, sweep_env, hook in plan:  # the summary is rewritten after each sweep: a cut-off run keeps what finished
        sweeps.append(sweep(name, matrix, work, out, sweep_env, hook))
        sweeps[-1]["busy"] = busy(sampler.samples, sweeps[-1]["t0"], sweeps[-1]["t1"], len(gpus))
        write_json_atomic(out / "multi_gpu.json", {"gpus": gpus, "sweeps": sweeps, "nvidia_smi": sampler.samples,
                                                   "nvidia_smi_errors": sampler.errors})
        (out / "multi_gpu.md").write_text(summary(gpus, sweeps))
    sampler.stopped.set()
    print((out / "multi_gpu.md").read_text())


def summary(gpus, sweeps) -> str:
    lines = ["# One sweep over the GPUs of one host (local executor)", "",
             f"`python bench/multi_gpu_sweep.py OUT` on {len(gpus)} GPU(s): "
             + "; ".join(f"{i}: {n} {u} ({b})" for i, u, b, n in gpus) + ".", "",
             "| sweep | exit | wall s | runs ok | s with every GPU computing | s with every GPU holding a run "
             "| s with a non-run process on a GPU | peak MiB per GPU |", "|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        ok = sum(r["status"] == "ok" for r in s["runs"].values())
        b = s["busy"]
        lines.append(f"| {s['name']} | {s['exit']} | {s['wall_s']} | {ok}/{len(s['runs'])} "
                     f"| {b['all_util_gt0_s']}/{b['samples']} | {b['all_hold_run_s']}/{b['samples']} | {b['other_process_s']} "
                     f"| {', '.join(f'{m:.0f}' for m in b['max_mib'].values())} |")
    wall = {s["name"]: s["wall_s"] for s in sweeps}
    if {"all-gpus", "one-gpu-by-uuid"} <= wall.keys():
        lines += ["", f"Wall time of the same 4 runs over {len(gpus)} GPUs: {wall['all-gpus']} s; over GPU 0 alone: "
                  f"{wall['one-gpu-by-uuid']} s ({wall['one-gpu-by-uuid'] / wall['all-gpus']:.2f}x)."]
    lines += ["", "| sweep | run | quant | CUDA_VISIBLE_DEVICES | GPU UUID (env.json) | PCI bus | status | steps |",
              "|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        for run, r in s["runs"].items():
            lines.append(f"| {s['name']} | {run} | {r['quant']} | {r['cuda_visible_devices']} | {r['gpu_uuid']} "
                         f"| {r['gpu_pci_bus_id']} | {r['status']} | {r['steps_completed']} |")
    kill = next((s for s in sweeps if s["name"] == "kill"), None)
    if kill and kill.get("killed"):
        k = kill["killed"]
        lines += ["", f"Kill: run {k['run']} on CUDA_VISIBLE_DEVICES={k['gpu']} SIGKILLed at step {k['at_step']}; "
                  f"training elsewhere at that moment: {kill['running_elsewhere'] or 'none'}; "
                  f"afterwards: {', '.join(run + ' ' + str(r['status']) for run, r in kill['runs'].items())}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
