"""A sweep's results as DataFrames (harness.results.tables) on synthetic sweeps written with the real writers:
the numbers are planted here, the files come from the JsonlTracker a run uses."""

import json
import math
import sys

import pandas as pd
import pytest

from harness.errors import SweepNotFound, Unavailable, UsageError
from harness.results import tables
from harness.results.verdict import judge

from synthetic import curve_run, fake_run, write_sweep

MATRIX = """\
axes: {quant: [bf16, nf4]}
seeds: [0, 1]
baseline: {quant: bf16}
criteria: {min_gain: 0.05, tolerance: 0.05, kl_max: 1.0, confidence: 0.9, min_seeds: 2}
"""
BF16, NF4 = "quant=bf16", "quant=nf4"
ENDS = {(BF16, 0): 0.61, (BF16, 1): 0.63, (NF4, 0): 0.57}  # nf4 seed 1 is a curve_run, planted below
NF4_CURVE = ([(0, 0.35), (4, 0.5), (8, 0.58)], [0.05, 0.06, 0.07, 0.42, 0.08, 0.09, 0.1, 0.11])


@pytest.fixture
def sweep(tmp_path):
    root, runs = write_sweep(tmp_path, MATRIX)
    for (cell, seed), end in ENDS.items():
        fake_run(runs[cell][seed], 0.4, end)
    curve_run(runs[NF4][1], *NF4_CURVE)
    return root, runs


def test_steps_one_row_per_logged_step_with_axes_first(sweep):
    root, runs = sweep
    df = tables.steps(root)
    assert len(df) == 3 * 11 + 9  # fake_run logs steps 0..10; the curve run steps 0..8
    assert list(df.columns[:5]) == ["quant", "cell", "seed", "run_id", "step"]
    assert {"eval/reward", "kl", "entropy", "reward/mean", "loss"} <= set(df.columns)
    assert df["seed"].dtype == "int64" and df["step"].dtype == "int64"
    assert df.groupby("cell")["quant"].unique().map(list).to_dict() == {BF16: ["bf16"], NF4: ["nf4"]}
    assert df.groupby(["cell", "seed"])["run_id"].unique().map(list).to_dict() == {
        (cell, seed): [dirs[seed].name] for cell, dirs in runs.items() for seed in (0, 1)}

    at = df.set_index(["cell", "seed", "step"])
    assert at.loc[(NF4, 1, 4), "kl"] == NF4_CURVE[1][3]  # the planted kl of step 4
    assert at.loc[(NF4, 1, 8), "eval/reward"] == 0.58
    assert at.loc[(BF16, 1, 10), "eval/reward"] == ENDS[(BF16, 1)]
    assert at.loc[(BF16, 0, 0), "eval/reward"] == 0.4 and math.isnan(at.loc[(BF16, 0, 0), "kl"])  # not logged at step 0


def test_runs_carry_the_verdict_and_the_summary(sweep):
    root, runs = sweep
    df = tables.runs(root)
    judged = {r.run_id: r for c in judge(root, write=False) for r in c.runs}
    assert len(df) == 4 and df["seed"].dtype == "int64"
    assert list(df.columns[:4]) == ["quant", "cell", "seed", "run_id"]
    assert df["run_id"].tolist() == [d.name for dirs in runs.values() for d in dirs]
    for row in df.itertuples(index=False):
        assert row.verdict == judged[row.run_id].verdict
    rows = df.set_index(["cell", "seed"])
    assert rows.loc[(BF16, 1), "gain"] == pytest.approx(ENDS[(BF16, 1)] - 0.4)
    assert rows.loc[(NF4, 1), "kl_median_max"] == judged[runs[NF4][1].name].kl_median_max
    assert (df["status"] == "ok").all() and df["error"].isna().all()  # from summary.json, as fake_run wrote it
    assert (df["peak_memory_gib"] == 0.5).all() and df["damage"].isna().all()
    assert json.loads(rows.loc[(BF16, 0), "final_steps"]) == [10]


def test_a_damaged_and_a_missing_run_are_rows_not_crashes(tmp_path):
    root, runs = write_sweep(tmp_path, MATRIX)
    for (cell, seed), end in ENDS.items():
        fake_run(runs[cell][seed], 0.4, end)  # nf4 seed 1 never runs
    summary = runs[BF16][1] / "summary.json"
    summary.write_bytes(summary.read_bytes()[:20])  # torn

    df = tables.runs(root).set_index(["cell", "seed"])
    assert df.loc[(BF16, 1), "verdict"] == "incomplete" and "not valid JSON" in df.loc[(BF16, 1), "damage"]
    assert pd.isna(df.loc[(BF16, 1), "status"])  # an untrusted summary is not reported as if it were
    assert df.loc[(NF4, 1), "verdict"] == "incomplete" and pd.isna(df.loc[(NF4, 1), "status"])
    steps = tables.steps(root)
    assert set(steps["run_id"]) == {runs[c][s].name for c, s in ENDS}  # the missing run logged nothing
    cells = tables.cells(root).set_index("cell")
    assert cells.loc[BF16, "seeds_finished"] == 1 and cells.loc[NF4, "seeds_finished"] == 1


