"""The self-contained report.html: table, curves, bars, samples, environment, matrix.

Everything that came from a run goes through `e()` (html.escape): a completion that reads
`<script>` is shown as text. No script of our own either, so the page works from a file.
"""

from __future__ import annotations

import os
import statistics
from html import escape
from pathlib import Path

from harness.common.text import visible
from harness.config.matrix import Criteria
from harness.reports.markdown import (
    COLUMNS,
    ENGINE_COLUMNS,
    ENGINE_TEXT,
    LM_EVAL_COLUMNS,
    LM_EVAL_TEXT,
    algorithm_grid,
    columns,
    engine_rows,
    first_env,
    lm_eval_rows,
    method_text,
    random_weights_text,
    report_notes,
    score_name,
    tuning_reports,
)
from harness.reports.mismatch import mismatch_html
from harness.reports.plots import PALETTE, bar_chart, line_chart
from harness.results.layout import finite, read_metrics, read_samples
from harness.results.verdict import rolling_median

CURVES = [("reward/mean", "train reward"), ("eval/reward", "held-out eval/reward"), ("kl", "KL to reference"),
          ("entropy", "entropy")]
STATUS_CLASS = {"Converges": "ok", "Inconclusive": "na", "Convergence issue": "warn", "Does not converge": "bad", "Error": "bad",
                "Infeasible": "bad", "Incomplete": "na", "Smoke tested": "na", "Not judged (random weights)": "na"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1560px;\
padding:0 16px;color:#222}
.scroll{overflow-x:auto}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px} .muted{color:#666} code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}
pre{background:#f6f8fa;padding:10px;overflow:auto;border-radius:4px}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0} td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.status{font-weight:600;white-space:nowrap} .status a{color:inherit} .ok{color:#176c2e} \
.warn{color:#9a6700} .bad{color:#b42318} .na{color:#555}
.plots{display:flex;flex-wrap:wrap;gap:8px} svg.plot{background:#fff;border:1px solid #eee}
svg .t{font-size:12px;font-weight:600} svg .a{font-size:10px;fill:#555} svg .n{font-size:11px;fill:#999}
svg .frame{fill:none;stroke:#ccc} svg .grid{stroke:#eee}
.legend span{display:inline-block;margin-right:14px;font-size:12px} \
.swatch{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:4px}
.cell{border-top:1px solid #eee;margin-top:18px} .why{min-width:260px;max-width:480px;font-size:12px} \
td.text{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap}
"""


def e(text) -> str:
    return escape(visible(text), quote=True)


def render_html(root: Path, out_dir: Path, matrix: dict, cells: list[dict], rows: list[dict]) -> str:
    runs_link = os.path.relpath(root, out_dir)
    colors = {c["name"]: PALETTE[i % len(PALETTE)] for i, c in enumerate(cells)}
    curves = {c["name"]: {r["run_id"]: read_metrics(root / r["run_id"]) for r in c["runs"]} for c in cells}
    by_name = {c["name"]: c for c in cells}
    criteria, score = Criteria(**matrix["criteria"]), score_name(matrix, cells)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{e(matrix['name'])}: verified configurations</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Verified configurations: <code>{e(matrix['name'])}</code></h1>"
             f"<p class='muted'>{e(matrix['description'])}</p>",
             f"<p class='muted'>Re-run: <code>make sweep MATRIX={e(matrix['name'])}</code>; "
             f"regenerate: <code>harness report {e(matrix['name'])}</code></p>",
             *([f"<p class='muted' id='notes' style='white-space:pre-wrap'>{e(notes)}</p>"]
               if (notes := report_notes(out_dir)) else []),
             "<h2>Convergence matrix</h2>", _table(rows, cells, score), _grid(rows),
             f"<p class='muted'>{e(method_text(matrix, score))}</p>",
             "<h2>Memory and throughput</h2><div class='plots'>", _bars(cells, rows, colors), "</div>",
             _tuning_links(out_dir), _lm_eval_table(lm_eval_rows(cells)),
             "<h2>Rollout engines</h2>", _engine_table(engine_rows(root, cells)), f"<p class='muted'>{e(ENGINE_TEXT)}</p>",
             mismatch_html(root, matrix, cells),
             "<h2>Cells</h2>"]
    for i, (cell, row) in enumerate(zip(cells, rows)):
        base = by_name.get(cell["baseline"]) if cell["baseline"] != cell["name"] else None
        parts.append(_cell_section(i, cell, row, curves, base, colors, root, runs_link, criteria))
    env = first_env(root, cells) or {}
    model = env.get("model") or {}
    parts.append("<h2>Environment</h2><table id='env'>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>"
              for k, v in [("device", env.get("device")), ("git commit", env.get("git_commit")),
                           *([("model", f"{model['name']}: {random_weights_text(model)}")]
                             if model.get("random_weights") else []),
                           *env.get("versions", {}).items()]]
    parts.append(f"</table><h2>Matrix</h2><pre id='matrix-yaml'>{e(matrix['source'])}</pre></body></html>")
    return "".join(parts)


def _tuning_links(out_dir: Path) -> str:
    studies = tuning_reports(out_dir)
    if not studies:
        return ""
    items = "".join(f"<li><a href='{e(p.with_suffix('.html').name)}'>{e(p.stem.removeprefix('tune_'))}</a></li>"
                    for p in studies)
    return f"<h2>Tuning studies</h2><ul id='tuning'>{items}</ul>"


def _table(rows: list[dict], cells: list[dict], score: str = "eval/reward") -> str:
    out = ["<div class='scroll'><table id='convergence'><thead><tr>", *(f"<th>{e(t)}</th>" for _, t in columns(score)),
           "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        tds = []
        for key, _ in COLUMNS:
            if key == "status":
                tds.append(f"<td class='status {STATUS_CLASS.get(row['status'], '')}'>"
                           f"<a href='#cell-{i}'>● {e(row['status'])}</a></td>")
            elif key in ("reason", "variant", "workflow", "quantization", "colocation"):
                tds.append(f"<td class='{'why' if key == 'reason' else ''}'>{e(row[key])}</td>")
            else:
                tds.append(f"<td class='num'>{e(row[key])}</td>")
        out.append(f"<tr class='cell-row' data-cell='{e(cells[i]['name'])}' data-status='{e(row['status'])}'>{''.join(tds)}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _grid(rows: list[dict]) -> str:
    """One column per algorithm (report.algorithm_grid)."""
    algorithms, grid = algorithm_grid(rows)
    if not grid:
        return ""
    out = ["<h3>By algorithm</h3><div class='scroll'><table id='by-algorithm'><thead><tr>"
           "<th>Quantization · colocation</th>",
           *(f"<th>{e(a)}</th>" for a in algorithms), "</tr></thead><tbody>"]
    for label, by in grid:
        tds = [f"<td class='status {STATUS_CLASS.get(by[a][0], '')}'>● {e(by[a][0])}, {e(by[a][1])}</td>" if a in by
               else "<td>–</td>" for a in algorithms]
        out.append(f"<tr><td>{e(label)}</td>{''.join(tds)}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _engine_table(rows: list[dict]) -> str:
    out = ["<div class='scroll'><table id='engines'><thead><tr>", *(f"<th>{e(t)}</th>" for _, t in ENGINE_COLUMNS),
           "</tr></thead><tbody>"]
    for row in rows:
        tds = [f"<td>{e(row[k])}</td>" if k in ("cell", "engine", "rollout_quant", "hand_off")
               else f"<td class='num'>{e(row[k])}</td>" for k, _ in ENGINE_COLUMNS]
        out.append(f"<tr data-cell='{e(row['cell'])}'>{''.join(tds)}</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _lm_eval_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = ["<h2>Held-out evaluation (lm-eval)</h2><div class='scroll'><table id='lm-eval'><thead><tr>",
           *(f"<th>{e(t)}</th>" for _, t in LM_EVAL_COLUMNS), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{e(row[k])}</td>" if k in ("cell", "task", "metric")
                                    else f"<td class='num'>{e(row[k])}</td>" for k, _ in LM_EVAL_COLUMNS) + "</tr>")
    out.append(f"</tbody></table></div><p class='muted'>{e(LM_EVAL_TEXT)}</p>")
    return "".join(out)


def _bars(cells, rows, colors) -> str:
    def num(s: str):
        try:
            return float(s.split()[0])
        except ValueError:
            return None

    labels = [c["name"] for c in cells]
    out = []
    for key, title, unit in (("memory", "peak memory", "GiB"), ("tokens_per_s", "rollout throughput", "tok/s"),
                             ("step_s", "median step time", "s")):
        out.append(bar_chart([(label, num(row[key]), colors[label]) for label, row in zip(labels, rows)], title, key, unit))
    return "".join(out)


def _mean_curve(runs: dict[str, list[dict]], metric: str) -> list[tuple[float, float]]:
    by_step: dict[int, list[float]] = {}
    for rows in runs.values():
        for r in rows:
            if finite(r.get(metric)):
                by_step.setdefault(r["step"], []).append(r[metric])
    # over the seeds that logged each step: a seed not yet run, or stopped early, must not erase the curve
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def _kl_median_chart(runs: dict[str, list[dict]], color: str, c: Criteria) -> str:
    """What the KL rule judges: each seed's rolling median of kl, against kl_max."""
    series, last = [], 1
    for run_id, rows in runs.items():
        steps = [(r["step"], r["kl"]) for r in rows if r["step"] > 0 and finite(r.get("kl"))]
        medians = rolling_median([k for _, k in steps], c.kl_window)
        points = list(zip([s for s, _ in steps][len(steps) - len(medians):], medians))
        last = max([last] + [s for s, _ in steps])
        series.append({"points": points, "color": color, "width": 1.2, "label": f"run {run_id}"})
    series.append({"points": [(1, c.kl_max), (last, c.kl_max)], "color": "#b42318", "width": 1, "dash": "4,3",
                   "label": f"kl_max {c.kl_max}"})
    return line_chart(series, f"KL, {c.kl_window}-step median vs kl_max", "kl_median")


def _cell_section(i, cell, row, curves, base, colors, root: Path, runs_link: str, criteria: Criteria) -> str:
    color = colors[cell["name"]]
    runs = curves[cell["name"]]
    legend = (f"<div class='legend'><span><i class='swatch' style='background:{color}'></i>"
              "each seed (thin), mean over the seeds at each step (bold)</span>"
              + (f"<span><i class='swatch' style='background:#555'></i>baseline mean, dashed: {e(base['name'])}</span>"
                 if base else "") + "</div>")
    charts = []
    sampled = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("eval/avg@")})
    for metric, title in CURVES + [(k, f"held-out {k} (sampled)") for k in sampled]:
        series = [{"points": [(r["step"], r[metric]) for r in rows if metric in r], "color": color, "width": 1, "opacity": 0.45,
                   "label": f"run {run_id}"} for run_id, rows in runs.items()]
        series.append({"points": _mean_curve(runs, metric), "color": color, "width": 2.5, "label": "mean over seeds"})
        if base:
            series.append({"points": _mean_curve(curves[base["name"]], metric), "color": "#555", "width": 1.5, "dash": "5,3",
                           "label": "baseline mean"})
        charts.append(line_chart(series, title, metric))
    charts.append(_kl_median_chart(runs, color, criteria))
    samples = []
    for r in cell["runs"]:
        for entry in read_samples(root / r["run_id"]):
            for s in entry["samples"]:
                samples.append(f"<tr><td class='num'>{r['seed']}</td><td class='num'>{entry['step']}</td>"
                               f"<td class='text'>{e(s['prompt'])}</td>"
                               f"<td class='text completion'>{e(s['completion'])}</td><td class='num'>{s['reward']:g}</td></tr>")
    links = " ".join(f"<a href='{e(runs_link)}/{e(r['run_id'])}/'>{e(r['run_id'])}</a> (seed {r['seed']}: {e(r['verdict'])})"
                     for r in cell["runs"])
    return "".join([
        f"<section class='cell' id='cell-{i}' data-cell='{e(cell['name'])}'><h3>{e(cell['name'])}: ",
        f"<span class='status {STATUS_CLASS.get(row['status'], '')}'>{e(row['status'])}</span></h3>",
        f"<p>{e(row['reason'])}</p>", legend, "<div class='plots'>", *charts, "</div>",
        f"<p class='muted'>Runs: {links}</p>",
        "<details open><summary>Sample completions (first and last step, one per prompt)</summary><table class='samples'>"
        "<tr><th>seed</th><th>step</th><th>prompt</th><th>completion</th><th>reward</th></tr>",
        *(samples or ["<tr><td colspan='5'>no samples logged</td></tr>"]), "</table></details></section>",
    ])
