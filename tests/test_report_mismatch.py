"""The report's Mismatch section on planted results: per-cell statistics, attribution shares and interaction
computed by hand, and the corrections' "restores parity"."""

import pytest
from test_report_markdown import ODD, table_problems

from harness.reports import write_report
from harness.reports.mismatch import parity
from harness.results.verdict import judge
from harness.tracking.files import JsonlTracker

from conftest import REPO
from synthetic import plant, write_sweep

MATRIX = """\
description: mismatch attribution on planted numbers
base:
  task: {name: arith, eval_size: 50}
  rollout: {colocation: colocated, quantization: bf16}
axes:
  quant: [bf16, nf4]
  rollout.top_p: [1.0, 0.9]
include:
  - {quant: nf4, rollout.top_p: 1.0, train.tis_cap: 2.0, train.is_mode: sequence_mask, label: fixed}
  - {quant: nf4, rollout.top_p: 1.0, train.tis_cap: 3.0, label: not fixed}
  - {quant: bf16, rollout.top_p: 1.0, rollout.colocation: in_process, label: trainer generates}
seeds: [0, 1]
baseline: {quant: bf16, rollout.top_p: 1.0}
"""
# cell -> (per seed: median |Δ logprob| over the steps, final eval/reward)
PLANTED = {
    "quant=bf16,rollout.top_p=1.0": ([0.010, 0.012], [0.80, 0.82]),  # the reference: its Δ is what others are measured by
    "quant=bf16,rollout.top_p=0.9": ([0.030, 0.036], [0.80, 0.82]),  # Δ 0.020, 0.024: +0.022 ± 0.002
    "quant=nf4,rollout.top_p=1.0": ([0.070, 0.078], [0.60, 0.63]),  # Δ 0.060, 0.066: +0.063 ± 0.003
    "quant=nf4,rollout.top_p=0.9": ([0.100, 0.104], [0.60, 0.63]),  # Δ 0.090, 0.092: +0.091 ± 0.001, parts 0.085
    "quant=nf4,rollout.top_p=1.0,train.tis_cap=2.0,train.is_mode=sequence_mask (fixed)": ([0.070, 0.078], [0.80, 0.83]),
    "quant=nf4,rollout.top_p=1.0,train.tis_cap=3.0 (not fixed)": ([0.070, 0.078], [0.60, 0.62]),
    "quant=bf16,rollout.top_p=1.0,rollout.colocation=in_process (trainer generates)": ([0.0, 0.0], [0.80, 0.82]),
}


def mismatch_run(run_dir, diff: float, end: float, corrected: bool):
    """10 steps whose |Δ logprob| has median `diff` (six steps at it, two at half, two at twice it); the tails are
    fixed multiples of it, and the largest step of logratio_abs_max is 10 x diff."""
    t = JsonlTracker(run_dir)
    t.log({"eval/reward": 0.40, "eval/n": 500}, 0)
    for step, scale in enumerate([1, 0.5, 1, 2, 1, 1, 0.5, 1, 2, 1], start=1):
        x = diff * scale
        row = {"kl": 0.05, "entropy": 0.5, "reward/mean": 0.5, "mismatch/logprob_diff_mean": x,
               "mismatch/logratio_abs_p95": 3 * x, "mismatch/logratio_abs_p99": 4 * x,
               "mismatch/logratio_abs_max": 5 * x, "mismatch/seq_logratio_abs_mean": 2 * x,
               "mismatch/seq_logratio_abs_p95": 6 * x, "mismatch/seq_logratio_abs_max": 7 * x,
               "mismatch/seq_out_of_cap_frac": 0.1, "mismatch/ratio_out_of_cap_frac": 0.01,
               "mismatch/is_ratio_mean": 1.0 + x, "mismatch/k3_kl": x / 2}
        if corrected:
            row |= {"mismatch/is_weight_mean": 0.9, "mismatch/is_masked_frac": 0.05}
        if step == 10:
            row["eval/reward"] = end
        t.log(row, step)
    t.finish({"status": "ok", "error": None, "peak_memory_gib": 0.5, "median_step_s": 0.1})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mismatch")
    root, runs = write_sweep(tmp, MATRIX, "mm")
    assert set(runs) == set(PLANTED)
    for name, (diffs, ends) in PLANTED.items():
        for run_dir, diff, end in zip(runs[name], diffs, ends):
            mismatch_run(run_dir, diff, end, corrected="fixed" in name)
    judge(root)
    md = write_report(root, tmp / "reports" / "mm")
    return md.read_text(), md.with_suffix(".html").read_text()


