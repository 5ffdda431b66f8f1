"""Chat-formatted prompts (task.chat): one rendering, the same token ids for every component that reads a prompt.

The model is the shipped tiny model with a ChatML template and its role tokens (models/tiny_chat.py), so the
template's special tokens are single ids, as in a real chat model."""

import pytest
import torch

from harness.chat import for_model, messages, render, uses_chat
from harness.config.run import RunConfig, TaskConfig
from harness.execution.lifecycle import run_one
from harness.results.layout import read_json, read_metrics
from harness.tasks import load_task

from conftest import tiny_run_config


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    from harness.models.tiny_chat import with_chat_template

    return with_chat_template(tiny_model, tmp_path_factory.mktemp("chat") / "tiny-chat-template")


@pytest.fixture(scope="module")
def tokenizers(chat_model, tiny_model):
    from harness.models.loading import load_tokenizer

    return load_tokenizer(str(chat_model)), load_tokenizer(str(tiny_model))


def test_a_character_tokenizer_keeps_its_spaces(tokenizers, chat_model):
    """transformers' AutoTokenizer gives a folder with a qwen2 config Qwen2Tokenizer, whose byte-level pre-tokenizer
    dropped every space of "Calculate 95 + 21." from the character tokenizer's ids; load_tokenizer reads the
    folder's own tokenizer.json."""
    from transformers import AutoTokenizer

    chat, _ = tokenizers
    space = chat.convert_tokens_to_ids(" ")
    assert space in chat("Calculate 95 + 21.", add_special_tokens=False)["input_ids"]
    assert space not in AutoTokenizer.from_pretrained(chat_model)("Calculate 95 + 21.", add_special_tokens=False)["input_ids"]


