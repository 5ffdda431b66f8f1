"""The report's "Mismatch" section (issue 24): how far the rollout engine's log-probs are from the trainer's,
which precision source that comes from, and whether an importance-sampling correction brings a cell back to the
verdict of its bf16 reference.

Read from results/ (metrics.jsonl, config.json) and the verdicts alone, as the rest of the report. A sweep with no
vLLM run that logged mismatch/* and no precision source or correction in its cells' keys gets no section, so
the reports of such sweeps stay byte for byte what they were.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass
from html import escape
from pathlib import Path

import yaml

from harness.common.numbers import INF_STANDIN, mean, median
from harness.common.text import number, visible
from harness.config.dotted import get_dotted, set_dotted
from harness.config.run import VLLM_SAME
from harness.reports.markdown import STATUS_MARK, md, md_table, run_config
from harness.results.layout import finite, read_metrics

DIFF = "mismatch/logprob_diff_mean"  # what the attribution splits: mean |log p_train - log p_sampler| per token
# (logged name, column title, decimals): a run's median over its steps, its maximum for the *_max metrics
METRICS = [(DIFF, "|Δ logprob| mean", 5), ("mismatch/logratio_abs_p95", "p95", 4),
           ("mismatch/logratio_abs_p99", "p99", 4), ("mismatch/logratio_abs_max", "max", 3),
           ("mismatch/seq_logratio_abs_mean", "seq |Σ| mean", 4), ("mismatch/seq_logratio_abs_p95", "seq |Σ| p95", 4),
           ("mismatch/seq_logratio_abs_max", "seq |Σ| max", 3), ("mismatch/seq_out_of_cap_frac", "seq out of cap", 4),
           ("mismatch/ratio_out_of_cap_frac", "tokens out of cap", 4), ("mismatch/is_ratio_mean", "IS ratio mean", 4)]
CORRECTION_METRICS = [("mismatch/is_weight_mean", "IS weight mean", 4), ("mismatch/is_masked_frac", "masked share", 4)]
# an fp8 KV cache (rollout/kv_scales.py): vLLM's |Δ logprob| to the trainer under its load-time and under
# recalibrated scales; how far recalibration moved the scales per sync
KV_METRICS = [("mismatch/kv_static_abs", "KV check: load-time scales", 4),
              ("mismatch/kv_recalibrated_abs", "KV check: recalibrated", 4), ("kv/scale_shift", "KV scale shift per sync", 4)]
# rollout.lora_sync: merged: the share of the adapter's update that storing W + scale BA in the weights' dtype loses
SYNC_METRICS = [("mismatch/merge_rel_err", "merged update lost", 4)]
ENGINE = "rollout.colocation"
# (source, config field, its bf16 value, read by vLLM alone): an in_process run has no engine options to differ in
SOURCES = [("trainer weights", "quant", "bf16", False), ("rollout weights", "rollout.quantization", "bf16", True),
           ("KV cache", "rollout.kv_cache_dtype", "auto", True), ("LoRA sync", "rollout.lora_sync", "adapter", True),
           ("top_p", "rollout.top_p", 1.0, False),
           ("top_k", "rollout.top_k", 0, False)]
REFERENCE = {name: ref for name, _, ref, _ in SOURCES}
SOURCE_DETAILS = {"rollout.kv_scales"}  # part of a source's value (source_values), not an axis of its own
CORRECTION = ("train.tis_cap", "train.is_mode", "train.is_cap_min")
# keys whose presence in a cell declares a mismatch study (quant is in nearly every matrix, so it does not)
DECLARING = {dotted for _, dotted, _, _ in SOURCES if dotted != "quant"} | set(CORRECTION)
UNJUDGED = ("Incomplete",)

TEXT = (
    "Where train/rollout mismatch comes from. Per cell: for each metric, each seed's median over its training steps "
    "(its largest step for the max columns), then the mean over the cell's seeds. |Δ logprob| is the mean "
    "|log p_train − log p_sampler| per sampled token; p95/p99/max are the tails of that per-token |log ratio|; "
    "seq |Σ| is a completion's summed log-ratio; out of cap: the share of tokens (sequences) whose ratio is outside "
    "[1/mismatch_cap, mismatch_cap]; ∞: some step sampled a token outside the trainer's own top-p/top-k support "
    "(its truncated log-prob is -inf; counted out of cap, left out of the means); IS weight mean and masked share: "
    "the correction's weights, when one is on; KV check: with an fp8 KV cache, every eval_every-th sync vLLM scores 32 "
    "completions of the latest rollout under the scales it loaded with and under scales recalibrated from the trainer, "
    "and each is compared with the trainer's log-probs (mean |Δ logprob| per token; static scales are stale when the "
    "first is clearly above the second); KV scale shift: the mean |ln| change of the scales per sync when they are "
    "recalibrated; merged update lost: with rollout.lora_sync merged, ||stored − exact|| / ||scale·BA|| of W + scale·BA "
    "at each sync, the share of the adapter's update that storing the merged weights in their dtype loses (bf16 keeps 8 "
    "significant bits: an update under half a step of W is lost whole; the trainer adds the adapter's output, "
    "summed over the input features, to the base layer's before rounding, and loses far less). "
    "Attribution: the precision sources are the trainer's weights (quant), the rollout engine's weights "
    "(rollout.quantization, `same` read as the format vLLM then loads), its KV cache (kv_cache_dtype), how a LoRA "
    "adapter reaches it (lora_sync: adapter, or merged into the weights) and sampling truncation (top_p, top_k); "
    "the engine options count only for vLLM cells. The reference cell has every source at its bf16 value (bf16, "
    "bf16, auto, adapter, 1.0, 0), the same engine, the same other axes and no correction. For a cell "
    "that differs from it in exactly one source, Δ is its mean |Δ logprob| minus the reference's, taken seed by seed "
    "over the seeds both finished and averaged, ± half the range of those per-seed differences; share is Δ over the "
    "sum of the Δs of every single-source cell of that reference (signed: a source that lowers the mismatch has a "
    "negative share), one value per source: a source with several values (an fp8 KV cache with static and with "
    "recalibrated scales) counts at its first in the others' shares, and each of its values at its own in its "
    "share). A cell that differs in several sources shows its Δ beside the sum of its single-source parts; "
    "the difference is the interaction. The engine row compares a vLLM reference cell with the in_process one of the "
    "same other axes (not part of the shares). Corrections: a cell with train.tis_cap set, its verdict beside that of "
    "the same cell without the correction and of its reference cell, all from the verdicts above; it restores parity "
    "when its verdict is the reference's and the uncorrected cell's is not.")


@dataclass
class Profile:
    """One cell as the section sees it."""

    cell: dict  # verdicts.json's
    engine: str
    others: str  # the cell's other key values (JSON): what two cells must share to be compared
    sources: dict[str, object]
    correction: dict | None  # is_mode, tis_cap, is_cap_min when train.tis_cap is set
    seeds: dict[int, dict[str, float]]  # seed -> logged mismatch metric -> the run's statistic

    def per_seed(self, metric: str) -> dict[int, float]:
        return {s: m[metric] for s, m in self.seeds.items() if metric in m}

    def value(self, metric: str = DIFF) -> float | None:
        return mean(list(self.per_seed(metric).values()))

    def differs(self) -> list[str]:
        return [name for name, ref in REFERENCE.items() if self.sources[name] != ref]

    @property
    def name(self) -> str:
        return self.cell["name"]


def cell_config(root: Path, matrix: dict, cell: dict) -> dict:
    """The resolved config.json of one of the cell's runs; before any ran, the matrix's base with the cell's key."""
    cfg = run_config(root, cell)
    if cfg:
        return cfg
    base = (yaml.safe_load(matrix.get("source") or "") or {}).get("base") or {}
    tree = copy.deepcopy(base)
    for k, v in cell["key"].items():
        set_dotted(tree, k, v)
    return tree