def table(text: str, heading: str) -> list[list[str]]:
    """The rows of the table under `### heading`, cells stripped (header row first)."""
    lines = text.split(f"### {heading}\n\n", 1)[1].splitlines()
    rows = [line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))] if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for i, r in enumerate(rows) if i != 1]


def test_per_cell_medians_maxima_and_seed_means(report):
    text, _ = report
    assert "## Mismatch" in text and table_problems(text) == []
    rows = table(text, "Per cell")
    head = rows[0]
    assert head[:4] == ["cell", "engine", "seeds", r"\|Δ logprob\| mean"] and head[-2:] == ["IS weight mean", "masked share"]
    by_cell = {r[0]: dict(zip(head, r)) for r in rows[1:]}
    ref = by_cell["quant=bf16,rollout.top_p=1.0"]
    # medians 0.010 and 0.012 -> 0.011; p95 3x; max: the largest step (2 x diff) x 5, mean over seeds 5 x 2 x 0.011
    assert ref[r"\|Δ logprob\| mean"] == "0.01100" and ref["p95"] == "0.0330" and ref["max"] == "0.110"
    assert ref[r"seq \|Σ\| max"] == "0.154" and ref["seeds"] == "2/2" and ref["engine"] == "colocated"
    assert ref["IS weight mean"] == "–"
    fixed = "quant=nf4,rollout.top_p=1.0,train.tis_cap=2.0,train.is_mode=sequence_mask (fixed)"
    assert by_cell[fixed]["masked share"] == "0.0500"
    assert by_cell["quant=bf16,rollout.top_p=1.0,rollout.colocation=in_process (trainer generates)"]["engine"] == "in_process"


def test_attribution_shares_interaction_and_engine(report):
    text, _ = report
    rows = {(r[1], r[2]): r for r in table(text, "Attribution")[1:]}
    top_p, nf4 = rows[("top_p", "0.9")], rows[("trainer weights", "nf4")]
    assert top_p[4] == "+0.02200 ± 0.00200" and nf4[4] == "+0.06300 ± 0.00300"
    assert top_p[5] == "26%" and nf4[5] == "74%"  # 0.022 / 0.085 and 0.063 / 0.085
    both = rows[("trainer weights + top_p", "nf4 + 0.9")]
    assert both[3] == "quant=nf4,rollout.top_p=0.9"
    assert both[4:] == ["+0.09100 ± 0.00100", "–", "+0.08500", "+0.00600"]
    engine = next(r for (source, _), r in rows.items() if source == "engine")
    assert engine[3] == "quant=bf16,rollout.top_p=1.0" and engine[4] == "+0.01100 ± 0.00100"
    assert not any("fixed" in r[3] for r in rows.values())  # corrected cells are not precision sources


def test_corrections_restore_parity_or_not(report):
    text, html = report
    rows = {r[0]: r for r in table(text, "Corrections")[1:]}
    fixed = rows["quant=nf4,rollout.top_p=1.0,train.tis_cap=2.0,train.is_mode=sequence_mask (fixed)"]
    not_fixed = rows["quant=nf4,rollout.top_p=1.0,train.tis_cap=3.0 (not fixed)"]
    assert fixed[1] == "sequence_mask, cap 2.0" and not_fixed[1] == "token_truncate, cap 3.0"
    assert "Converges" in fixed[2] and "Convergence issue" in fixed[3] and "Converges" in fixed[4]
    assert fixed[3].endswith("(quant=nf4,rollout.top_p=1.0)") and fixed[4].endswith("(quant=bf16,rollout.top_p=1.0)")
    assert fixed[5] == "yes" and not_fixed[5] == "no"
    assert "<h2 id='mismatch'>Mismatch</h2>" in html and "sequence_mask, cap 2.0" in html


