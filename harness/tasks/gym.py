"""`reasoning_gym`: a procedural dataset of reasoning-gym (chain_sum, countdown, ...) as a task, each
completion judged by that dataset's own verifier. Needs `pip install -e '.[gym]'`.

`task.source` names the dataset and `task.options` is its config (a dataclass of reasoning-gym's:
min_terms, size, ...), except its seed, which is SPLIT_SEED: the problems, and so the held-out split,
are the same whatever the run's seed. The held-out set is the first `task.eval_size` distinct
problems the dataset generates; training takes every later one whose prompt is not held out.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing

from harness.config.run import TaskConfig
from harness.tasks.problem import SPLIT_SEED, Problem

# reasoning-gym's convention (its system prompts ask for it, its examples extract it): the answer between these tags.
# After a space, not a newline: builtin:tiny-chat's character vocabulary is printable ASCII alone.
ANSWER_INSTRUCTION = " Put the final answer in <answer></answer>."
# datasets whose config task.options cannot hold, with why
UNSUPPORTED = {"composite": "it mixes other datasets, given as a list of specs, which task.options cannot hold"}


def require_reasoning_gym() -> None:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ValueError("task reasoning_gym: its problems and verifiers are reasoning-gym's; pip install -e '.[gym]'")


def gym_datasets() -> dict[str, type]:
    """Dataset name -> its config dataclass, for every reasoning-gym dataset the task can build."""
    from reasoning_gym.factory import DATASETS

    return {name: config for name, (_, config) in sorted(DATASETS.items()) if name not in UNSUPPORTED}


def check_gym(cfg: TaskConfig) -> str | None:
    """What is wrong with `cfg`'s dataset name and options, as "dotted.field: what and the valid choices";
    None when reasoning-gym would build the dataset. Needs reasoning-gym (require_reasoning_gym)."""
    known = gym_datasets()
    source = cfg.source
    if not source:
        return f"task.source: the reasoning_gym task needs a reasoning-gym dataset name; valid: {', '.join(known)}"
    if source in UNSUPPORTED:
        return f"task.source: reasoning-gym's {source} is not supported: {UNSUPPORTED[source]}"
    if source not in known:
        close = difflib.get_close_matches(source, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"task.source: unknown reasoning-gym dataset {source!r}{hint} Valid: {', '.join(known)}"
    config = known[source]
    fields = [f.name for f in dataclasses.fields(config) if f.name != "seed"]
    try:
        hints = typing.get_type_hints(config)
    except Exception:  # an annotation that does not resolve: leave the types to the config's own validate()
        hints = {}
    for key, value in cfg.options.items():
        if key == "seed":
            return (f"task.options.seed: the harness fixes reasoning-gym's seed ({SPLIT_SEED}) so that the held-out "
                    "split never moves with the run's seed; remove it")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"task.options: {source} has no option {key!r}{hint}; its options: {', '.join(fields)}"
        expected = _type_problem(hints.get(key, typing.Any), value)
        if expected:
            return f"task.options.{key}: {source}'s {key} is {expected}, not {value!r}"
    try:
        built = config(**{**cfg.options, "seed": SPLIT_SEED})
        if callable(getattr(built, "validate", None)):
            built.validate()
    except (AssertionError, ValueError, TypeError) as e:
        return f"task.options: reasoning-gym's {source} refuses {dict(cfg.options)}: {e or type(e).__name__}"
    return None


def gym_size(cfg: TaskConfig) -> int | None:
    """Problems the dataset generates (task.options.size, else its config's default); None where unknown."""
    size = cfg.options.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if importlib.util.find_spec("reasoning_gym") is None:
        return None
    config = gym_datasets().get(cfg.source or "")
    default = {f.name: f.default for f in dataclasses.fields(config)}.get("size") if config else None
    return default if isinstance(default, int) else None


def last_answer(text: str) -> str | None:
    """What the last closed <answer>...</answer> of `text` holds (stripped), as reasoning-gym extracts it; None without one."""
    from reasoning_gym.utils import extract_answer

    return extract_answer(text)


class GymTask:
    """A reasoning-gym dataset. The prompt is the dataset's question plus ANSWER_INSTRUCTION; the reward is
    the dataset's own `score_answer` on the completion's last <answer>...</answer> (0 without one).
    Some verifiers give partial credit (chain_sum's, like every numeric one of reasoning-gym's: an answer
    that contains the right one scores len(right) / len(answer), 2/3 for -33 against 33), so a mean
    reward is not always an accuracy. A task_base.Task."""

    train: list[Problem]
    eval: list[Problem]

    def __init__(self, cfg: TaskConfig):
        require_reasoning_gym()
        problem = check_gym(cfg)
        if problem:
            raise ValueError(problem)
        import reasoning_gym

        self.source = cfg.source
        self.dataset = reasoning_gym.create_dataset(cfg.source, **{**cfg.options, "seed": SPLIT_SEED})
        held: dict[str, Problem] = {}
        train: list[Problem] = []
        for i in range(len(self.dataset)):
            p = self.problem(self.dataset[i])
            if len(held) < cfg.eval_size:
                held.setdefault(p.prompt, p)
            elif p.prompt not in held:
                train.append(p)  # repeats kept: training sees the dataset's own distribution
        if len(held) < cfg.eval_size or not train:
            raise ValueError(f"task.eval_size: {cfg.eval_size} held-out prompts, but {len(self.dataset)} problems of "
                             f"{cfg.source} hold {len(held)} distinct ones before training's {len(train)}: lower "
                             "task.eval_size or raise task.options.size")
        self.eval, self.train = list(held.values()), train

    @staticmethod
    def problem(entry: dict) -> Problem:
        """A dataset entry ({"question", "answer", "metadata"}) as a Problem that keeps it for the verifier.
        A dataset that scores any valid answer has none to imitate (answer None): its solution stays empty."""
        answer = entry.get("answer")
        reference = "" if answer is None else str(answer)
        solution = "" if answer is None else f"<answer>{reference}</answer>"
        return Problem(str(entry["question"]).rstrip() + ANSWER_INSTRUCTION, reference, solution, entry=entry)

    def reward(self, problem: Problem, completion: str) -> float:
        """score_answer of the last <answer> of `completion`; a verifier that raises on a malformed answer scores it 0.
        A Problem built elsewhere (no entry) is scored against its answer alone."""
        answer = last_answer(completion)
        if answer is None:
            return 0.0
        entry = problem.entry if problem.entry is not None else {"question": problem.prompt, "answer": problem.answer,
                                                                 "metadata": {}}
        try:
            return float(self.dataset.score_answer(answer, entry))
        except Exception:
            return 0.0

    def demonstration(self, problem: Problem) -> str:
        """The reference answer between the tags, as the reward reads it."""
        if not problem.solution:
            raise ValueError(f"task.source: reasoning-gym's {self.source} has no reference answer (its verifier accepts "
                             "any valid one), so sft has nothing to imitate: use an RL algorithm")
        return problem.solution

    def formatted(self, completion: str) -> bool:
        """A closed <answer>...</answer>, right or wrong."""
        return last_answer(completion) is not None


def _type_problem(hint, value) -> str | None:
    """What a config field annotated `hint` takes, where `value` is not that; None where it is (or cannot be told)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        choices = [a for a in typing.get_args(hint) if a is not type(None)]
        wanted = [_type_problem(a, value) for a in choices]
        return None if any(w is None for w in wanted) else " or ".join(w for w in wanted if w)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else "one of " + ", ".join(map(repr, allowed))
    if hint is bool:
        return None if isinstance(value, bool) else "a boolean"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin in (list, tuple) or hint in (list, tuple):  # a YAML list arrives as a tuple (TaskConfig.options)
        if not isinstance(value, (list, tuple)):
            return f"a list ({hint})"
        inner = typing.get_args(hint)
        item = inner[0] if inner else None
        if item is None or item is Ellipsis:
            return None
        bad = [_type_problem(item, v) for v in value]
        return next((f"a list of {b}" for b in bad if b), None)
    if origin in (dict, set) or hint in (dict, set):
        shown = hint.__name__ if hint in (dict, set) else hint
        return f"{shown} (task.options holds numbers, strings, booleans and lists of them only)"
    return None
