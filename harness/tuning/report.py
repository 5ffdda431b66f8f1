"""reports/<matrix>/tune_<study>.{md,html} and tune_<study>/*.svg, from the study's storage alone.

Best trial (or Pareto front) and its config, which differences from it the trials' seeds resolve
(harness/tuning/differences.py), every trial, parameter importances, and Optuna's
own plots (optimization history, contour of the first two parameters, Pareto front) drawn with
matplotlib into standalone SVG files; the HTML embeds them as data URIs so it stays one file.
What came from runs (errors, parameter values) is escaped for each format.
"""

from __future__ import annotations

import base64
import os
import re
import statistics
from pathlib import Path
from urllib.parse import quote

import optuna
from optuna.trial import TrialState

from harness.common.files import write_atomic
from harness.common.text import significant
from harness.config.tune_space import binomial_se, defaults
from harness.reports.html import CSS, e
from harness.reports.markdown import md
from harness.tuning.differences import compare, rule
from harness.tuning.study import Study, best_trials, shown, tally
from harness.tuning.trial import seed_scores

COLUMNS = [("number", "trial"), ("state", "state"), ("params", "parameters"), ("values", "objective"),
           ("eval_start", "eval start"), ("steps", "steps"), ("memory", "peak GiB"), ("wall", "wall s"), ("worker", "worker"),
           ("run", "run"), ("note", "note")]


IMPORTANCE_TEXT = ("Optuna's PED-ANOVA importances over the {n} finished trials: how far each parameter's values among the "
                   "best 10% of trials stand apart from its values over all of them, normalised to sum to 1. Under 10 finished "
                   "trials the best 10% is the single best trial, so read them as a hint, not a measurement.")


def code(text) -> str:
    """Inline Markdown code: backticks long enough that none inside can close it; no HTML escaping inside."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if text.startswith("`") or text.endswith("`") else f"{fence}{text}{fence}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "study"


def paths(reports: Path, study: Study) -> tuple[Path, Path]:
    """(tune_<study>.md, tune_<study>/ for the plots)."""
    base = reports / study.matrix / f"tune_{slug(study.name)}"
    return base.with_suffix(".md"), base


def trial_rows(s: optuna.Study, study: Study, out_dir: Path) -> list[dict]:
    rows = []
    for t in s.get_trials(deepcopy=False):
        a = t.user_attrs
        note = a.get("error") or ""
        if t.state == TrialState.FAIL and "status" not in a:
            note = "lost: its worker was killed or interrupted"
        if (first := optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None:
            note = f"retry of trial {first}. {note}".strip()
        if t.number == 0 and a.get("queued"):
            note = f"{a['queued']}. {note}".strip(". ")
        run_id = a.get("run_id")
        rows.append({
            "number": str(t.number), "state": t.state.name.lower(),
            "params": ", ".join(f"{k}={significant(v)}" for k, v in t.params.items()),
            "values": (", ".join(significant(v) for v in t.values) if t.state == TrialState.COMPLETE else
                       f"({significant(t.values[0])} at step {t.last_step})" if t.values and t.last_step is not None else "–"),
            "eval_start": significant(a.get("eval_start")), "steps": significant(a.get("steps_completed")),
            "memory": significant(a.get("peak_memory_gib"), 3), "wall": significant(a.get("wall_s"), 3),
            "worker": a.get("worker", "–"), "run": run_id or "–",
            "run_link": os.path.relpath(study.run_dir(run_id), out_dir) + "/" if run_id else None,
            "note": note,
        })
    return rows


def summary(s: optuna.Study, study: Study) -> dict:
    """The numbers a reader wants first: the best trial(s), the spread, the noise of one evaluation."""
    complete = [t for t in s.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    evals = sorted(t.values[0] for t in complete)
    best = best_trials(s)
    n_eval = study.cell_cfg.task.eval_size
    return {
        "counts": tally(s) | {state: sum(t.state.name.lower() == state for t in s.get_trials(deepcopy=False))
                             for state in ("complete", "pruned", "fail")},
        "best": best,
        "spread": (evals[0], statistics.median(evals), evals[-1]) if evals else None,
        "se": binomial_se(best[0].values[0], n_eval) if best else None,
        "eval_size": n_eval,
        "importances": _importances(s, len(complete)),
        "common": _common_step(s),
        "differences": _differences(complete, best, study),
    }


def _differences(complete: list, best: list, study: Study) -> list:
    """Each of the top trials and the matrix's own values against the best, seed by seed."""
    if not best:
        return []
    own = defaults(study.cell_cfg, study.spec)
    scores = {t.number: seed_scores(t) or {study.trial_seeds[0]: t.values[0]} for t in complete}  # a study from before seeds
    labels = {t.number: "the matrix's values" for t in complete if t.params == own}
    return compare(scores, best[0].number, study.criteria.confidence, study.criteria.power, labels)