def test_parity_rule():
    assert parity("Converges", "Convergence issue", "Converges") == "yes"
    assert parity("Converges", "Converges", "Converges").startswith("no: the uncorrected")
    assert parity("Inconclusive", "Convergence issue", "Converges") == "no"
    assert parity("Converges", "Incomplete", "Converges").startswith("–")
    assert parity("Converges", None, "Converges").startswith("–")


def test_no_section_without_vllm_mismatch(tmp_path):
    root, runs = write_sweep(tmp_path, ODD)
    for name, ends in zip(runs, ([0.8, 0.8], [0.7, 0.8], [0.6, 0.7])):
        plant(runs, name, ends)
    judge(root)
    out = tmp_path / "reports" / "v"
    assert "## Mismatch" not in write_report(root, out).read_text()
    assert "id='mismatch'" not in (out / "report.html").read_text()


def test_a_declared_matrix_before_any_run(tmp_path):
    """matrices/mismatch.yaml before it ran: the section is there (its cells name precision sources), its sources read
    from the matrix's base and each cell's key, with nothing to measure yet."""
    root, _ = write_sweep(tmp_path, (REPO / "matrices" / "mismatch.yaml").read_text(), "mismatch")
    judge(root)
    text = write_report(root, tmp_path / "reports" / "mismatch").read_text()
    assert "## Mismatch" in text and table_problems(text) == []
    assert table(text, "Per cell") == []
    attribution = table(text, "Attribution")[1:]  # the comparisons the runs will fill in
    assert attribution and all(r[4] == "–" for r in attribution)
    assert ("trainer weights + rollout weights", "nf4 + bitsandbytes") in {(r[1], r[2]) for r in attribution}
    rows = {r[0]: r for r in table(text, "Corrections")[1:]}
    assert len(rows) == 2 and all(r[5] == "– (not judged yet)" for r in rows.values())
    assert {r[1] for r in rows.values()} == {"token_truncate, cap 2.0", "sequence_mask, cap 2.0"}


def test_an_infinite_log_ratio_reads_as_infinity():
    from harness.common.numbers import INF_STANDIN
    from harness.reports.mismatch import _number

    assert _number(INF_STANDIN, 3) == "∞" and _number(0.5, 3) != "∞" and _number(None, 3) == _number(None, 2)


def source_matrix(description: str, *cells: str) -> str:
    """A colocated bf16 matrix whose `cells` (include lines) each change a precision source of the bf16 cell."""
    return "\n".join([f"description: {description}", "base:", "  task: {name: arith, eval_size: 50}",
                      "  rollout: {colocation: colocated, quantization: bf16}", "axes:", "  quant: [bf16]", "include:",
                      *(f"  - {c}" for c in cells), "seeds: [0, 1]", "baseline: {quant: bf16}", ""])


KV_MATRIX = source_matrix(
    "fp8 KV cache scales as one precision source", "{quant: bf16, rollout.top_p: 0.9, label: top_p}",
    "{quant: bf16, rollout.kv_cache_dtype: fp8, rollout.kv_scales: static, label: static}",
    "{quant: bf16, rollout.kv_cache_dtype: fp8, rollout.kv_scales: recalibrate, label: recalibrated}")


