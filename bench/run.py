"""`make bench`: every benchmark of the harness in one run, written to reports/bench/bench-<tag>.{json,md}.

    make bench                                              # CPU, tag "cpu"
    python bench/run.py --device cuda --tag h200            # a GPU machine (pip install -e '.[bench]' first)
    python bench/run.py --only trl overhead                 # a subset

Parts (each also runs alone; see its own --help):
  trl       GRPO step time of the harness vs TRL's GRPOTrainer, same work (bench/grpo_vs_trl.py)
  overhead  share of a harness step outside forward, backward, generate and optimizer step (bench/overhead.py)
  rollout   tokens/s of the hf and vllm rollout engines at several batch sizes (bench/rollout_engines.py)
  bytes     stored bytes per weight of each format's quantized linear layers vs theory (bench/bytes_per_param.py)
  memory    the memory-fit estimate vs the measured peak (bench/memory_fit.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.common.files import write_atomic
from harness.common.text import number

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bytes_per_param  # noqa: E402
import grpo_vs_trl  # noqa: E402
import overhead  # noqa: E402
import rollout_engines  # noqa: E402

PARTS = ("trl", "overhead", "rollout", "bytes", "memory")


def memory(device: str) -> dict:
    """In a child process of its own: each of its runs is measured as a fresh process's peak. On CPU the
    wide model is 512 x 4 (the GPU's 1024 x 8 peaks near 18 GiB of RSS and takes minutes a case)."""
    size = ["--hidden", "512", "--layers", "4"] if device == "cpu" else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory_fit.json"
        subprocess.run([sys.executable, str(HERE / "memory_fit.py"), "--device", device, "--out", str(out), *size], check=True)
        return json.loads(out.read_text())


def memory_markdown(result: dict) -> str:
    lines = ["| case | estimate GiB | measured GiB | estimate / measured |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['estimate_gib']:.3f} | {number(r['measured_gib'])} | {number(r['ratio'], 2)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", help="file name suffix (default: the device type)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--steps", type=int, default=10, help="timed GRPO steps per side and per profile")
    p.add_argument("--out-dir", type=Path, default=Path("reports/bench"))
    args = p.parse_args()
    device, tag = torch.device(args.device), args.tag or args.device
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"device_arg": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sections: list[str] = [f"# Benchmarks: {tag}", ""]

    if "trl" in args.only:
        result["trl"] = grpo_vs_trl.run(device, ("bf16", "nf4"), args.steps, 3)
        sections += ["## GRPO step: harness vs TRL GRPOTrainer", "", grpo_vs_trl.markdown(result["trl"]), ""]
        save(args.out_dir, tag, result, sections)
    if "overhead" in args.only:
        result["overhead"] = [overhead.profile(device, q, args.steps, 3) for q in ("bf16", "nf4")]
        sections += ["## Harness overhead (per step, exclusive times)", "", overhead.markdown(result["overhead"]), ""]
        save(args.out_dir, tag, result, sections)
    if "rollout" in args.only:
        result["rollout"] = rollout_engines.run(device)
        sections += ["## Rollout engines (completion tokens/s, max_new_tokens 16)", "",
                     rollout_engines.markdown(result["rollout"]), ""]
        save(args.out_dir, tag, result, sections)
    if "bytes" in args.only:
        result["bytes_per_param"] = bytes_per_param.run(device)
        sections += ["## Bytes per parameter of the quantized linear layers", "",
                     bytes_per_param.markdown(result["bytes_per_param"]), ""]
        save(args.out_dir, tag, result, sections)
    if "memory" in args.only:
        result["memory_fit"] = memory(args.device)
        sections += ["## Memory: estimate vs measured peak", "", memory_markdown(result["memory_fit"]), ""]
        save(args.out_dir, tag, result, sections)

    save(args.out_dir, tag, result, sections)
    print("\n" + "\n".join(sections))


def save(out_dir: Path, tag: str, result: dict, sections: list[str]) -> None:
    """After every part, so a crash or Ctrl-C keeps what was measured."""
    for name, text in ((f"bench-{tag}.json", json.dumps(result, indent=1)), (f"bench-{tag}.md", "\n".join(sections))):
        write_atomic(out_dir / name, text)


if __name__ == "__main__":
    main()