def _difference_rows(info: dict) -> list[list[str]]:
    return [[str(c.number), c.label, ", ".join(f"{seed}: {x:.3f}" for seed, x in sorted(c.scores.items())), f"{c.mean:.3f}",
             c.text] for c in info["differences"]]


DIFFERENCE_COLUMNS = ["trial", "note", "final score by seed", "mean", "difference from the best"]


def _common_step(s: optuna.Study) -> tuple[int, list[float]] | None:
    """eval/reward at the last step every reporting trial reached, pruned ones included: the
    spread over the whole study, not only over the trials that survived."""
    runs = {t.user_attrs.get("run_id"): t.intermediate_values for t in s.get_trials(deepcopy=False)  # a retried run once
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values}
    curves = list(runs.values())
    if not curves:
        return None
    step = min(max(c) for c in curves)
    return step, sorted(c[step] for c in curves if step in c)


def _importances(s: optuna.Study, complete: int) -> dict[str, float] | str:
    if complete < 3:
        return f"needs 3 finished trials, has {complete}"
    try:
        return optuna.importance.get_param_importances(s)
    except (RuntimeError, ValueError, ZeroDivisionError) as ex:  # too few finished trials, or no parameter varied
        return f"not available yet: {ex}"


def plots(s: optuna.Study, study: Study, plot_dir: Path) -> dict[str, Path | str]:
    """Optuna's matplotlib plots as SVG files; a plot that cannot be drawn yet says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vm

    plt.rcParams["svg.hashsalt"] = "quant-rl"  # stable element ids: a re-render without new trials changes no byte
    plot_dir.mkdir(parents=True, exist_ok=True)
    params = list(study.spec.params)
    first = lambda t: t.values[0]  # noqa: E731
    wanted = {"optimization history": lambda: vm.plot_optimization_history(s, target=first if len(s.directions) > 1 else None,
                                                                           target_name="final eval/reward")}
    if len(params) >= 2:
        wanted[f"contour of {params[0]} × {params[1]}"] = lambda: vm.plot_contour(s, params=params[:2],
                                                                              target=first if len(s.directions) > 1 else None,
                                                                              target_name="final eval/reward")
    if len(s.directions) > 1:
        wanted["Pareto front"] = lambda: vm.plot_pareto_front(s, target_names=list(study.spec.objectives))
    done = sum(t.state == TrialState.COMPLETE for t in s.get_trials(deepcopy=False))
    out: dict[str, Path | str] = {}
    for title, draw in wanted.items():
        if done < 2:
            out[title] = f"needs 2 finished trials, has {done}"
            continue
        try:
            ax = draw()
        except (ValueError, RuntimeError, IndexError) as ex:
            out[title] = f"could not be drawn: {ex}"
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(6.4, 4.4)
        fig.tight_layout()
        path = plot_dir / (slug(title.replace("×", "x")) + ".svg")
        fig.savefig(path, format="svg", metadata={"Date": None})  # no timestamp: an unchanged study re-renders byte for byte
        plt.close(fig)
        out[title] = path
    return out


def write_tune_report(s: optuna.Study, study: Study, reports: Path) -> Path:
    """Write tune_<study>.md and .html beside the matrix's report; returns the Markdown path."""
    md_path, plot_dir = paths(reports, study)
    out_dir = md_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    info, rows, figs = summary(s, study), trial_rows(s, study, out_dir), plots(s, study, plot_dir)
    write_atomic(md_path.with_suffix(".html"), _html(study, info, rows, figs, out_dir))
    return write_atomic(md_path, _markdown(study, info, rows, figs, out_dir))


