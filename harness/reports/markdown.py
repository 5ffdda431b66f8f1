"""reports/<matrix>/report.{md,html} from verdicts.json and results/ alone (no training, seconds).

`cell_rows` computes every number once; the Markdown and HTML writers only lay them out, each
escaping what came from a run (names, errors, completions) for its own format.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from harness.common.files import write_atomic
from harness.common.numbers import mean, median
from harness.common.text import number, visible
from harness.config.matrix import Criteria
from harness.results.layout import read_json, read_metrics, read_summary

FIXED_AXES = ("algorithm", "quant", "rollout.colocation")


def md(text) -> str:
    """Escape a string from a run for a Markdown table cell."""
    text = html.escape(visible(text), quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return " ".join(text.split())


def md_table(titles: list[str], rows: list[list[str]]) -> list[str]:
    """A GFM table: the titles escaped, the cells already Markdown (escape what comes from runs with `md`)."""
    return (["| " + " | ".join(md(t) for t in titles) + " |", "|" + "---|" * len(titles)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def load(root: Path) -> tuple[dict, list[dict]]:
    return read_json(root / "matrix.json"), read_json(root / "verdicts.json")


def run_config(root: Path, cell: dict) -> dict:
    for r in cell["runs"]:
        if (root / r["run_id"] / "config.json").exists():
            return read_json(root / r["run_id"] / "config.json")
    return {}


def kl_text(runs: list[dict]) -> str:
    """The KL evidence of a cell: its largest rolling median (what is judged), then its largest single step and
    how many steps spiked above kl_max (shown, not judged)."""
    medians = [r["kl_median_max"] for r in runs if r["kl_median_max"] is not None]
    peaks = [r["max_kl"] for r in runs if r["max_kl"] is not None]
    if not medians:
        return number(max(peaks, default=None))
    spikes = sum(r["kl_spikes"] for r in runs)
    judged = "" if all(r["kl_judged"] for r in runs) else " (not judged)"
    return f"{max(medians):.3f} / {max(peaks):.2f} ({spikes} spike{'s' if spikes != 1 else ''}){judged}"


def cell_rows(root: Path, matrix: dict, cells: list[dict]) -> list[dict]:
    """One dict of display strings per cell, in the shape of NeMo RL's verified-configuration table."""
    rows = []
    other_axes = [a for a in matrix["axes"] if a not in FIXED_AXES]
    for cell in cells:
        cfg, runs = run_config(root, cell), cell["runs"]
        get = lambda f: [r[f] for r in runs if r[f] is not None]  # noqa: E731
        ci, se = cell["eval_final_ci"], cell["eval_se"]
        variant = ", ".join([f"{a}={cell['key'][a]}" for a in other_axes] + [cell["label"] or ""]).strip(", ")
        if cell["baseline"] == cell["name"]:
            variant = (variant + " (baseline)").strip()
        lo, hi = cell["delta_lower_bound"], cell["delta_upper_bound"]
        rows.append({
            "workflow": str(cell["key"].get("algorithm", cfg.get("algorithm", "?"))).upper(),
            "quantization": str(cell["key"].get("quant", cfg.get("quant", "?"))),
            "colocation": str(cell["key"].get("rollout.colocation", cfg.get("rollout", {}).get("colocation", "?"))),
            "variant": variant,
            "status": cell["status"],
            "reason": cell["reason"],
            "eval_end_mean": number(cell["eval_final_mean"]),
            "eval_end": number(cell["eval_final_mean"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + (f" ±{se:.3f}" if se else ""),
            "eval_start": number(mean(get("eval_start"))),
            "delta": number(cell["delta_vs_baseline"], signed=True) + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None else ""),
            "max_kl": kl_text(runs),
            "entropy": number(mean(get("final_entropy"))),
            "memory": number(max(get("peak_memory_gib"), default=None), 2)
            + (f" ({est:.2f})" if (est := max(get("memory_estimate_gib"), default=None)) is not None else ""),
            "tokens_per_s": number(median(get("rollout_tokens_per_s")), 0),
            "step_s": number(median(get("median_step_s")), 2),
            "seeds": f"{sum(r['verdict'] != 'incomplete' for r in runs)}/{len(runs)}"
            + (f" (look {cell.get('look', 1)}/{cell['looks']})" if cell.get("looks", 1) > 1 else ""),
            "test": cell["test"],
        })
    return rows


# The rollout engines side by side: medians over a cell's steps (pooled over seeds), except the largest memory reading
ENGINE_METRICS = [("throughput/rollout_tokens_per_s", "rollout tok/s", 0), ("time/rollout_s", "rollout s", 3),
                  ("time/sync_s", "sync s", 3), ("time/sleep_s", "sleep s", 3), ("time/wake_s", "wake s", 3),
                  ("memory/sleep_freed_gib", "freed by sleep GiB", 2), ("memory/rollout_peak_gib", "rollout peak GiB", 2),
                  ("memory/device_used_gib", "device used GiB", 2), ("memory/server_gib", "server GiB", 2),
                  ("mismatch/logprob_diff_mean", "|Δ logprob|", 5), ("mismatch/k3_kl", "k3 KL", 6),
                  ("mismatch/is_ratio_mean", "IS ratio", 4), ("mismatch/ratio_out_of_cap_frac", "ratio out of cap", 4)]
ENGINE_COLUMNS = [("cell", "cell"), ("engine", "engine"), ("rollout_quant", "rollout weights"), ("hand_off", "hand-off")] + \
                 [(k, title) for k, title, _ in ENGINE_METRICS]


def _rollout_weights(facts: dict) -> str:
    if facts.get("rollout_engine") != "vllm":
        return "the trainer's"
    q = facts.get("vllm_quantization", "?")
    return f"unquantized ({facts.get('vllm_dtype', '?')})" if q == "none" else q


def engine_rows(root: Path, cells: list[dict]) -> list[dict]:
    """Per cell, how its rollouts were made and what they cost: the colocation comparison."""
    rows = []
    for cell in cells:
        summaries = [x for r in cell["runs"] if (x := read_summary(root / r["run_id"]))]
        steps = [m for r in cell["runs"] for m in read_metrics(root / r["run_id"]) if m["step"] > 0]
        facts = next((x for x in summaries if x.get("rollout_engine")), summaries[0] if summaries else {})
        row = {"cell": cell["name"], "engine": facts.get("rollout_engine", "–"),
               "rollout_quant": _rollout_weights(facts),
               "hand_off": facts.get("hand_off", "–")}
        for key, _, digits in ENGINE_METRICS:
            values = [m[key] for m in steps if isinstance(m.get(key), (int, float))]
            pick = max(values, default=None) if key.startswith("memory/") else median(values)
            row[key] = number(pick, digits)
        rows.append(row)
    return rows


LM_EVAL_COLUMNS = [("cell", "cell"), ("task", "task"), ("metric", "metric"), ("quantized", "quantized base + adapter"),
                   ("bf16", "bf16 base + adapter"), ("eval_reward", "harness last eval/reward"),
                   ("n", "documents"), ("seeds", "seeds")]
LM_EVAL_TEXT = ("lm-evaluation-harness on each run's final policy after training (eval.lm_eval in the matrix), mean over the "
                "cell's seeds. qrl_* tasks score the run's own held-out set, so they should agree with its eval/reward; "
                "the bf16 column puts the same adapter on the unquantized base.")


def lm_eval_rows(cells: list[dict]) -> list[dict]:
    """Per cell, task and metric: the lm-eval score on the quantized and on the bf16 base, beside eval/reward."""
    rows = []
    for cell in cells:
        runs = [r for r in cell["runs"] if r.get("lm_eval")]
        done = [r for r in runs if "quantized" in r["lm_eval"]]
        for task in sorted({t for r in done for t in r["lm_eval"]["quantized"]}):
            scores = lambda r, key: (r["lm_eval"].get(key) or {}).get(task) or {}  # noqa: E731
            names = sorted({m for r in done for m, v in scores(r, "quantized").items()
                            if m != "n" and not m.endswith("_stderr") and isinstance(v, (int, float))})
            for metric in names:
                pick = lambda key: [x for r in done if isinstance(x := scores(r, key).get(metric), (int, float))]  # noqa: E731
                rows.append({"cell": cell["name"], "task": task, "metric": metric,
                             "quantized": number(mean(pick("quantized"))), "bf16": number(mean(pick("bf16"))),
                             # the last eval: the policy lm-eval scored
                             "eval_reward": number(mean([r["eval_end"] for r in done if r["eval_end"] is not None])),
                             "n": str(scores(done[0], "quantized").get("n", "–")),
                             "seeds": f"{len(done)}/{len(cell['runs'])}"})
        for r in runs:
            if "error" in r["lm_eval"]:
                rows.append({"cell": cell["name"], "task": "(failed)", "metric": r["lm_eval"]["error"],
                             "quantized": "–", "bf16": "–", "eval_reward": "–", "n": "–", "seeds": f"seed {r['seed']}"})
    return rows


COLUMNS = [("workflow", "Workflow"), ("quantization", "Quantization"), ("colocation", "Colocation"), ("variant", "Variant"),
           ("status", "Status"), ("eval_start", "eval/reward start"), ("eval_end", "final eval/reward [CI] ±1 eval se"),
           ("delta", "Δ vs baseline [one-sided bounds]"), ("max_kl", "KL median max / step max (spikes)"),
           ("entropy", "final entropy"), ("memory", "peak mem GiB (est.)"), ("tokens_per_s", "rollout tok/s"),
           ("step_s", "median step s"), ("seeds", "seeds"), ("reason", "why")]
STATUS_MARK = {"Converges": "✅", "Inconclusive": "❔", "Convergence issue": "⚠️", "Does not converge": "❌", "Error": "💥",
               "Infeasible": "🚫", "Incomplete": "⏳", "Smoke tested": "🔹", "Not judged (random weights)": "🎲"}


def score_name(matrix: dict, cells: list[dict]) -> str:
    """The metric the verdicts judged (criteria.score): eval/reward, or the eval/avg@k the runs logged."""
    if Criteria(**matrix["criteria"]).score == "greedy":
        return "eval/reward"
    names = {r.get("score") for c in cells for r in c["runs"] if str(r.get("score")).startswith("eval/avg@")}
    return names.pop() if len(names) == 1 else "eval/avg@k"


def columns(score: str) -> list[tuple[str, str]]:
    """COLUMNS, their titles naming the metric judged."""
    return [(k, t.replace("eval/reward", score)) for k, t in COLUMNS]


def algorithm_grid(rows: list[dict]) -> tuple[list[str], list[tuple[str, dict[str, tuple[str, str]]]]]:
    """The convergence matrix with one column per algorithm, as vendors' verified-configuration tables read:
    (algorithm columns, [(row label, {algorithm: (status, final eval/reward)})]). Nothing with one algorithm."""
    algorithms = list(dict.fromkeys(r["workflow"] for r in rows))
    if len(algorithms) < 2:
        return [], []
    grid: dict[str, dict[str, tuple[str, str]]] = {}
    for r in rows:
        label = " · ".join(x for x in (r["quantization"], r["colocation"], r["variant"].replace("(baseline)", "").strip())
                           if x and x != "?")
        grid.setdefault(label, {})[r["workflow"]] = (r["status"], r["eval_end_mean"])
    return algorithms, list(grid.items())


def method_text(matrix: dict, score: str = "eval/reward") -> str:
    c = Criteria(**matrix["criteria"]).model_dump()  # with the defaults of knobs the matrix does not set
    base = ", ".join(f"{k}={v}" for k, v in matrix["baseline"].items()) or "none"
    greedy = c["score"] == "greedy"
    judged = ("eval/reward is greedy accuracy on held-out prompts. " if greedy else
              f"The verdicts judge {score} (criteria.score: avg): the mean reward of k completions sampled per held-out "
              "prompt at eval.temperature (top_p 1), an estimate of pass@1; the greedy eval/reward is logged beside it. ")
    n = "" if greedy else " (n = held-out prompts × k: a lower bound, as samples of one prompt share its difficulty)"
    return (
        f"{judged}A run's final score is the mean of its evals in the last "
        f"{c['final_window']:.0%} of training (one eval is too noisy to judge on); "
        f"± gives one eval's binomial standard error at that "
        f"score{n}. Its gain is that score minus the step-0 eval; it learns when the gain is ≥ {c['min_gain']}. It diverges on a "
        f"non-finite value, on a sustained KL rise (the median of kl over {c['kl_window']} steps above {c['kl_max']}; only for "
        f"recipes with a KL term in their loss: grpo and rloo with beta > 0) or when its final score and its last eval both fall "
        f"more than {c['drop_max']} below its best eval. Single steps of kl above {c['kl_max']} are counted as spikes and "
        f"shown, not judged: the k3 estimator is "
        f"heavy-tailed. A cell's final {score}: mean over the seeds that trained to the end, with a two-sided "
        f"{c['confidence']:.0%} t-interval. Δ vs baseline: that minus the baseline cell's ({base}, same other axes), with its "
        f"one-sided {c['confidence']:.0%} bounds in brackets (each one-sided, so together a {2 * c['confidence'] - 1:.0%} "
        f"interval; paired by seed when both cells finished the same seeds, Welch otherwise). "
        f"Converges: every seed learns and is stable, and the lower bound is above -{c['tolerance']} (the baseline cell: "
        f"learning and stability alone). Inconclusive: the bounds straddle -{c['tolerance']}; the reason gives the seeds that "
        f"would likely decide it. Convergence issue: the upper bound is below -{c['tolerance']} (shown worse), or some seeds "
        f"diverge, collapse or do not learn while others learn, or seeds learn but diverge. Does not converge: no seed learns. "
        f"A cell whose baseline cell is excluded is at most 'Smoke "
        f"tested', as is one with fewer than {c['min_seeds']} finished seeds. Peak memory: the CUDA allocator's peak on GPU, the "
        "process's peak RSS on CPU; in brackets the pre-check's estimate of it (harness/execution/memory_fit.py), "
        "made before the run was "
        "launched. Infeasible: that estimate did not fit the device, so the run was not launched. Not judged (random "
        "weights): a model named shape:..., a released architecture with random weights, run for throughput and memory only."
        + (adaptive_text(matrix["looks"], c["confidence"], matrix.get("looks_k"))
           if matrix.get("adaptive") or (matrix.get("looks_k") or 1) > len(matrix.get("looks") or [0]) else "")
    )


def adaptive_text(looks: list[int], confidence: float, k: int | None = None) -> str:
    k = max(k or 0, len(looks))
    per_look = f"{1 - (1 - confidence) / k:.1%}".replace(".0%", "%")
    edited = (f" (the sweep's seeds were edited after it had planned {k} looks: each keeps a 1/{k} share)"
              if k > len(looks) else "")
    return (f" Adaptive seeds: every cell ran {looks[0]} seeds first; after each round, the cells still Inconclusive "
            f"(and their baseline cells, so pairing holds) ran more, at looks of {', '.join(map(str, looks))} seeds. "
            f"Each look bounds Δ at {per_look}{edited} (Bonferroni over the looks), so a wrong Converges, and "
            f"separately a wrong Convergence issue from the bounds, each has at most a {1 - confidence:.0%} chance over the "
            "whole sequence; "
            "the seeds column says at which look each verdict was reached, and a cell is compared with its "
            "baseline's first seeds, as many as its own.")


ENGINE_TEXT = ("Medians over every training step of a cell's seeds; memory columns give the largest reading. rollout s is "
               "generation alone; sync s pushes the trainer's adapter (or weights) into vLLM; sleep/wake s and 'freed by sleep' "
               "are the colocated hand-off on CUDA (vLLM has none on CPU). "
               "rollout peak: the trainer process's allocator (CUDA) or "
               "RSS (CPU); device used: the whole GPU, vLLM's reservation included; server: the vllm serve process's RSS, or its "
               "GPU when it has one. Mismatch compares the trainer's recomputed log-probs of the sampled tokens with the "
               "engine's: |Δ logprob| per token, k3 estimate of KL(sampler || trainer), mean p_train/p_sampler, and the share of "
               "tokens with that ratio outside [1/mismatch_cap, mismatch_cap].")


def write_markdown(root: Path, out_dir: Path, matrix: dict, cells: list[dict], rows: list[dict],
                   sections: Sequence[str] = ()) -> Path:
    """`sections`: Markdown lines of sections built elsewhere (mismatch.py, which builds on md and md_table here),
    placed before the environment."""
    runs_link = os.path.relpath(root, out_dir)
    name = md(matrix["name"])
    score = score_name(matrix, cells)
    lines = [f"# Verified configurations: `{name}`", "", md(matrix["description"]), "",
             f"Regenerate: `harness report {name}`. Re-run: `make sweep MATRIX={name}`. Plots: `report.html`.", "",
             *([notes, ""] if (notes := report_notes(out_dir)) else []),
             *md_table([title for _, title in columns(score)],
                       [[f"{STATUS_MARK.get(row['status'], '')} **{md(row['status'])}**" if k == "status" else md(row[k])
                         for k, _ in COLUMNS]
                        for row in rows])]
    algorithms, grid = algorithm_grid(rows)
    if grid:
        mark = lambda x: f"{STATUS_MARK.get(x[0], '')} {md(x[0])}, {md(x[1])}" if x else "–"  # noqa: E731
        lines += ["", "### By algorithm", "",
                  *md_table(["Quantization · colocation", *algorithms],
                            [[md(label)] + [mark(by.get(a)) for a in algorithms] for label, by in grid])]
    run_titles = ["cell", "seed", "run", "verdict", "eval start → final (last)", "KL median max / step max (spikes)",
                  "final entropy", "reason"]
    lines += ["", md(method_text(matrix, score)), "", "## Runs", "",
              *md_table(run_titles, [[md(cell["name"]), md(r["seed"]),
                                      f"[{md(r['run_id'])}]({runs_link}/{r['run_id']}/)", md(r["verdict"]),
                                      f"{number(r['eval_start'])} → {number(r['eval_final'])} ({number(r['eval_end'])})",
                                      md(kl_text([r])), number(r["final_entropy"]), md(r["reason"])]
                                     for cell in cells for r in cell["runs"]])]
    studies = tuning_reports(out_dir)
    if studies:
        lines += ["", "## Tuning studies", ""] + [f"- [{md(p.stem.removeprefix('tune_'))}]({p.name})" for p in studies]
    evals = lm_eval_rows(cells)
    if evals:
        lines += ["", "## Held-out evaluation (lm-eval)", "", md(LM_EVAL_TEXT), "",
                  *md_table([title for _, title in LM_EVAL_COLUMNS], [[md(row[k]) for k, _ in LM_EVAL_COLUMNS] for row in evals])]
    lines += ["", "## Rollout engines", "", md(ENGINE_TEXT), "",
              *md_table([title for _, title in ENGINE_COLUMNS],
                        [[md(row[k]) for k, _ in ENGINE_COLUMNS] for row in engine_rows(root, cells)])]
    lines += list(sections)
    env = first_env(root, cells)
    if env:
        lines += ["", "## Environment", "", f"- device: {md(env.get('device'))}", f"- git commit: `{md(env.get('git_commit'))}`"]
        if env.get("model"):
            model = env["model"]
            lines += [f"- model: {md(model['name'])}" + (f", sha256 `{md(model['sha256'])}`" if model.get("sha256") else "")
                      + (f" (shipped {md(model['shipped'])})" if model.get("shipped") else "")
                      + (f": {md(random_weights_text(model))}" if model.get("random_weights") else "")]
        if env.get("compute_dtype"):
            lines += [f"- compute dtype: {md(env['compute_dtype'])}"]
        lines += [f"- {k}: {md(v)}" for k, v in env.get("versions", {}).items()]
    lines += ["", "## Matrix", "", "```yaml", visible(matrix["source"]).replace("```", "` ` `").rstrip(), "```", ""]
    return write_atomic(out_dir / "report.md", "\n".join(lines))


def random_weights_text(model: dict) -> str:
    """What a report says of a `shape:` model, from its facts in env.json (models.loading.identity)."""
    return (f"random weights with {model.get('config_of')}'s architecture ({model.get('parameters', 0):,} parameters), "
            f"tokenizer: {model.get('tokenizer')}; run for throughput and memory only, so its cells are not judged")


def report_notes(out_dir: Path) -> str:
    """reports/<matrix>/notes.md, written by a person (how and where the sweep was run, what to read
    into it), shown at the top of both reports so that regenerating them keeps it."""
    path = out_dir / "notes.md"
    return path.read_text().strip() if path.exists() else ""


def tuning_reports(out_dir: Path) -> list[Path]:
    """The `harness tune` reports beside this matrix's report."""
    return sorted(out_dir.glob("tune_*.md"))


def first_env(root: Path, cells: list[dict]) -> dict | None:
    for cell in cells:
        for r in cell["runs"]:
            if (root / r["run_id"] / "env.json").exists():
                return read_json(root / r["run_id"] / "env.json")
    return None