def source_values(cfg: dict) -> dict[str, object]:
    vllm = get_dotted(cfg, ENGINE, "in_process") != "in_process"
    out = {}
    for name, dotted, ref, engine_only in SOURCES:
        value = get_dotted(cfg, dotted, ref) if vllm or not engine_only else ref
        if dotted == "rollout.quantization" and value == "same":  # what vLLM loads: the trainer's format where it has it
            value = get_dotted(cfg, "rollout.rollout_model") or VLLM_SAME.get(get_dotted(cfg, "quant", "bf16")) or "bf16"
        if dotted == "rollout.kv_cache_dtype" and str(value).startswith("fp8"):  # its scales are part of the source
            value = f"{value} ({'recalibrated' if get_dotted(cfg, 'rollout.kv_scales') == 'recalibrate' else 'static'} scales)"
        out[name] = value
    return out


def run_statistic(rows: list[dict], metric: str) -> float | None:
    values = [r[metric] for r in rows if r["step"] > 0 and finite(r.get(metric))]
    return max(values, default=None) if metric.endswith("_max") else median(values)


def profiles(root: Path, matrix: dict, cells: list[dict]) -> list[Profile]:
    out = []
    for cell in cells:
        cfg = cell_config(root, matrix, cell)
        seeds = {}
        for r in cell["runs"]:
            rows = read_metrics(root / r["run_id"])
            stats = {m: x for m, _, _ in METRICS + CORRECTION_METRICS + KV_METRICS + SYNC_METRICS
                     if (x := run_statistic(rows, m)) is not None}
            if stats:
                seeds[r["seed"]] = stats
        others = {k: v for k, v in cell["key"].items()
                  if k not in {dotted for _, dotted, _, _ in SOURCES} | set(CORRECTION) | {ENGINE} | SOURCE_DETAILS}
        cap = get_dotted(cfg, "train.tis_cap")
        correction = None if cap is None else {"is_mode": get_dotted(cfg, "train.is_mode", "token_truncate"), "tis_cap": cap,
                                               "is_cap_min": get_dotted(cfg, "train.is_cap_min")}
        out.append(Profile(cell, str(get_dotted(cfg, ENGINE, "in_process")), json.dumps(others, sort_keys=True, default=str),
                           source_values(cfg), correction, seeds))
    return out


