"""Prompts as the model reads them: the task's raw text, or that text wrapped in the tokenizer's chat template.

The template is applied once, to the text of every prompt of the task (train and held out), with
`add_generation_prompt=True`: the recipes, both rollout engines (vLLM is handed the trainer's token ids),
the held-out evaluation and lm-eval's harness tasks then all tokenize the same string the same way
(`add_special_tokens=False`), which is what `apply_chat_template(tokenize=True)` does, so the engine
and the trainer see identical token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from harness.config.run import TaskConfig
from harness.task_base import Task


def uses_chat(tokenizer, cfg: TaskConfig, model: str = "the model") -> bool:
    """Whether prompts are chat-formatted: task.chat, `auto` meaning "when the tokenizer has a template"."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat is True and not has:
        raise ValueError(f"task.chat: true, but the tokenizer of {model} has no chat template "
                         "(set task.chat: false or auto, or use a model whose tokenizer_config.json has one)")
    chat = has if cfg.chat == "auto" else cfg.chat
    if cfg.system_prompt is not None and not chat:  # refused rather than dropped
        raise ValueError("task.system_prompt is a chat message; with task.chat: false it would be ignored" if cfg.chat
                         is False else f"task.system_prompt is a chat message, but the tokenizer of {model} has no chat "
                         "template, so task.chat: auto leaves prompts raw and it would be ignored")
    return chat


def messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]


def render(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as a chat: the system message (if any), the user's turn, and the assistant's opening."""
    return tokenizer.apply_chat_template(messages(prompt, system), add_generation_prompt=True, tokenize=False)


@dataclass
class ChatTask:
    """A task whose prompts are chat-rendered; rewards, demonstrations and answer formats are the task's own.
    A task_base.Task."""

    inner: Task
    train: list
    eval: list

    def reward(self, problem, completion: str) -> float:
        return self.inner.reward(problem, completion)

    def demonstration(self, problem) -> str:
        return self.inner.demonstration(problem)

    def formatted(self, completion: str) -> bool:
        return self.inner.formatted(completion)


def for_model(task: Task, tokenizer, cfg: TaskConfig, model: str = "the model") -> Task:
    """`task` as `model` is prompted: chat-rendered where task.chat says so (uses_chat), else unchanged."""
    if not uses_chat(tokenizer, cfg, model):
        return task

    def chat(problem):
        return replace(problem, prompt=render(tokenizer, problem.prompt, cfg.system_prompt))

    return ChatTask(task, [chat(p) for p in task.train], [chat(p) for p in task.eval])


def model_task(cfg: TaskConfig, tokenizer, model: str = "the model") -> Task:
    """The run's task (registries.TASKS) with its prompts as `model`'s tokenizer is to read them."""
    from harness.tasks import load_task

    return for_model(load_task(cfg), tokenizer, cfg, model)