def test_kv_scales_are_part_of_the_kv_cache_source_and_their_check_is_shown(tmp_path):
    """Two fp8-cache cells differing only in rollout.kv_scales are each one source away from the bf16 cell (the
    scales are not an axis of their own that would put them in another group), and the KV check columns appear."""
    root, runs = write_sweep(tmp_path, KV_MATRIX, "kv")
    planted = {"quant=bf16": [0.010, 0.012], "quant=bf16,rollout.top_p=0.9 (top_p)": [0.020, 0.022],
               "quant=bf16,rollout.kv_cache_dtype=fp8,rollout.kv_scales=static (static)":
               [0.050, 0.054], "quant=bf16,rollout.kv_cache_dtype=fp8,rollout.kv_scales=recalibrate (recalibrated)":
               [0.030, 0.032]}
    assert set(runs) == set(planted)
    for name, diffs in planted.items():
        for run_dir, diff in zip(runs[name], diffs):
            mismatch_run(run_dir, diff, 0.8, corrected=False)
            if "fp8" in name:  # the check's two numbers, at two steps
                t = JsonlTracker(run_dir)
                for step in (3, 7):
                    t.log({"mismatch/kv_static_abs": 0.06, "mismatch/kv_recalibrated_abs": 0.02, "kv/scale_shift": 0.1}, step)
    judge(root)
    text = write_report(root, tmp_path / "reports" / "kv").read_text()
    rows = {(r[1], r[2]): r for r in table(text, "Attribution")[1:]}
    assert rows[("KV cache", "fp8 (static scales)")][4] == "+0.04100 ± 0.00100"  # (0.040 + 0.042) / 2
    assert rows[("KV cache", "fp8 (recalibrated scales)")][4] == "+0.02000 ± 0.00000"
    # two values of one source are alternatives, not parts of one sum: top_p's share counts the KV cache at its first
    # value (static, 0.041), and each KV value's share counts itself beside top_p (0.010)
    assert rows[("top_p", "0.9")][5] == "20%"  # 0.010 / (0.010 + 0.041); summing both KV values would give 14%
    assert rows[("KV cache", "fp8 (static scales)")][5] == "80%"  # 0.041 / 0.051
    assert rows[("KV cache", "fp8 (recalibrated scales)")][5] == "67%"  # 0.020 / 0.030
    per_cell = table(text, "Per cell")
    head = per_cell[0]
    static = next(r for r in per_cell if r[0].endswith("(static)"))
    assert static[head.index("KV check: load-time scales")] == "0.0600"
    assert static[head.index("KV check: recalibrated")] == "0.0200"


SYNC_MATRIX = source_matrix("a merged LoRA sync as one precision source",
                            "{quant: bf16, rollout.lora_sync: merged, label: merged}")


def test_a_merged_lora_sync_is_a_precision_source_with_its_rounding_shown(tmp_path):
    """rollout.lora_sync: merged stores W + scale BA in bf16 for vLLM: its cell is one source away from the adapter
    cell, and what the rounding lost of each update is shown beside its mismatch."""
    root, runs = write_sweep(tmp_path, SYNC_MATRIX, "sync")
    planted = {"quant=bf16": [0.010, 0.012], "quant=bf16,rollout.lora_sync=merged (merged)": [0.016, 0.020]}
    assert set(runs) == set(planted)
    for name, diffs in planted.items():
        for run_dir, diff in zip(runs[name], diffs):
            mismatch_run(run_dir, diff, 0.8, corrected=False)
            if "merged" in name:
                t = JsonlTracker(run_dir)
                for step, lost in ((3, 0.30), (7, 0.20), (9, 0.10)):
                    t.log({"mismatch/merge_rel_err": lost}, step)
    judge(root)
    text = write_report(root, tmp_path / "reports" / "sync").read_text()
    rows = {(r[1], r[2]): r for r in table(text, "Attribution")[1:]}
    assert rows[("LoRA sync", "merged")][4] == "+0.00700 ± 0.00100"  # (0.006 + 0.008) / 2
    per_cell = table(text, "Per cell")
    merged = next(r for r in per_cell if r[0].endswith("(merged)"))
    assert merged[per_cell[0].index("merged update lost")] == "0.2000"  # each seed's median over its syncs
    adapter = next(r for r in per_cell if r[0] == "quant=bf16")
    assert adapter[per_cell[0].index("merged update lost")] == "–"
