import textwrap

import pytest

from harness.config.matrix import MatrixError, find_matrix, load_matrix
from harness.registries import QUANT
from harness.registry import UnknownName

from conftest import REPO


def write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text) -> str:
    with pytest.raises(MatrixError) as err:
        load_matrix(write(tmp_path, text))
    return str(err.value)


def test_expansion_product_exclude_include_seeds(tmp_path):
    m = load_matrix(write(tmp_path, """
        base: {train: {steps: 5}}
        axes: {quant: [bf16, nf4], lora.r: [8, 16]}
        seeds: [0, 1, 2]
        exclude: [{quant: nf4, lora.r: 8}]
        include: [{quant: bf16, lora.r: 8, train.lr: 0.0, label: control}]
        baseline: {quant: bf16}
    """))
    names = [c.name for c in m.cells]
    assert names == ["quant=bf16,lora.r=8", "quant=bf16,lora.r=16", "quant=nf4,lora.r=16",
                     "quant=bf16,lora.r=8,train.lr=0.0 (control)"]
    assert all(len(c.runs) == 3 for c in m.cells)
    nf4 = m.cells[2]
    assert nf4.runs[0].quant == "nf4" and nf4.runs[0].lora.r == 16 and nf4.runs[0].train.steps == 5
    assert m.cells[3].runs[0].train.lr == 0.0
    assert m.baseline_of(nf4).name == "quant=bf16,lora.r=16"
    assert m.baseline_of(m.cells[3]).name == "quant=bf16,lora.r=8"  # include cells compare with the product cell
    ids = [r.run_id for c in m.cells for r in c.runs]
    assert len(set(ids)) == len(ids) == 12


def test_run_id_is_a_stable_hash_of_the_config(tmp_path):
    text = "axes: {quant: [bf16, nf4]}\nseeds: [0]\n"
    a, b = load_matrix(write(tmp_path, text, "a.yaml")), load_matrix(write(tmp_path, text, "b.yaml"))
    assert [c.runs[0].run_id for c in a.cells] == [c.runs[0].run_id for c in b.cells]
    changed = load_matrix(write(tmp_path, "base: {train: {beta: 0.1}}\n" + text, "c.yaml"))
    assert changed.cells[0].runs[0].run_id != a.cells[0].runs[0].run_id


def test_unknown_quant_names_file_cell_field_and_choices(tmp_path):
    msg = problems(tmp_path, "axes: {quant: [bf16, nf5]}\n")
    assert "m.yaml" in msg and "cell quant=nf5" in msg and "quant:" in msg
    assert "did you mean 'nf4'?" in msg
    assert "Valid: " + ", ".join(QUANT.names()) in msg


def test_unknown_field_lists_valid_fields(tmp_path):
    msg = problems(tmp_path, "axes: {lora.rank: [8]}\n")
    assert "lora.rank: unknown field; valid: alpha, dropout, r, target_modules" in msg


def test_bad_type_and_range_name_the_field(tmp_path):
    msg = problems(tmp_path, "base: {train: {steps: many, lr: -1}}\n")
    assert "train.steps" in msg and "train.lr" in msg and "2 problem(s)" in msg


def test_unknown_top_level_key(tmp_path):
    msg = problems(tmp_path, "axis: {quant: [bf16]}\n")
    assert ("axis: unknown field; valid: axes, base, baseline, criteria, description, eval, exclude, include, seeds, "
            "tracking, tune") in msg


def test_every_problem_is_reported_at_once(tmp_path):
    msg = problems(tmp_path, """
        axes: {quant: [bf16, nf5], algorithm: [grpo, ppo]}
        baseline: {quant: fp8}
    """)
    assert "baseline.quant: 'fp8' is not among axes.quant" in msg
    assert "unknown quant format 'nf5'" in msg and "unknown algorithm 'ppo'" in msg


def test_baseline_must_be_an_axis(tmp_path):
    assert "baseline.model: not an axis of this matrix; axes: quant" in problems(
        tmp_path, "axes: {quant: [bf16]}\nbaseline: {model: x}\n")


