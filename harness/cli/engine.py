"""`harness check-engine`: the command. The checks themselves are harness/rollout/engine_check.py."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from harness.cli.app import DEVICE, RESULTS, app, console, fail, folder, load, run_config
from harness.common.text import number, printable
from harness.config.run import RunConfig


@app.command("check-engine")
def check_engine(
    config: Path | None = typer.Argument(None, help="A RunConfig YAML file with a vLLM colocation (colocated or server)."),
    matrix: str | None = typer.Option(None, help="Check every distinct vLLM configuration of this matrix instead."),
    cell: str | None = typer.Option(None, help='With --matrix: only the cells matching these axis=value pairs, '
                                    'e.g. "quant=nf4".'),
    plant: str | None = typer.Option(None, help="Plant a fault the check must catch: stale-adapter (never cached)."),
    force: bool = typer.Option(False, "--force", help="Run again even where a cached result exists "
                                                      "(e.g. after a driver change)."),
    results: Path = RESULTS,
    device: str = DEVICE,
):
    """Check vLLM rollout engines before trusting them: greedy outputs survive a sleep/wake cycle,
    and after an adapter sync vLLM's log-probs match the trainer's. Exit 1 when a check fails.

    A sweep runs the same check before the first run of each configuration and caches it in
    results/MATRIX/engine_checks/; a failed check turns that configuration's cells into Error."""
    from harness.common.system import pick_device
    from harness.execution.sweep import build_models
    from harness.rollout.engine_check import PLANTS, cached, check_in_right_process, check_key

    if plant is not None and plant not in PLANTS:
        raise fail(f"--plant {plant!r}: valid: {', '.join(PLANTS)}")
    if (config is None) == (matrix is None):
        raise fail("give a config file or --matrix NAME, not both")
    if config is not None:
        cfgs, root = [(config.stem, run_config(config))], results / folder(config.stem)
    else:
        m = load(matrix)
        try:
            chosen = m.select(cell or "") if cell else list(m.cells)
        except ValueError as e:
            raise fail(f"--cell: {e}") from None
        cfgs, root = [(c.name, c.runs[0]) for c in chosen], results / m.name
    dev = pick_device(device)
    by_key: dict[str, tuple[list[str], RunConfig]] = {}
    for name, cfg in cfgs:
        if cfg.rollout.engine == "vllm":
            by_key.setdefault(check_key(cfg, dev), ([], cfg))[0].append(name)
    if not by_key:
        raise fail("no vLLM configuration to check (colocation in_process uses the trainer's own model)")
    build_models(cfg for _, cfg in by_key.values())
    table = Table("cells", "ok", "sleep/wake", "greedy = trainer", "Δ logprob (tol)", "Δ vs stale", "why", title="engine checks",
                  title_justify="left")
    failed = 0
    for names, cfg in by_key.values():
        with console.status(f"checking {printable(', '.join(names))} ..."):
            if plant is None:
                _, record = cached(cfg, root, dev, force)
            else:  # a planted fault is never cached: the sweep must not read it
                record = check_in_right_process(cfg, dev, root / "engine_checks", plant=plant)
        failed += not record["ok"]
        sleep = record.get("sleep")
        sleep_text = sleep if isinstance(sleep, str) or sleep is None else \
            f"level {sleep['level']}: {sleep['identical']}/{sleep['of']} identical, {sleep['freed_gib']:.2f} GiB freed"
        fmt = lambda x: number(x, 4)  # noqa: E731
        agree = record.get("greedy_agreement_with_trainer")
        table.add_row(printable("\n".join(names)), "yes" if record["ok"] else "[red]NO[/]", printable(sleep_text),
                      "–" if agree is None else f"{agree:.0%}", f"{fmt(record.get('logprob_diff_mean'))} ({record['tolerance']})",
                      fmt(record.get("stale_logprob_diff_mean")), printable("; ".join(record["failures"]) or "–"))
    console.print(table)
    if failed:
        raise typer.Exit(1)
