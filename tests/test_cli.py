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


def test_axes_lists_every_registered_name():
    from harness.registries import QUANT, TASKS

    out = runner.invoke(app, ["axes"]).output
    assert all(name in out for name in QUANT.names() + TASKS.names())
    assert "QLoRA" in out
