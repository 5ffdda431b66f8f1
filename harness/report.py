"""reports/<matrix>/report.md from verdicts.json and results/ alone (no training, seconds to run)."""

from __future__ import annotations

import html
import os
import statistics
from pathlib import Path

from harness.results import read_json

STATUS_MARK = {"Converges": "✅", "Convergence issue": "⚠️", "Does not converge": "❌", "Error": "💥", "Incomplete": "⏳"}


def md(text) -> str:
    """Escape a string from a run (names, errors, completions) for a Markdown table cell."""
    text = html.escape(str(text), quote=False).replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.split())


def _ms(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _num(x, digits=3, signed=False) -> str:
    return "–" if x is None else (f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}")


def write_report(root: Path, out_dir: Path) -> Path:
    matrix, cells = read_json(root / "matrix.json"), read_json(root / "verdicts.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_link = os.path.relpath(root, out_dir)
    axes = matrix["axes"]
    c = matrix["criteria"]
    lines = [
        f"# Verified configurations: `{md(matrix['name'])}`",
        "",
        md(matrix["description"]),
        "",
        f"Regenerate: `harness report {md(matrix['name'])}`. Re-run: `make sweep MATRIX={md(matrix['name'])}`.",
        "",
        "## Convergence matrix",
        "",
        "| " + " | ".join([*axes, "variant", "Status", "eval/reward start", "eval/reward end", "gain", "Δ vs baseline",
                          "max KL", "peak mem (GiB)", "median step (s)", "seeds", "why"]) + " |",
        "|" + "---|" * (len(axes) + 11),
    ]
    for cell in cells:
        runs = cell["runs"]
        get = lambda f: [r[f] for r in runs if r[f] is not None]  # noqa: E731
        finished = sum(r["verdict"] != "incomplete" for r in runs)
        row = [md(cell["key"][a]) for a in axes] + [
            md(cell["label"] or ("baseline" if cell["baseline"] == cell["name"] else "")),
            f"{STATUS_MARK.get(cell['status'], '')} **{cell['status']}**",
            _ms(get("eval_start")),
            _ms(get("eval_end")),
            _ms(get("gain")),
            _num(cell["delta_vs_baseline"], signed=True),
            _num(max(get("max_kl"), default=None), 3),
            _num(max(get("peak_memory_gib"), default=None), 2),
            _num(statistics.median(get("median_step_s")) if get("median_step_s") else None, 2),
            f"{finished}/{len(runs)}",
            md(cell["reason"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "eval/reward is greedy accuracy on the held-out prompts, at step 0 and at the last step, "
        "mean ± sd over seeds. Δ vs baseline: difference of mean final eval/reward with the "
        f"baseline cell ({md(', '.join(f'{k}={v}' for k, v in matrix['baseline'].items()))}) that shares the other axes. "
        "Peak memory: the CUDA allocator's peak on GPU, the process's peak RSS on CPU.",
        "",
        "## Criteria (from the matrix)",
        "",
        *[f"- `{k}`: {v}" for k, v in c.items()],
        "",
        "- per run: **converged** when held-out gain ≥ `min_gain`; **no_learning** below it; "
        "**collapsed** below it with final entropy under `entropy_floor`; **diverged** on any NaN/inf "
        "or KL above `kl_max`; **failed**/**oom** on an exception.",
        "- per cell: **Converges** when every seed converged and the mean final eval/reward is at most "
        "`tolerance` below the baseline's; **Convergence issue** when it learns but falls further "
        "behind, or some seeds do not learn; **Does not converge** when no seed learns.",
        "",
        "## Runs",
        "",
        "| cell | seed | run | verdict | eval start → end | max KL | final entropy | rollout tok/s | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for r in cell["runs"]:
            lines.append(
                f"| {md(cell['name'])} | {r['seed']} | [{r['run_id']}]({runs_link}/{r['run_id']}/) | {r['verdict']} | "
                f"{_num(r['eval_start'])} → {_num(r['eval_end'])} | {_num(r['max_kl'], 4)} | {_num(r['final_entropy'], 3)} | "
                f"{_num(r['rollout_tokens_per_s'], 0)} | {md(r['reason'])} |"
            )
    env = _first_env(root, cells)
    if env:
        lines += ["", "## Environment", "", f"- device: {md(env.get('device'))}", f"- git commit: `{md(env.get('git_commit'))}`"]
        lines += [f"- {k}: {md(v)}" for k, v in env.get("versions", {}).items()]
    lines += ["", "## Matrix", "", "```yaml", matrix["source"].replace("```", "` ` `").rstrip(), "```", ""]
    path = out_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path


def _first_env(root: Path, cells: list[dict]) -> dict | None:
    for cell in cells:
        for r in cell["runs"]:
            if (root / r["run_id"] / "env.json").exists():
                return read_json(root / r["run_id"] / "env.json")
    return None