def applies(found: list[Profile]) -> bool:
    """A vLLM run logged mismatch/*, or some cell's key names a precision source other than quant or a correction."""
    return (any(p.engine != "in_process" and p.seeds for p in found)
            or any(k in DECLARING for p in found for k in p.cell["key"]))


def delta(a: Profile, b: Profile) -> tuple[float, float | None] | None:
    """(a's |Δ logprob| minus b's, paired by seed and averaged; half the range of the per-seed differences)."""
    xa, xb = a.per_seed(DIFF), b.per_seed(DIFF)
    shared = sorted(set(xa) & set(xb))
    if shared:
        d = [xa[s] - xb[s] for s in shared]
        return statistics.fmean(d), (max(d) - min(d)) / 2 if len(d) > 1 else None
    return None


def delta_text(d: tuple[float, float | None] | None) -> str:
    if d is None:
        return "–"
    return number(d[0], 5, signed=True) + (f" ± {d[1]:.5f}" if d[1] is not None else "")


def _group_text(p: Profile) -> str:
    others = json.loads(p.others)
    return ", ".join([f"engine={p.engine}"] + [f"{k}={v}" for k, v in others.items()])


def _value_text(p: Profile, names: list[str]) -> str:
    return " + ".join(f"{p.sources[n]}" for n in names)


def per_cell_rows(found: list[Profile]) -> tuple[list[str], list[list[str]]]:
    shown = [p for p in found if p.seeds]
    extra = [m for m in CORRECTION_METRICS + KV_METRICS + SYNC_METRICS if any(m[0] in s for p in shown for s in p.seeds.values())]
    titles = ["cell", "engine", "seeds", *[t for _, t, _ in METRICS + extra]]
    rows = [[p.name, p.engine, f"{len(p.seeds)}/{len(p.cell['runs'])}",
             *[_number(p.value(m), digits) for m, _, digits in METRICS + extra]] for p in shown]
    return titles, rows


def _number(value: float | None, digits: int) -> str:
    return "∞" if value is not None and value >= INF_STANDIN else number(value, digits)


ATTRIBUTION_TITLES = ["reference cell (engine, other axes)", "source", "value", "cell", "Δ |Δ logprob| vs reference",
                      "share of single-source sum", "sum of single-source parts", "interaction (Δ − sum)"]


def references(found: list[Profile]) -> dict[tuple[str, str], Profile]:
    return {(p.engine, p.others): p for p in found if p.correction is None and not p.differs()}


