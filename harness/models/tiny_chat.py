"""`builtin:tiny-chat`: the tiny model's machinery (tiny_arith) with a chat template, warm-started on chat-rendered
prompts of a reasoning-gym task, so that the chat path (task.chat), reasoning-gym and RL on them run end to end
with no download.

Its tokenizer is the character tokenizer plus ChatML's role markers as special tokens of their own, as a real
chat model's are; its template is ChatML's (Qwen's) on one line, with the eos ending the assistant's turn. Not shipped:
it is built on first use (about a minute on one CPU thread) into the cache, keyed by RECIPE's hash.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.models import tiny_arith

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML with a space where it has a newline: the character vocabulary is printable ASCII, without "\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)

# reasoning-gym's basic_arithmetic, two terms of 1-2 digits added ("Calculate 95 + 2."): the shipped weights add 2-digit
# numbers written "95+21=", so the warm start teaches the template, the answer tags and the new spelling. Tried first:
# chain_sum (a + b or a - b, 1-2 digits) reached 0.13 in 350 warm-start steps and GRPO did not move it (0.122 -> 0.145
# in 100 steps at lr 1e-3, lower at 3e-3); 2-digit-only basic_arithmetic reached 0.05 at step 325 and GRPO did not move
# it either (0.05 -> 0.06 in 75 steps): from a few percent, most groups hold no correct answer to learn from.
TASK = {"name": "reasoning_gym", "source": "basic_arithmetic", "eval_size": 200,
        "options": {"size": 3000, "operators": ["+"], "format_style": "simple", "min_terms": 2, "max_terms": 2,
                    "min_digits": 1, "max_digits": 2, "allow_negation": False, "allow_parentheses": False}}

RECIPE = tiny_arith.RECIPE | {
    "name": "tiny-chat",
    # warm-started on chat-rendered TASK to partial competence (RECIPE's target), so that RL has headroom; runs use
    # the same task, whose held-out split the warm start never trains on
    "task": TASK,
    "chat_template": CHAT_TEMPLATE,
    "chat_tokens": list(CHAT_TOKENS),
    "max_new_tokens": 24,
    # from the shipped tiny-arith weights (same shape): from random weights, chain_sum took 200 steps of 128
    # (~140-token sequences) to reach 0.06
    "init": "shipped",
    "batch_size": 64,
    "eval_from": 25,
    "target": [0.3, 0.55],  # stop at the first checkpoint here; else the one closest to its middle within accept
    "accept": [0.05, 0.6],
}


def built() -> Path:
    """The folder of builtin:tiny-chat, built here on first use."""
    return tiny_arith.build(RECIPE)


def with_chat_template(model_dir: Path, folder: Path) -> Path:
    """A copy of a tiny model whose tokenizer carries the chat template and its role tokens (ids inside the
    model's 128-id vocabulary): the chat path on the shipped weights, with no build."""
    shutil.copytree(model_dir, folder)
    tiny_arith.make_tokenizer(CHAT_TEMPLATE, CHAT_TOKENS).save_pretrained(folder)
    return folder
