"""What validating a RunConfig cannot see: the files it names and the size of its task's data.

Checked before anything runs (a matrix's expansion, `harness run CONFIG`), not by RunConfig itself:
a finished run's config is read back by verdicts and reports long after its files may have moved.
Paths resolve as the run resolves them, relative to the working directory. A value shaped like an
HF id (`org/name`, `name`) that is not a local path is left to load time, which may need the network.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from pathlib import Path

from harness.config.run import RunConfig

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")  # the Hub's: 96 characters a part
PATH_START = ("/", "./", "../", "~", ".\\", "..\\")
DATA_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml", ".txt", ".csv", ".parquet")


def looks_like_path(value: str, suffixes: tuple[str, ...] = ()) -> bool:
    """A value the user meant as a local path: it starts like one, ends in a data file suffix, or
    cannot be an HF id (`org/name`, optionally `:config` for datasets)."""
    name = value.partition(":")[0] if not value.startswith(PATH_START) else value
    return value.startswith(PATH_START) or value in (".", "..") or value.lower().endswith(suffixes) or not HF_ID.match(name)


def check_run(cfg: RunConfig, cache: dict | None = None) -> list[str]:
    """Problems as "dotted.field: what is wrong and what to do"; [] when the run can start.
    `cache` (shared across the cells of a matrix) keeps each distinct path to one look-up."""
    cache = {} if cache is None else cache
    problems: list[str] = []

    def once(key: tuple, check) -> None:
        if key not in cache:
            cache[key] = check()
        if cache[key]:
            problems.append(cache[key])

    for field, value in (("model", cfg.model), ("teacher", cfg.teacher), ("rollout.rollout_model", cfg.rollout.rollout_model)):
        if value and not value.startswith(("builtin:", "shape:")):
            once(("folder", field, value), lambda f=field, v=value: _model_folder(f, v))
    once(("task", cfg.task.name, cfg.task.source, tuple(sorted(cfg.task.options.items())), cfg.task.eval_size,
          cfg.train.prompts_per_step), lambda: _task(cfg))
    if cfg.quant == "modelopt" and cfg.modelopt.quant_cfg:
        once(("quant_cfg", cfg.modelopt.quant_cfg), lambda: _quant_cfg(cfg.modelopt.quant_cfg))
    calib = cfg.modelopt.quant_calib_dataset
    if calib and looks_like_path(calib, DATA_SUFFIXES):
        once(("file", calib), lambda: _file("modelopt.quant_calib_dataset", calib, "a JSONL file with a 'text' field per line, "
                                                                             "or an HF dataset id"))
    return problems


def _kind(path: Path) -> str | None:
    """"dir", "file", "other" or None (absent, or a name the OS refuses: too long, a NUL byte)."""
    try:
        return "dir" if path.is_dir() else "file" if path.is_file() else "other" if path.exists() else None
    except (OSError, ValueError):
        return None


def _short(value: str) -> str:
    return value if len(value) <= 100 else f"{value[:60]}...{value[-20:]} ({len(value)} characters)"


def _cwd_note(value: str) -> str:
    return "" if os.path.isabs(os.path.expanduser(value)) else f" (relative to the working directory {os.getcwd()})"


def _model_folder(field: str, value: str) -> str | None:
    kind = _kind(Path(value).expanduser())  # as models.resolve reads it
    if kind == "dir":
        return None
    if kind:
        return (f"{field}: {_short(value)} is a file; give a local HF model folder (with config.json), an HF id (org/name) "
                "or builtin:tiny-arith")
    if not looks_like_path(value):
        return None  # an HF id: from_pretrained finds it (or says why not) when the run loads it
    return (f"{field}: no folder {_short(value)}{_cwd_note(value)}; give a local HF model folder, an HF id (org/name) "
            "or builtin:tiny-arith")


def _file(field: str, value: str, what: str) -> str | None:
    kind = _kind(Path(value))  # as the task and calibration loaders read it: no ~ expansion
    if kind == "file":
        return None
    if kind:
        return f"{field}: {_short(value)} is a directory; give {what}"
    where = "; ~ is not expanded here: write the full path" if value.startswith("~") else _cwd_note(value)
    return f"{field}: no file {_short(value)}{where}; give {what}"


_shallow = contextvars.ContextVar("shallow", default=False)


@contextlib.contextmanager
def shallow():
    """Checks that would import a task's own library (reasoning-gym pulls numpy, sympy, matplotlib) are skipped:
    for commands that only list matrices, which must answer without those imports."""
    token = _shallow.set(True)
    try:
        yield
    finally:
        _shallow.reset(token)


def _task(cfg: RunConfig) -> str | None:
    from harness.tasks import task_size

    task, source = cfg.task, cfg.task.source
    if task.options and task.name != "reasoning_gym":
        return (f"task.options: only the reasoning_gym task reads options (its dataset's config); the {task.name} task "
                "would ignore them: remove them")
    if task.name == "reasoning_gym":  # its source names the dataset; shallow: checked when the sweep runs
        if not _shallow.get():
            from harness.tasks import check_gym, require_reasoning_gym

            try:
                require_reasoning_gym()
            except ValueError as e:
                return f"task.name: {e}"
            problem = check_gym(task)
            if problem:
                return problem
    elif task.name not in ("boxed", "math") and source:
        return f"task.source: the {task.name} task makes its own problems and would ignore it; remove it, or use task.name: boxed"
    if task.name == "math":
        from harness.tasks import require_math_verify

        try:
            require_math_verify()
        except ValueError as e:
            return f"task.name: {e}"
    if task.name in ("boxed", "math"):
        if not source:
            return (f"task.source: the {task.name} task needs a JSONL file (a question and an answer per line) "
                    "or an HF dataset id (openai/gsm8k:main)")
        if looks_like_path(source, DATA_SUFFIXES) or _kind(Path(source)):
            missing = _file("task.source", source, "a JSONL file (a question and an answer per line) or an HF dataset id")
            if missing:
                return missing
    size = task_size(task)
    if size is None:
        return None
    room = size - cfg.train.prompts_per_step
    if task.eval_size > room:
        return (f"task.eval_size: {task.eval_size} held-out prompts, but the {task.name} task has {size} problems and "
                f"train.prompts_per_step {cfg.train.prompts_per_step} must stay for training: use at most {max(room, 0)}"
                + ("" if room > 0 else " (the task is too small for this many prompts per step)"))
    return None


def _quant_cfg(value: str) -> str | None:
    if not value.lower().endswith((".yaml", ".yml")):
        if value.endswith("_CFG") and not looks_like_path(value):
            # a ModelOpt name: checked against modelopt.torch.quantization when the run loads (its import takes seconds)
            return None
        return (f"modelopt.quant_cfg: {_short(value)!r} is neither a ModelOpt config name (NAME_CFG, e.g. NVFP4_DEFAULT_CFG) "
                "nor a YAML file")
    missing = _file("modelopt.quant_cfg", value, "a ModelOpt config YAML file (as matrices/quant/int2_weights.yaml) or a "
                                                 "ModelOpt config name (NVFP4_DEFAULT_CFG)")
    if missing:
        return missing
    from harness.config.strict_yaml import YamlProblem, load_yaml

    try:
        data = load_yaml(Path(value))
    except YamlProblem as e:
        return f"modelopt.quant_cfg: {value} {e}"
    if not isinstance(data, dict) or "quant_cfg" not in data:
        return (f"modelopt.quant_cfg: {value} is not a ModelOpt config: a mapping with a quant_cfg: list, "
                "as matrices/quant/int2_weights.yaml")
    return None