def attribution_rows(found: list[Profile]) -> list[list[str]]:
    refs, rows = references(found), []
    for (engine, others), ref in refs.items():
        head = f"{ref.name} ({_group_text(ref)})"
        group = [p for p in found if (p.engine, p.others) == (engine, others) and p.correction is None and p is not ref]
        singles = {(p.differs()[0], p.sources[p.differs()[0]]): (p, delta(p, ref)) for p in group if len(p.differs()) == 1}
        first = {}  # each source's first value in the matrix with data: the one the other sources' shares count
        for (source, _), (_, d) in singles.items():
            if d is not None:
                first.setdefault(source, d[0])
        for (source, value), (p, d) in singles.items():
            total = sum(first.values()) - first.get(source, 0.0) + (d[0] if d is not None else 0.0)
            share = f"{d[0] / total:.0%}" if d is not None and total else "–"
            rows.append([head, source, str(value), p.name, delta_text(d), share, "–", "–"])
        for p in group:
            names = p.differs()
            if len(names) < 2:
                continue
            d = delta(p, ref)
            parts = [singles.get((n, p.sources[n]), (None, None))[1] for n in names]
            summed = sum(x[0] for x in parts) if all(x is not None for x in parts) else None
            rows.append([head, " + ".join(names), _value_text(p, names), p.name, delta_text(d), "–",
                         number(summed, 5, signed=True),
                         number(d[0] - summed if d is not None and summed is not None else None, 5, signed=True)])
        local = refs.get(("in_process", others))
        if engine != "in_process" and local is not None:
            rows.append([head, "engine", f"{engine} (vs in_process: {local.name})", ref.name, delta_text(delta(ref, local)),
                         "–", "–", "–"])
    return rows


CORRECTION_TITLES = ["cell", "correction", "verdict", "without the correction", "reference cell", "restores parity"]


def _verdict(p: Profile | None, named: bool = True) -> str:
    if p is None:
        return "–"
    status = p.cell["status"]
    return f"{STATUS_MARK.get(status, '')} {status}".strip() + (f" ({p.name})" if named else "")


def parity(fixed: str, plain: str | None, reference: str | None) -> str:
    """Whether the correction brings the cell to its reference's verdict, which it did not have uncorrected."""
    if plain is None or reference is None:
        return "– (no uncorrected or reference cell)"
    if any(s in UNJUDGED for s in (fixed, plain, reference)):
        return "– (not judged yet)"
    if fixed == reference and plain != reference:
        return "yes"
    if plain == reference:
        return "no: the uncorrected cell already has the reference's verdict"
    return "no"


def correction_rows(found: list[Profile]) -> list[list[str]]:
    refs, rows = references(found), []
    for p in found:
        if p.correction is None:
            continue
        plain = next((q for q in found if q.correction is None and (q.engine, q.others) == (p.engine, p.others)
                      and q.sources == p.sources), None)
        ref = refs.get((p.engine, p.others))
        c = p.correction
        what = f"{c['is_mode']}, cap {c['tis_cap']}" + (f", min {c['is_cap_min']}" if c["is_cap_min"] is not None else "")
        rows.append([p.name, what, _verdict(p, named=False), _verdict(plain), _verdict(ref),
                     parity(p.cell["status"], plain and plain.cell["status"], ref and ref.cell["status"])])
    return rows


@dataclass
class Section:
    tables: list[tuple[str, list[str], list[list[str]]]]  # (subsection title, column titles, rows of plain text)


def section(root: Path, matrix: dict, cells: list[dict]) -> Section | None:
    found = profiles(root, matrix, cells)
    if not applies(found):
        return None
    titles, rows = per_cell_rows(found)
    return Section([("Per cell", titles, rows), ("Attribution", ATTRIBUTION_TITLES, attribution_rows(found)),
                    ("Corrections", CORRECTION_TITLES, correction_rows(found))])


def mismatch_lines(root: Path, matrix: dict, cells: list[dict]) -> list[str]:
    """The section's Markdown lines, each opening with a blank one; none when it does not apply."""
    s = section(root, matrix, cells)
    if s is None:
        return []
    lines = ["", "## Mismatch", "", md(TEXT)]
    for title, titles, rows in s.tables:
        lines += ["", f"### {title}", "",
                  *(md_table(titles, [[md(x) for x in row] for row in rows]) if rows else ["(none)"])]
    return lines


def mismatch_html(root: Path, matrix: dict, cells: list[dict]) -> str:
    s = section(root, matrix, cells)
    if s is None:
        return ""
    e = lambda text: escape(visible(text), quote=True)  # noqa: E731
    out = ["<h2 id='mismatch'>Mismatch</h2>", f"<p class='muted'>{e(TEXT)}</p>"]
    for title, titles, rows in s.tables:
        out.append(f"<h3>{e(title)}</h3>")
        if not rows:
            out.append("<p class='muted'>(none)</p>")
            continue
        out += ["<div class='scroll'><table><thead><tr>", *(f"<th>{e(t)}</th>" for t in titles), "</tr></thead><tbody>",
                *("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in rows), "</tbody></table></div>"]
    return "".join(out)