def _commands(study: Study) -> list[tuple[str, str]]:
    """The commands that reach this same study: its --results and --storage when not the defaults."""
    from shlex import quote as sh

    from harness.tuning.study import default_storage

    results = study.root.parents[2]
    where = (f" --results {sh(str(results))}" if results != Path("results") else "") + \
        (f" --storage {sh(shown(study.storage))}" if study.storage != default_storage(results, study.matrix) else "")
    base = f"harness tune {sh(study.matrix)} --cell {sh(study.cell.split(' (')[0])} --study {sh(study.name)}{where}"
    return [("resume or extend", f"{base} --trials N"), ("write the best as a new matrix", f"{base} --apply"),
            ("browse live", f"optuna-dashboard {sh(shown(study.storage))}")]


def _best_lines(study: Study, info: dict) -> list[tuple[str, str]]:
    """(label, text) per best trial: parameters, objectives, run folder."""
    out = []
    for t in info["best"]:
        values = ", ".join(f"{o} {v:.4g}" for o, v in zip(study.spec.objectives, t.values))
        params = ", ".join(f"{k}={significant(v)}" for k, v in t.params.items())
        if study.spec.lora_alpha == "ratio" and "lora.r" in t.params:
            params += f" (lora.alpha={t.params['lora.r'] * study.cell_cfg.lora.alpha / study.cell_cfg.lora.r:g})"
        out.append((f"trial {t.number}", f"{params}: {values}"))
    return out


def _spread_text(info: dict) -> str:
    if not info["spread"]:
        return "no finished trial yet"
    lo, mid, hi = info["spread"]
    se = f"; one evaluation's standard error at the best value is ±{info['se']:.3f} ({info['eval_size']} held-out prompts), " \
         "so trials closer than about twice that are not told apart" if info["se"] is not None else ""
    text = f"trial scores (mean final score over seeds) over finished trials: min {lo:.3f}, median {mid:.3f}, max {hi:.3f}{se}."
    if info["common"]:
        step, values = info["common"]
        text += (f" At step {step}, which all {len(values)} reporting trials reached (pruned ones included): "
                 f"min {values[0]:.3f}, median {statistics.median(values):.3f}, max {values[-1]:.3f}.")
    return text


def _counts_text(info: dict) -> str:
    c = info["counts"]
    return (f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
            f"({c['lost']} of them lost: killed or interrupted), {c['running']} running, {c['waiting']} waiting")


def _setup_text(study: Study) -> str:
    spec = study.spec
    space = "; ".join(f"{k}: " + (f"one of {p.choices}" if p.choices is not None else f"{'log-' if p.log else ''}uniform "
                                   f"{'integer ' if p.int else ''}[{p.low:g}, {p.high:g}]") for k, p in spec.params.items())
    alpha = ("lora.alpha follows lora.r at the matrix's alpha/r" if spec.lora_alpha == "ratio"
             else "lora.alpha as the matrix sets it")
    objectives = " and ".join(f"{o} ({d})" for o, d in zip(spec.objectives, spec.directions))
    seeds = study.trial_seeds
    return (f"Search space: {space}; {alpha}. Objective: {objectives}; eval_reward is the verdicts' final score (the mean "
            f"of a run's held-out evals in its last {study.criteria.final_window:.0%} of training), averaged over the trial's "
            f"{'seed' if len(seeds) == 1 else f'{len(seeds)} seeds'} {', '.join(map(str, seeds))} "
            f"({study.cell_cfg.train.steps} steps each; tune.seeds_per_trial {spec.seeds_per_trial}). "
            f"Sampler: {spec.sampler}; pruner: {spec.pruner.name}. "
            f"Each trial is an ordinary run of the cell under results/{study.matrix}/tune/{study.name}/.")


