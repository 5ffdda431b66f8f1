"""How often the adaptive verdict procedure errs, measured by resampling a sweep's real seeds.

    python bench/calibration.py results/calibration-h200 [--trials 2000] [--out reports/calibration-h200/calibration.md]

For every cell against its baseline: its finished runs and the baseline's are the pools. Each trial
puts them in a random order (paired by seed where the cells share seeds, independently for an A/A cell
on other seeds) and runs the sweep's own procedure on them (harness.results.simulate.resample:
judge_cell at each of the matrix's looks, next_round between them), so a cell's verdict is drawn as a
new sweep on those seeds would draw it. It is written for calibration matrices: the cell labelled A/A
is the baseline's configuration on other seeds, every other cell a broken control.
- A/A: should come out Converges; flagged (Convergence issue or Does not converge) is a false alarm,
  Inconclusive is neither.
- A/A moved to the tolerance's edge (each of its final scores lowered by `tolerance`): here either
  verdict is wrong, and the procedure promises a wrong Converges at most 1 - confidence of the time.
- A broken control (zero lr, a too-high lr, a 2-bit format): its share flagged is its detection rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from harness.config.matrix import Criteria
from harness.results.simulate import resample
from harness.results.verdict import judge

DETECTED = ("Convergence issue", "Does not converge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a sweep's results folder (results/<matrix>)")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--aa", default="A/A", help="label of the A/A cell(s)")
    ap.add_argument("--out", type=Path, help="also write the table here (Markdown) and a .json beside it")
    args = ap.parse_args()
    matrix = json.loads((args.root / "matrix.json").read_text())
    c = Criteria(**matrix["criteria"])
    looks = matrix.get("looks") or [0]
    verdicts = {v.name: v for v in judge(args.root, write=False)}
    rows, lines = [], []
    lines.append(f"Resampled from {args.root} ({args.trials} trials per cell; looks at {', '.join(map(str, looks))} seeds, "
                 f"tolerance {c.tolerance}, {c.confidence:.0%} over all looks, so at most {1 - c.confidence:.0%} wrong "
                 "verdicts at the tolerance's edge).\n")
    lines.append("| cell | expected | verdict on the whole pool (not the sweep's) | seeds in the pool (cell / baseline) | "
                 "Converges | Inconclusive | Convergence issue | Does not converge | other | mean seeds | rate | nominal |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in verdicts.values():
        if not v.baseline or v.baseline == v.name or v.baseline not in verdicts:
            continue
        cell = [r for r in v.runs if r.verdict != "incomplete"]
        base = [r for r in verdicts[v.baseline].runs if r.verdict != "incomplete"]
        cases = [("A/A", cell)] if v.label == args.aa else [("control", cell)]
        if v.label == args.aa:
            edge = [dataclasses.replace(r, eval_final=r.eval_final - c.tolerance) for r in cell if r.eval_final is not None]
            cases.append(("A/A at the edge", edge))
        for kind, runs in cases:
            shares = resample(base, runs, looks, c, args.trials, seed=0)
            pct = lambda s: f"{shares.get(s, 0):.1%}"  # noqa: E731
            flagged = sum(shares.get(s, 0) for s in DETECTED)
            rate, rate_is, nominal = {
                "A/A": (flagged, "false alarm (flagged)", f"no bound at Δ = 0 (the {1 - c.confidence:.0%} bound is at the edge)"),
                "A/A at the edge": (shares.get("Converges", 0), "wrong Converges",
                                    f"≤ {1 - c.confidence:.0%} (Bonferroni over the {len(looks)} looks)"),
                "control": (flagged, "detection (flagged)", "power: depends on Δ (README's table: ~100% at Δ = -0.1, sd 0.021)"),
            }[kind]
            other = 1 - sum(shares.get(s, 0) for s in ("Converges", "Inconclusive", *DETECTED))  # Error, Smoke tested...
            name = v.name + (f" scores − {c.tolerance}" if kind == "A/A at the edge" else "")
            expected = {"A/A": "Converges", "A/A at the edge": "not Converges", "control": "flagged"}[kind]
            rows.append({"cell": name, "expected": expected, "status": v.status, "seeds": len(v.runs),
                         "pool": [len(runs), len(base)], "shares": shares, "rate": rate, "rate_is": rate_is})
            lines.append(f"| {name} | {expected} | {v.status} ({len(v.runs)} seeds) | {len(runs)} / {len(base)} | "
                         f"{pct('Converges')} | {pct('Inconclusive')} | {pct('Convergence issue')} | "
                         f"{pct('Does not converge')} | {max(other, 0):.1%} | {shares['mean_seeds']:.1f} | "
                         f"{rate_is.split(' (')[0]} {rate:.1%} | {nominal} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