def test_cells_status_and_evidence_are_the_verdicts(sweep):
    root, _ = sweep
    df = tables.cells(root)
    verdicts = judge(root, write=False)
    assert len(df) == 2 and df["cell"].tolist() == [v.name for v in verdicts]
    assert df["status"].tolist() == [v.status for v in verdicts]
    assert df["reason"].tolist() == [v.reason for v in verdicts]
    assert df["quant"].tolist() == ["bf16", "nf4"] and df["baseline"].tolist() == [BF16, BF16]
    assert df["seeds"].tolist() == [2, 2] and df["seeds"].dtype == "int64"
    nf4 = df.set_index("cell").loc[NF4]
    v = verdicts[1]
    assert nf4["eval_final_mean"] == pytest.approx((ENDS[(NF4, 0)] + 0.58) / 2)
    assert nf4["eval_start_mean"] == pytest.approx((0.4 + 0.35) / 2)
    assert (nf4["delta_vs_baseline"], nf4["delta_lower_bound"], nf4["delta_upper_bound"]) == (
        v.delta_vs_baseline, v.delta_lower_bound, v.delta_upper_bound)
    assert (nf4["eval_final_ci_lower"], nf4["eval_final_ci_upper"]) == v.eval_final_ci
    assert nf4["test"] == v.test
    assert not (root / "verdicts.json").exists()  # judging for a table writes nothing


def test_include_fields_become_columns(tmp_path):
    root, runs = write_sweep(tmp_path, MATRIX + "include:\n  - {quant: bf16, train.lr: 0.0, label: control}\n")
    fake_run(runs["quant=bf16,train.lr=0.0 (control)"][0], 0.4, 0.4)
    df = tables.steps(root)
    assert list(df.columns[:6]) == ["quant", "train.lr", "cell", "seed", "run_id", "step"]
    assert (df["train.lr"] == 0.0).all() and len(df) == 11
    cells = tables.cells(root)
    assert cells["train.lr"].isna().tolist() == [True, True, False] and cells["included"].tolist() == [False, False, True]
    assert cells["label"].tolist()[2] == "control"


def test_csv_and_json_round_trip(sweep, tmp_path):
    root, _ = sweep
    for kind in ("steps", "runs", "cells"):
        df = getattr(tables, kind)(root)
        back = pd.read_csv(tables.write(df, tmp_path / "out" / f"{kind}.csv", "csv"))
        pd.testing.assert_frame_equal(_missing_as_none(back), _missing_as_none(df), check_dtype=False)
        rows = json.loads((tables.write(df, tmp_path / "out" / f"{kind}.json", "json")).read_text())
        assert len(rows) == len(df) and list(rows[0]) == list(df.columns)
    back = pd.read_csv(tmp_path / "out" / "steps.csv")
    assert back["seed"].dtype == "int64" and back["step"].dtype == "int64"
    assert rows[1]["status"] == tables.cells(root)["status"][1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{k}.{f}" for k in ("steps", "runs", "cells") for f in ("csv", "json"))  # no temporary files left


def _missing_as_none(df):
    """A file has one kind of missing value: a text column that is all None reads back as NaN."""
    return df.astype(object).where(df.notna(), None)


def test_parquet_round_trip(sweep, tmp_path):
    pytest.importorskip("pyarrow")
    root, _ = sweep
    df = tables.runs(root)
    back = pd.read_parquet(tables.write(df, tmp_path / "runs.parquet", "parquet"))
    pd.testing.assert_frame_equal(_missing_as_none(back), _missing_as_none(df), check_dtype=False)


def test_parquet_without_pyarrow_says_what_to_install(sweep, tmp_path, monkeypatch):
    root, _ = sweep
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    with pytest.raises(Unavailable, match="pip install pyarrow"):
        tables.write(tables.cells(root), tmp_path / "cells.parquet", "parquet")
    assert not (tmp_path / "cells.parquet").exists()


def test_bad_format_and_missing_sweep(sweep, tmp_path):
    root, _ = sweep
    with pytest.raises(UsageError, match="csv, parquet, json"):
        tables.write(tables.cells(root), tmp_path / "x.xlsx", "xlsx")
    with pytest.raises(SweepNotFound, match="no matrix.json"):
        tables.steps(tmp_path / "nowhere")


def test_harness_table_writes_each_format_asked_and_names_what_is_wrong(sweep, tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    root, _ = sweep
    out = CliRunner().invoke(app, ["table", str(root), "--kind", "runs", "--csv", str(tmp_path / "r.csv"),
                                   "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    as_json = json.loads((tmp_path / "r.json").read_text())
    assert pd.read_csv(tmp_path / "r.csv")["run_id"].tolist() == [r["run_id"] for r in as_json]
    assert len(pd.read_csv(tmp_path / "r.csv")) == 4
    out = CliRunner().invoke(app, ["table", str(root), "--kind", "seeds", "--csv", str(tmp_path / "x.csv")])
    assert out.exit_code == 2 and "--kind 'seeds': valid: steps, runs, cells" in out.output
    out = CliRunner().invoke(app, ["table", str(root)])
    assert out.exit_code == 2 and "--csv FILE, --parquet FILE or --json FILE" in out.output
    out = CliRunner().invoke(app, ["table", "", "--csv", str(tmp_path / "x.csv")])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
