"""lm-evaluation-harness on a finished run's final policy (the quantized base + the trained adapter).

The harness's own tasks (qrl_arith, qrl_boxed; templates in harness/evals/lm_eval_tasks/) score the
prompts the run's eval/reward scored: the held-out split is written to <run>/lm_eval/data/ as
JSONL, and <run>/lm_eval/tasks/<task>.yaml `include`s the shipped template with that file and the
run's max_new_tokens filled in, found through TaskManager(include_path=...). Any other name is
looked up in lm-eval's own registry (those may need the network for their datasets).
"""

from __future__ import annotations

import difflib
import functools
import gc
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import Field

from harness.chat import model_task, uses_chat
from harness.config.run import Frozen, RunConfig

if TYPE_CHECKING:
    import torch

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
HARNESS_TASKS = {"qrl_arith": "arith", "qrl_boxed": "boxed"}  # lm-eval task -> the harness task whose held-out set it scores


class LmEvalSettings(Frozen):
    tasks: tuple[str, ...] = Field(("qrl_arith",), min_length=1, description=(
        "lm-eval tasks: the harness's qrl_arith / qrl_boxed (the run's own held-out set, offline) "
        "or any task in lm-eval's registry (its dataset may need the network)"))
    limit: int | None = Field(None, ge=1, description="the first N documents of each task; None: the whole held-out set")
    batch_size: int = Field(64, ge=1, description="prompts per generate() call")
    bf16_base: bool = Field(False, description="also evaluate the same adapter on the unquantized base "
                                               "(the format's cost at inference)")


def evaluate_run(cfg: RunConfig, run_dir: Path, device: torch.device, settings: LmEvalSettings) -> dict:
    """{"lm_eval_version", "quant", "quantized": {task: {metric: value, metric_stderr: ..., "n": N}}, "bf16": ...}:
    the final policy on the run's quantized base, and (bf16_base) the same adapter on the unquantized base."""
    import lm_eval

    names = list(dict.fromkeys(settings.tasks))
    ours = [t for t in names if t in HARNESS_TASKS]
    theirs = [t for t in names if t not in HARNESS_TASKS]
    for name in ours:
        if HARNESS_TASKS[name] != cfg.task.name:
            raise ValueError(f"lm-eval task {name} scores the held-out set of the harness task {HARNESS_TASKS[name]}, "
                             f"but this run's task is {cfg.task.name}; for it use {_ours_for(cfg.task.name)}")
    registry = _registry(theirs) if theirs else None  # checked before any model loads
    work = Path(run_dir) / "lm_eval"

    out = {"lm_eval_version": lm_eval.__version__, "quant": cfg.quant, "tasks": names, "limit": settings.limit}
    # not re-validated: a ModelOpt run's modelopt options stay behind, unread by the bf16 loader
    variants = [("quantized", cfg)] + ([("bf16", cfg.model_copy(update={"quant": "bf16"}))] if settings.bf16_base else [])
    for key, variant in variants:
        if key == "bf16" and cfg.quant == "bf16":
            out["bf16"] = out["quantized"]  # the run's base is already unquantized: the same model
            continue
        model, tokenizer = _load_final_policy(variant, Path(run_dir), device)
        try:
            results = {}
            if ours:  # local files only: no hub lookup is made (the test blocks sockets to hold this)
                if key == "quantized":  # the held-out prompts as the run saw them: chat-rendered where its were
                    _write_tasks(cfg, work, ours, tokenizer)
                results |= _simple_evaluate(_harness_lm(model, tokenizer, settings.batch_size), ours, settings,
                                            _task_manager(include_path=str(work / "tasks"), include_defaults=False))
            if theirs:  # lm-eval's defaults (BOS, decoding), so its own tasks compare with published numbers
                from lm_eval.models.huggingface import HFLM

                # lm-eval renders its own tasks' prompts: it applies the chat template the run trained with
                chat = {"apply_chat_template": True, "system_instruction": cfg.task.system_prompt} \
                    if uses_chat(tokenizer, cfg.task, cfg.model) else {}
                results |= _simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size),
                                            theirs, settings, registry, **chat)
            out[key] = results
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
    return out


def precheck(names: tuple[str, ...], cell_tasks: dict[str, str]) -> list[str]:
    """A matrix's eval.lm_eval.tasks checked before anything trains: the harness's own tasks must exist
    and score the cells' task (`cell_tasks`: harness task -> a cell that runs it); any other name must
    be in lm-eval's registry, checked where lm-eval is installed (`make sweep` installs it after
    validating; each run checks again before loading a model)."""
    problems = []
    for name in dict.fromkeys(names):
        for task, cell in cell_tasks.items():
            if name in HARNESS_TASKS and HARNESS_TASKS[name] != task:
                problems.append(f"eval.lm_eval.tasks: {name} scores the held-out set of the harness task {HARNESS_TASKS[name]}, "
                                f"but cell {cell} runs {task}; for it use {_ours_for(task)}")
    others = [n for n in dict.fromkeys(names) if n not in HARNESS_TASKS]
    if any(n.startswith("qrl_") for n in others) or (others and importlib.util.find_spec("lm_eval") is not None):
        listed = _listed_tasks() if not any(n.startswith("qrl_") for n in others) else set()
        unknown = [n for n in others if n not in listed]
        if unknown:  # not in a task file's text: lm-eval's own index decides (~10 s; generated names live only there)
            try:
                _registry(unknown)
            except ValueError as e:
                problems.append(f"eval.lm_eval.tasks: {e}")
    return problems


