from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


def test_help_teaches():
    out = runner.invoke(app, ["--help"]).output
    for word in ("sweep", "run", "report", "matrices", "models"):
        assert word in out
    assert "--cell" in runner.invoke(app, ["run", "--help"]).output


def test_dry_run_lists_cells_without_training(tmp_path):
    res = runner.invoke(app, ["sweep", "smoke", "--dry-run", "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "4 cells" in res.output and "zero-lr control" in res.output
    assert not any(tmp_path.iterdir())


def test_unknown_matrix_and_invalid_matrix_exit_2(tmp_path):
    res = runner.invoke(app, ["sweep", "smok"])
    assert res.exit_code == 2 and "Did you mean 'smoke'" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {quant: [nf5]}\n")
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2 and "did you mean 'nf4'" in res.output


def test_run_cell_must_match_one(tmp_path):
    res = runner.invoke(app, ["run", "--matrix", "smoke", "--cell", "quant=fp4", "--results", str(tmp_path)])
    assert res.exit_code == 2 and "matches 0 cells" in res.output and "quant=nf4" in res.output


def test_matrices_lists_smoke():
    res = runner.invoke(app, ["matrices"])
    assert res.exit_code == 0 and "smoke" in res.output
    # the listing skips reasoning-gym's own checks (no import): its dataset name in task.source is not an error there
    assert "invalid" not in res.output, res.output


def test_axes_lists_every_registered_name():
    from harness.registries import QUANT, TASKS

    out = runner.invoke(app, ["axes"]).output
    assert all(name in out for name in QUANT.names() + TASKS.names())
    assert "QLoRA" in out


def test_compare_lists_changed_cells(tmp_path):
    from synthetic import plant, write_sweep

    matrix = "# make sweep MATRIX=c\naxes: {quant: [bf16, nf4]}\nseeds: [0, 1]\nbaseline: {quant: bf16}\n"
    before, runs_a = write_sweep(tmp_path / "a", matrix, "c")
    after, runs_b = write_sweep(tmp_path / "b", matrix, "c")
    for runs, nf4 in ((runs_a, [0.55, 0.56]), (runs_b, [0.41, 0.42])):  # the upgrade broke nf4
        plant(runs, "quant=bf16", [0.55, 0.56])
        plant(runs, "quant=nf4", nf4)
    res = runner.invoke(app, ["compare", str(before), str(after), "--fail-on-change"])
    assert res.exit_code == 1, res.output
    assert "Converges → Does not converge" in res.output and "1 of 2 cells changed status" in res.output
    assert "(-0.140)" in res.output
    assert runner.invoke(app, ["compare", str(before), str(before), "--fail-on-change"]).exit_code == 0

    # a committed reference is a report folder: its verdicts.json stands in for the runs, which are not committed
    assert runner.invoke(app, ["report", "c", "--results", str(before.parent), "--reports", str(tmp_path / "reports")]
                         ).exit_code == 0
    reference = tmp_path / "reports" / "c"
    assert (reference / "verdicts.json").exists()
    res = runner.invoke(app, ["compare", str(reference), str(after), "--fail-on-change"])
    assert res.exit_code == 1 and "Converges → Does not converge" in res.output and "(-0.140)" in res.output, res.output
    assert runner.invoke(app, ["compare", str(reference), str(before), "--fail-on-change"]).exit_code == 0
    res = runner.invoke(app, ["compare", str(tmp_path), str(before)])
    assert res.exit_code == 2 and "neither a sweep's results folder (matrix.json) nor a report folder" in res.output


def test_extras_names_what_each_matrix_imports():
    """`make sweep` installs these and no more: the smoke matrix needs lm-eval, not vLLM or ModelOpt."""
    runner = CliRunner()
    got = {m: runner.invoke(app, ["extras", m]).output.strip() for m in ("smoke", "grpo_nvfp4", "colocation", "algorithms")}
    assert got == {"smoke": "eval", "grpo_nvfp4": "modelopt", "colocation": "vllm", "algorithms": "modelopt"}