def test_colocation_alias_and_unregistered_mode(tmp_path):
    msg = problems(tmp_path, "axes: {colocation: [in_process, colocatd]}\n")
    assert ("cell rollout.colocation=colocatd" in msg and "did you mean 'colocated'" in msg
            and "Valid: colocated, in_process, server" in msg)
    m = load_matrix(write(tmp_path, "axes: {colocation: [in_process, server]}\nbaseline: {colocation: in_process}\n"))
    assert m.baseline_of(m.cells[1]).name == "rollout.colocation=in_process"  # the alias works in `baseline:` too


def test_vllm_options_are_validated_before_any_run(tmp_path):
    base = "axes: {colocation: [colocated]}\n"
    assert "max_lora_rank 8 is below lora.r 16" in problems(tmp_path, base + "base: {rollout: {max_lora_rank: 8}}\n")
    assert "max_lora_rank 12 is not a vLLM LoRA rank; valid: 1, 8, 16" in problems(
        tmp_path, base + "base: {rollout: {max_lora_rank: 12}}\n")
    msg = problems(tmp_path, "axes: {colocation: [server]}\nbase: {train: {trainable: full}}\n")
    assert "server syncs LoRA adapters over HTTP" in msg and "colocated" in msg
    msg = problems(tmp_path, base + "base: {quant: nvfp4_w4a16}\n")
    assert "no in-flight equivalent of nvfp4_w4a16" in msg and "rollout_model" in msg
    assert "rollout.quantization" in problems(tmp_path, base + "base: {rollout: {quantization: int3}}\n")
    # an export for vLLM to load lifts the `same` restriction; full weights may go to a colocated engine
    export = tmp_path / "export"
    export.mkdir()
    load_matrix(write(tmp_path, base + f"base: {{quant: nvfp4_w4a16, rollout: {{rollout_model: {export}}}}}\n"))
    load_matrix(write(tmp_path, base + "base: {train: {trainable: full}}\n"))


def test_engine_options_do_not_change_an_in_process_run():
    from harness.config.run import RunConfig

    plain = RunConfig()
    dressed = RunConfig(rollout={"quantization": "fp8", "sleep_level": 2, "max_lora_rank": 64})
    assert dressed.run_id == plain.run_id and dressed.rollout.engine == "hf"
    colocated = RunConfig(rollout={"colocation": "colocated", "quantization": "bf16"})
    assert colocated.rollout.engine == "vllm" and colocated.vllm_quantization is None
    assert RunConfig(quant="nf4", rollout={"colocation": "server"}).vllm_quantization == "bitsandbytes"


def test_duplicate_cells_and_seed_axis_are_rejected(tmp_path):
    msg = problems(tmp_path, "axes: {quant: [bf16, bf16], seed: [1]}\n")
    assert "seeds are not an axis" in msg


def test_include_without_axis_value(tmp_path):
    msg = problems(tmp_path, "axes: {quant: [bf16]}\ninclude: [{train.lr: 0.0}]\n")
    assert "include[0]: sets no value for axis quant" in msg


def test_yaml_syntax_error(tmp_path):
    assert "not valid YAML" in problems(tmp_path, "axes: {quant: [bf16\n")


def test_find_matrix_suggests(tmp_path):
    (tmp_path / "smoke.yaml").write_text("axes: {quant: [bf16]}\n")
    with pytest.raises(FileNotFoundError, match="Did you mean 'smoke'"):
        find_matrix("smok", tmp_path)


def test_select_prefers_the_exact_cell():
    m = load_matrix(REPO / "matrices" / "smoke.yaml")
    assert [c.name for c in m.select("quant=bf16")] == ["quant=bf16"]
    assert len(m.select("quant=bf16,train.lr=0.0")) == 1


def test_shipped_matrices_are_valid():
    for path in (REPO / "matrices").glob("*.yaml"):
        assert load_matrix(path).cells
        assert path.read_text().startswith("# make sweep MATRIX="), f"{path} must open with the command that runs it"


def test_registry_did_you_mean():
    with pytest.raises(UnknownName, match="did you mean 'int8'"):
        QUANT.canonical("int-8")
    assert QUANT.canonical("nf4") == "nf4"
