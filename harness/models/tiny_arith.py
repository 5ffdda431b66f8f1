"""`builtin:tiny-arith`: a 0.6M-parameter Qwen2 made here, so everything runs with no download.

A character-level tokenizer over printable ASCII (saved as a standard HF fast tokenizer) and a
small Qwen2 whose dimensions are multiples of 64 (4-bit block sizes fit), warm-started by
supervised training on `arith` to partial competence so that RL has headroom. The warm-start
checkpoint is chosen by held-out greedy accuracy because accuracy under a constant learning
rate is not monotone (0.62 at one step, 0.24 fifty steps later, in the first prototype).
The model every run of `builtin:tiny-arith` uses is the one shipped with the package (SHIPPED,
checked against its sha256 list when loaded): a build is deterministic on one machine, but CPU kinds
and GPUs round the warm start's matmuls differently and chose other checkpoints (step 425 here,
450 and 400 elsewhere), so the same matrix trained different models on different machines.
`harness models build` rebuilds it from RECIPE (or a variant) into a cache folder keyed by the recipe's hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from harness.common.files import locked, replacing

RECIPE = {
    "version": 1,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,  # 3 specials + 95 printable ASCII, padded to a multiple of 64
    "max_position_embeddings": 256,
    "seed": 0,
    "lr": 1e-3,
    "batch_size": 128,
    "max_steps": 800,
    "eval_from": 200,
    "eval_every": 25,
    "target": [0.35, 0.55],  # stop at the first checkpoint whose held-out accuracy lands here
    "accept": [0.3, 0.6],  # otherwise the checkpoint closest to the middle, if within this
    # CPU threads the warm start trains on. One: the same weights whatever the machine's core count (a
    # matmul's sums split over N threads round differently per N), and no slower where another process
    # holds a core (two threads on a 2-core machine with one core busy took 415 s instead of 24 s: every
    # op waits for the descheduled thread). On an idle 2-core machine one thread takes 37 s.
    "threads": 1,
}
SHIPPED = Path(__file__).parent / "shipped" / "tiny-arith-v1"  # RECIPE built on one CPU thread (2026-12-02)
SPECIALS = ["<pad>", "<eos>", "<unk>"]
RESERVED_HELD_OUT = 1000  # arith's first 1000 shuffled problems are never trained on here


def cache_root() -> Path:
    # an empty QRL_CACHE (`QRL_CACHE= make test`) means the default, not the current directory
    return Path(os.environ.get("QRL_CACHE") or Path.home() / ".cache" / "quant-rl")


class ModelChecksumError(ValueError):
    """A shipped model file that is not the file its sha256 list names."""


_verified: set[Path] = set()


def shipped(folder: Path = SHIPPED) -> Path:
    """The shipped tiny-arith folder, after checking every file against `<folder>.sha256` (once per process)."""
    if folder in _verified:
        return folder
    listed = folder.with_suffix(".sha256")
    for line in listed.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        got = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"
        if got != digest:
            raise ModelChecksumError(f"{path}: sha256 {got}, {listed} says {digest}; reinstall the package "
                                     "(`pip install -e .`) or rebuild it with `harness models build`")
    _verified.add(folder)
    return folder


def checksum(folder: Path) -> str:
    """The sha256 of a model folder's weights (model.safetensors): what env.json and the report name."""
    listed = folder.with_suffix(".sha256")
    if listed.exists():  # the shipped model: its list is the checked truth, no need to hash 2.5 MB again
        for line in listed.read_text().splitlines():
            digest, name = line.split(maxsplit=1)
            if name.lstrip("*") == "model.safetensors":
                return digest
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def recipe_key(recipe: dict = RECIPE) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def build(recipe: dict = RECIPE, log=print) -> Path:
    """Path of the cached model folder, building it first if this recipe was never built here. A recipe may
    add `task` (a TaskConfig's fields: warm-start on that task instead of arith), `chat_template` (the
    tokenizer's, with `chat_tokens` its special tokens; prompts are then chat-rendered) and `name`."""
    target = cache_root() / "models" / f"{recipe.get('name', 'tiny-arith')}-{recipe_key(recipe)}"
    if (target / "warm_start.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.parent / f"{target.name}.lock"):  # a concurrent build waits and then reuses ours
        if not (target / "warm_start.json").exists():
            with replacing(target) as tmp:
                _build_into(tmp, recipe, log)
                shutil.rmtree(target, ignore_errors=True)  # a build without its warm_start.json: torn
    return target


def make_tokenizer(chat_template: str | None = None, chat_tokens: tuple[str, ...] = ()):
    """The character tokenizer; with a chat template, its role markers are special tokens of their own
    (ids after the printable characters, inside the 128-id vocabulary), as a real chat model's are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + list(chat_tokens))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                        additional_special_tokens=list(chat_tokens))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _build_into(out: Path, recipe: dict, log) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["threads"])
    try:
        _train_into(out, recipe, log)
    finally:
        torch.set_num_threads(threads)  # build() also runs inside a sweep or a test process


def _train_into(out: Path, recipe: dict, log) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from harness.chat import model_task
    from harness.config.run import RolloutConfig, RunConfig, TaskConfig
    from harness.rollout.hf import HFEngine, evaluate
    from harness.tasks import SPLIT_SEED

    start = time.time()
    torch.manual_seed(recipe["seed"])
    tokenizer = make_tokenizer(recipe.get("chat_template"), tuple(recipe.get("chat_tokens", ())))
    arch = {k: recipe[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "max_position_embeddings")}
    config = Qwen2Config(**arch, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    if recipe.get("init") == "shipped":  # a variant that starts from the shipped weights (same shape) instead of random
        model.load_state_dict(Qwen2ForCausalLM.from_pretrained(shipped()).state_dict())

    task = model_task(TaskConfig(**recipe.get("task", {"name": "arith", "eval_size": RESERVED_HELD_OUT})), tokenizer)
    train, held_out = task.train, task.eval[:500]
    rollout = RolloutConfig(max_new_tokens=recipe.get("max_new_tokens", 4))
    engine = HFEngine(model, tokenizer, RunConfig(rollout=rollout))
    # the held-out accuracy picks the checkpoint: one generate of the held-out prompts, as the shipped model was
    # built, not batches sized by the train defaults (a batch's padding rounds its numbers, and so the pick)
    engine.eval_batch = engine.prefill_rows = len(held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"])
    rng = random.Random(recipe["seed"])
    history, best = [], None
    middle = sum(recipe["target"]) / 2
    n_params = sum(p.numel() for p in model.parameters())
    log(f"building builtin:{recipe.get('name', 'tiny-arith')} ({n_params / 1e6:.2f}M params), once; cached at {out.parent}")
    for step in range(1, recipe["max_steps"] + 1):
        batch = rng.sample(train, recipe["batch_size"])
        input_ids, labels = _sft_batch(tokenizer, task, batch)
        model.train()
        loss = model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= recipe["eval_from"] and step % recipe["eval_every"] == 0:
            acc = evaluate(engine, task, held_out)
            history.append({"step": step, "loss": loss.item(), "held_out_accuracy": acc})
            log(f"  warm-start step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
            if best is None or abs(acc - middle) < abs(best[1] - middle):
                best = (step, acc, {k: v.clone() for k, v in model.state_dict().items()})
            if recipe["target"][0] <= acc <= recipe["target"][1]:
                break
    lo, hi = recipe["accept"]
    if best is None or not lo <= best[1] <= hi:
        raise RuntimeError(f"tiny-arith warm start found no checkpoint with held-out accuracy in [{lo}, {hi}]: {history}")
    model.load_state_dict(best[2])
    model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=1, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"recipe": recipe, "chosen_step": best[0], "held_out_accuracy": best[1], "history": history,
            "split_seed": SPLIT_SEED, "build_seconds": round(time.time() - start, 1)}
    (out / "warm_start.json").write_text(json.dumps(info, indent=2))
    log(f"  chose step {best[0]} (held-out accuracy {best[1]:.3f}) in {info['build_seconds']} s")


def _sft_batch(tokenizer, task, problems) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt demonstration <eos>` sequences (arith's demonstration: the answer alone); loss only
    on the demonstration and eos."""
    tokenizer.padding_side = "right"
    prompts = tokenizer([p.prompt for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([task.demonstration(p) for p in problems], add_special_tokens=False)["input_ids"]
    seqs = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return ids, labels