def _markdown(study: Study, info: dict, rows: list[dict], figs: dict, out_dir: Path) -> str:
    lines = [f"# Tuning {code(study.matrix)}: {md(study.cell)}", "", f"Study {code(study.name)} in {code(shown(study.storage))}. "
             f"{md(_counts_text(info))}.", "", md(_setup_text(study)), "",
             "## Best" + (" (Pareto front)" if len(study.spec.objectives) > 1 else ""), ""]
    lines += [f"- {md(label)}: {md(text)}" for label, text in _best_lines(study, info)] or ["- none finished yet"]
    lines += ["", md(_spread_text(info)), "", "## Differences from the best", "",
              md(rule(study.criteria.confidence, study.spec.seeds_per_trial)), ""]
    if info["differences"]:
        lines += ["| " + " | ".join(DIFFERENCE_COLUMNS) + " |", "|" + "---|" * len(DIFFERENCE_COLUMNS)]
        lines += ["| " + " | ".join(md(x) for x in row) + " |" for row in _difference_rows(info)]
    else:
        lines.append("No finished trial yet.")
    lines += ["", "## Commands", ""]
    lines += [f"- {label}: {code(cmd)}" for label, cmd in _commands(study)]
    lines += ["", "## Parameter importances", ""]
    imp = info["importances"]
    lines += ([md(IMPORTANCE_TEXT.format(n=info["counts"]["complete"])), ""] + [f"- {md(k)}: {v:.3f}" for k, v in imp.items()]
              if isinstance(imp, dict) else [md(imp)])
    lines += ["", "## Plots", ""]
    for title, fig in figs.items():
        lines.append(f"![{md(title)}]({os.path.relpath(fig, out_dir)})" if isinstance(fig, Path) else f"- {md(title)}: {md(fig)}")
    lines += ["", "## Trials", "", "| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [f"[{md(r['run'])}](<{quote(r['run_link'])}>)" if k == "run" and r["run_link"] else md(r[k]) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _html(study: Study, info: dict, rows: list[dict], figs: dict, out_dir: Path) -> str:
    title = f"Tuning {study.matrix}: {study.cell}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}"
             ".fig{max-width:640px;border:1px solid #eee}</style></head><body>",
             f"<h1>Tuning <code>{e(study.matrix)}</code>: {e(study.cell)}</h1>",
             f"<p class='muted'>Study <code>{e(study.name)}</code> in <code>{e(shown(study.storage))}</code>. "
             f"{e(_counts_text(info))}. "
             f"<a href='report.html'>The matrix's report</a>.</p><p class='muted'>{e(_setup_text(study))}</p>",
             "<h2>Best" + (" (Pareto front)" if len(study.spec.objectives) > 1 else "") + "</h2><ul id='best'>"]
    parts += ([f"<li><b>{e(label)}</b>: {e(text)}</li>" for label, text in _best_lines(study, info)]
              or ["<li>none finished yet</li>"])
    parts.append(f"</ul><p>{e(_spread_text(info))}</p><h2>Differences from the best</h2>"
                 f"<p class='muted'>{e(rule(study.criteria.confidence, study.spec.seeds_per_trial))}</p>")
    parts.append("<table id='differences'><tr>" + "".join(f"<th>{e(c)}</th>" for c in DIFFERENCE_COLUMNS) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in _difference_rows(info))
                 + "</table>" if info["differences"] else "<p>No finished trial yet.</p>")
    parts.append("<h2>Commands</h2><ul>")
    parts += [f"<li>{e(label)}: <code>{e(cmd)}</code></li>" for label, cmd in _commands(study)]
    parts.append("</ul><h2>Parameter importances</h2>")
    imp = info["importances"]
    parts.append(f"<p class='muted'>{e(IMPORTANCE_TEXT.format(n=info['counts']['complete']))}</p><table>"
                 + "".join(f"<tr><th>{e(k)}</th><td class='num'>{v:.3f}</td></tr>" for k, v in imp.items()) + "</table>"
                 if isinstance(imp, dict) else f"<p class='muted'>{e(imp)}</p>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    for name, fig in figs.items():
        if isinstance(fig, Path):
            data = base64.b64encode(fig.read_bytes()).decode()
            parts.append(f"<figure><img class='fig' alt='{e(name)}' src='data:image/svg+xml;base64,{data}'>"
                         f"<figcaption>{e(name)}</figcaption></figure>")
        else:
            parts.append(f"<p class='muted'>{e(name)}: {e(fig)}</p>")
    parts.append("</div><h2>Trials</h2><div class='scroll'><table id='trials'><tr>"
                 + "".join(f"<th>{e(t)}</th>" for _, t in COLUMNS) + "</tr>")
    for r in rows:
        cells = [f"<a href='{e(r['run_link'])}'>{e(r['run'])}</a>" if k == "run" and r["run_link"] else e(r[k])
                 for k, _ in COLUMNS]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table></div></body></html>")
    return "".join(parts)