@functools.cache
def _listed_tasks() -> set[str]:
    """Names given as `task:`, `group:` or `tag:` in lm-eval's task files: 0.3 s, where lm-eval's TaskManager
    takes ~15 s (import included). It misses the names lm-eval generates, so only its "yes" is trusted."""
    spec = importlib.util.find_spec("lm_eval")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "tasks"
    pattern = re.compile(rb"^\s*-?\s*(?:task|group|tag)\s*:\s*[\"']?([^\s\"'#]+)", re.MULTILINE)
    names: set[str] = set()
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                with open(os.path.join(folder, f), "rb") as fh:
                    names.update(m.decode(errors="replace") for m in pattern.findall(fh.read()))
    return names


def _ours_for(task: str) -> str:
    return ", ".join(n for n, t in HARNESS_TASKS.items() if t == task) or "a task from lm-eval's registry"


def _registry(names: list[str]):
    """lm-eval's own TaskManager, once every name is known to it. qrl_* is the harness's namespace,
    so a name there is a typo, reported before scanning lm-eval's ~15k task files (~10 s)."""
    unknown = [n for n in names if n.startswith("qrl_")]
    manager = None
    if not unknown:
        manager = _task_manager()
        unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        known = list(HARNESS_TASKS) + (manager.all_tasks if manager else [])
        hints = [f"{n} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(n, known, n=1)) else n for n in unknown]
        raise ValueError(f"unknown lm-eval task(s) {', '.join(hints)}: the harness's tasks are {', '.join(HARNESS_TASKS)} "
                         "(the run's own held-out set); any other name must be in lm-eval's registry (`lm-eval ls tasks`)")
    return manager


def _task_manager(**kwargs):
    from lm_eval.tasks import TaskManager

    return TaskManager(**kwargs)


class _TemplateLoader(yaml.SafeLoader):
    pass


# the template is read only to copy its generation_kwargs; `!function` stays lm-eval's to resolve
_TemplateLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _write_tasks(cfg: RunConfig, work: Path, names: list[str], tokenizer) -> None:
    """<work>/data/<task>.jsonl from the run's held-out split and <work>/tasks/<task>.yaml including the template."""
    problems = model_task(cfg.task, tokenizer, cfg.model).eval
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    for name in names:
        data = work / "data" / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
        template = TEMPLATES / f"{name}.yaml"
        gen = yaml.load(template.read_text(), Loader=_TemplateLoader)["generation_kwargs"]
        # `include` merges top-level keys only, so the generation kwargs are restated whole
        resolved = {
            "include": str(template.resolve()),
            # datasets caches the parsed JSONL under cache_dir: kept in the run folder, not ~/.cache
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}, "cache_dir": str((work / "hf_datasets").resolve())},
            "generation_kwargs": gen | {"max_gen_toks": cfg.rollout.max_new_tokens},
        }
        (work / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))


def _load_final_policy(cfg: RunConfig, run_dir: Path, device: torch.device):
    """The trainer's own load (load_policy: same base loader, dtype, LoRA wrapping) with the final
    checkpoint's weights put back as a resume would (checkpoint.restore), minus the optimizer."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from harness.common.system import compute_dtype
    from harness.models import checkpoint
    from harness.models.loading import load_policy

    folder = run_dir / "adapter"
    if not (folder / checkpoint.STATE).exists():
        raise FileNotFoundError(f"{run_dir}: no final checkpoint ({folder / checkpoint.STATE}); has the run trained?")
    if cfg.train.trainable == "full":
        raise ValueError("lm-eval of train.trainable: full runs is not supported: they save every weight in "
                         f"{checkpoint.STATE}, not a LoRA adapter to put on the quantized base")
    model, tokenizer = load_policy(cfg, device, compute_dtype(device, cfg.train.dtype))
    loaded = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors", device=str(device)))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing:
        raise ValueError(f"{folder}: the adapter does not fit this base ({len(missing)} LoRA weights missing, e.g. {missing[0]})")
    # the quantizers' calibrated amax (ModelOpt formats) is checkpointed beside the adapter; an
    # unquantized base has no quantizers and ignores them (strict=False), as restore() does
    import torch

    extra = torch.load(folder / checkpoint.STATE, map_location=device, weights_only=False)["model"]
    if extra:
        model.load_state_dict(extra, strict=False)
    return model.eval(), tokenizer


def _harness_lm(model, tokenizer, batch_size: int):
    """HFLM generating as the harness's HFEngine.generate does, so exact_match equals eval/reward:
    prompts without special tokens (no BOS), generation stopped at the tokenizer's eos (not the
    generation config's), and special tokens other than eos kept in the text (a `<pad>` sampled
    mid-answer must not be rewarded as if absent; lm-eval would skip it)."""
    from lm_eval.models.huggingface import HFLM

    class HarnessLM(HFLM):
        def tok_decode(self, tokens, skip_special_tokens: bool = False):
            return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            generation_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return HarnessLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)


def _simple_evaluate(lm, tasks: list[str], settings: LmEvalSettings, task_manager, **chat) -> dict:
    from lm_eval import simple_evaluate

    raw = simple_evaluate(model=lm, tasks=tasks, limit=settings.limit, task_manager=task_manager, log_samples=False,
                          **chat)
    return {name: _metrics(raw["results"][name], raw["n-samples"].get(name, {}).get("effective")) for name in raw["results"]}


def _metrics(row: dict, n: int | None) -> dict:
    """lm-eval's "exact_match,none" -> "exact_match" (the filter named only where a task has several); JSON numbers."""
    out = {}
    for key, value in row.items():
        if "," in key:  # "metric,filter"; the rest (alias, name, sample_len) describes the task
            out[key.removesuffix(",none")] = float(value) if isinstance(value, (int, float)) else value
    return out | {"n": n}