def template_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """What transformers gives a chat model's user: apply_chat_template's own tokenization."""
    out = tokenizer.apply_chat_template(messages(prompt, system), add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def test_auto_follows_the_tokenizer_and_explicit_choices_are_checked(tokenizers):
    chat, plain = tokenizers
    assert uses_chat(chat, TaskConfig()) and not uses_chat(plain, TaskConfig())
    assert not uses_chat(chat, TaskConfig(chat=False))
    with pytest.raises(ValueError, match="task.chat: true, but the tokenizer of m has no chat template"):
        uses_chat(plain, TaskConfig(chat=True), "m")
    with pytest.raises(ValueError, match="task.system_prompt is a chat message; with task.chat: false"):
        uses_chat(chat, TaskConfig(chat=False, system_prompt="Be brief."))
    with pytest.raises(ValueError, match="task.system_prompt .* no chat template"):
        for_model(load_task(TaskConfig(eval_size=5)), plain, TaskConfig(eval_size=5, system_prompt="Be brief."))


def test_a_chat_task_renders_every_prompt_once_and_keeps_rewards(tokenizers):
    chat, _ = tokenizers
    cfg = TaskConfig(eval_size=20, system_prompt="Add.")
    raw = load_task(cfg)
    task = for_model(raw, chat, cfg)
    p, q = raw.eval[0], task.eval[0]
    assert q.prompt == f"<|im_start|>system Add.<|im_end|><|im_start|>user {p.prompt}<|im_end|><|im_start|>assistant "
    assert q.answer == p.answer and len(task.train) == len(raw.train)
    assert task.reward(q, p.answer) == 1.0 and task.reward(q, "0") == 0.0


def test_the_engine_and_the_trainer_see_the_templates_own_token_ids(chat_model, tokenizers):
    """The rollout's prompt ids (which the trainer scores, and which vLLM is handed) are apply_chat_template's
    ids, role tokens as single special ids, for prompts of different lengths left-padded together."""
    from harness.models.loading import load_policy
    from harness.rollout.hf import HFEngine

    chat, _ = tokenizers
    cfg = RunConfig(model=str(chat_model), task={"eval_size": 20, "system_prompt": "Add."})
    model, tokenizer = load_policy(cfg, torch.device("cpu"), torch.float32)
    raw = load_task(cfg.task)
    task = for_model(raw, tokenizer, cfg.task)
    prompts = [p.prompt for p in task.eval[:6]] + [render(tokenizer, "1+2=", "Add.")]  # shorter: padded on the left
    rollout = HFEngine(model, tokenizer, cfg).generate(prompts)
    raws = [p.prompt for p in raw.eval[:6]] + ["1+2="]
    for ids, mask, text in zip(rollout.prompt_ids, rollout.prompt_mask, raws):
        expected = template_ids(chat, text, "Add.")
        assert ids[mask.bool()].tolist() == expected
        assert expected.count(chat.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant
        assert chat.convert_tokens_to_ids(" ") in expected


def test_a_run_on_a_chat_model_trains_on_rendered_prompts_with_a_format_reward(chat_model, tmp_path):
    cfg = tiny_run_config(steps=2, eval_every=2, checkpoint_every=2)
    cfg = cfg.model_copy(update={"model": str(chat_model),
                                 "task": cfg.task.model_copy(update={"format_reward": 0.5})})
    cfg = RunConfig.model_validate(cfg.model_dump())
    summary = run_one(cfg, tmp_path / cfg.run_id, torch.device("cpu"))
    assert summary["status"] == "ok" and summary["chat_template"] is True
    rows = [r for r in read_metrics(tmp_path / cfg.run_id) if "reward/mean" in r]
    for r in rows:  # the format reward is added on top of accuracy; the held-out eval is accuracy alone
        assert r["reward/mean"] == pytest.approx(r["reward/accuracy"] + 0.5 * r["reward/formatted"])
    samples = (tmp_path / cfg.run_id / "samples.jsonl").read_text()
    assert "<|im_start|>user " in samples and "<|im_start|>assistant " in samples
    assert read_json(tmp_path / cfg.run_id / "summary.json")["chat_template"] is True


def test_fields_added_later_keep_old_run_ids():
    """A config written before task.chat, task.format_reward, ... existed keeps its folder: those fields are
    left out of the run id while at their default, and change it when set."""
    base = RunConfig()
    assert base.run_id == RunConfig.model_validate({"task": {"chat": "auto", "options": {}}, "eval": {"samples": 0}}).run_id
    assert '"chat"' not in base.canonical_json() and '"eval"' not in base.canonical_json()
    changed = {RunConfig(task={"chat": False}).run_id, RunConfig(task={"format_reward": 0.1}).run_id,
               RunConfig(eval={"samples": 4}).run_id, RunConfig(task={"system_prompt": "x", "chat": True}).run_id}
    assert len(changed) == 4 and base.run_id not in changed


def test_lm_evals_harness_tasks_hold_the_prompts_the_run_saw(chat_model, tokenizers, tmp_path):
    """qrl_arith's data is the run's held-out split as the run's engine read it: chat-rendered, so that
    lm-eval's exact_match is the run's eval/reward again."""
    import json

    from harness.evals.lm_eval import _write_tasks

    chat, _ = tokenizers
    cfg = RunConfig(model=str(chat_model), task={"eval_size": 20, "system_prompt": "Add."})
    _write_tasks(cfg, tmp_path, ["qrl_arith"], chat)
    rows = [json.loads(line) for line in (tmp_path / "data" / "qrl_arith.jsonl").read_text().splitlines()]
    raw = load_task(cfg.task).eval
    assert [r["prompt"] for r in rows] == [render(chat, p.prompt, "Add.") for p in raw]


def test_modelopt_calibrates_on_the_prompts_the_run_sees(chat_model, tokenizers):
    """amax is calibrated on the task's training prompts as the model is prompted with them: chat-rendered."""
    from harness.quant.modelopt import calibration_texts

    chat, plain = tokenizers
    cfg = RunConfig(model=str(chat_model), task={"eval_size": 20})
    texts = calibration_texts(cfg, chat)
    assert len(texts) == cfg.modelopt.quant_calib_size
    assert texts[0] == render(chat, load_task(cfg.task).train[0].prompt)
    assert calibration_texts(RunConfig(task={"eval_size": 20}), plain)[0] == load_task(cfg.task).train[0].prompt
