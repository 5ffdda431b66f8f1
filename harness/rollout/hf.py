"""Rollout engines (registries.ROLLOUT_ENGINES) and the held-out evaluation that uses them.

Every engine takes (model, tokenizer, cfg, device, workdir) and satisfies rollout.base.RolloutEngine,
so a recipe does not know which one it drives:
  sync()                                 make the engine generate from the trainer's current weights
  generate(prompts, greedy, temperature, seed) -> Rollout   (syncs first when the weights changed)
  release()                              hand the device back to the trainer before it trains
  pop_metrics() -> dict                  sync/sleep timings and memory since the last call
  mark_synced()                          take the current weights as pushed (check-engine's planted fault)
  close()                                free the engine (stop its server)
  facts: dict, sleeps: bool              what summary.json records; whether release() sleeps
`hf` (here): the trainer's own model generates with transformers `generate`: nothing to sync.
`vllm` (rollout/vllm.py): vLLM in the trainer's process or as a server, the adapter synced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from harness.evals.passk import sample_metrics

if TYPE_CHECKING:
    from harness.rollout.base import RolloutEngine


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [N, P], left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C], padded after the first eos
    completion_mask: torch.Tensor  # [N, C], 1 up to and including the first eos
    sampler_logprobs: torch.Tensor | None  # [N, C], log-prob of each token under the sampling distribution
    texts: list[str]  # completions decoded up to eos


def encode_distinct(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct prompt's left-padded ids and mask, tokenized once ([U, P]), and the row of each of `prompts`
    among them ([N]). A GRPO batch repeats each prompt group_size times: the profile found tokenizing every copy the
    largest named cost of a step outside the model, and prefilling every copy the rollout's memory peak."""
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts end together
    row_of = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    enc = tokenizer(list(row_of), return_tensors="pt", padding=True, add_special_tokens=False)
    copy_of = torch.tensor([row_of[p] for p in prompts], device=device)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), copy_of


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of every prompt ([N, P]): encode_distinct's rows, repeated."""
    ids, mask, copy_of = encode_distinct(tokenizer, prompts, device)
    return ids[copy_of], mask[copy_of]


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every token up to and including the first eos; 0 after it (padding)."""
    is_eos = completion_ids == eos_id
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # eos tokens strictly before
    return (eos_before == 0).long()


def pad_completions(token_lists: list[list[int]], logprob_lists: list[list[float]] | None, pad_id: int, device):
    """Ragged completions (an engine stops each at its eos, kept, or at max tokens) -> padded ids,
    mask (1 for every generated token, eos included) and log-probs, as `generate` gives them."""
    width = max(1, max(len(t) for t in token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    logprobs = torch.zeros((len(token_lists), width))
    for i, toks in enumerate(token_lists):
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = 1
        if logprob_lists is not None:
            logprobs[i, : len(toks)] = torch.tensor(logprob_lists[i], dtype=torch.float32)
    return ids.to(device), mask.to(device), (logprobs.to(device) if logprob_lists is not None else None)


def decode_completions(tokenizer, completion: torch.Tensor, mask: torch.Tensor) -> list[str]:
    # Cut at eos rather than skipping special tokens: a pad sampled mid-answer must stay visible
    # (as "<pad>") so it cannot be rewarded as if it were absent.
    texts = []
    for ids, n in zip(completion.tolist(), mask.sum(1).tolist()):
        ids = ids[:n]
        if ids and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


# cache layers whose per-row state is their keys and values alone ([rows, heads, tokens, dim]), by exact type: the
# hybrid and indexed layers subclass them and keep more
ROW_WISE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


@torch.no_grad()
def prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, copy_of: torch.Tensor, rows: int):
    """The KV cache of every prompt but its last token, computed once per distinct prompt (encode_distinct's `ids`
    and `mask`), at most `rows` prompts a forward, and copied to each row of the batch (`copy_of`), for `generate` to
    continue from (it then runs the last prompt token and the completion). Generate's own prefill takes every row at
    once: a GRPO batch repeats each prompt group_size times, and the H100's 7B rollout peaked there at 41 GiB where
    training took 24 (issue 23); a held-out eval's distinct prompts would peak there too. With `rows` the
    rollout's distinct prompts (HFEngine), no generation prefills more at once than a training rollout, which the
    memory fit counts. The same computation, rounded otherwise: identical on a CPU in float32, log-probs ~3e-3 apart
    in nf4. None where generate's own prefill is no larger (no prompt repeats and at most `rows` prompts), the
    prompt is one token, or a cache layer keeps per-row state besides its keys and values (linear-attention,
    state-space and indexer layers: generate then prefills the batch itself, and the first part's forward is
    wasted). The model must be in eval mode (a training forward keeps no cache under checkpointing)."""
    distinct = len(ids)
    if ids.shape[1] < 2 or (distinct == len(copy_of) and distinct <= rows):
        return None
    ids, mask = ids[:, :-1], mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
    cache = None
    for i in range(0, distinct, rows):
        part = model(input_ids=ids[i : i + rows], attention_mask=mask[i : i + rows],
                     position_ids=positions[i : i + rows], use_cache=True, logits_to_keep=1).past_key_values
        if cache is None:
            # only layers whose whole per-row state is keys and values: a hybrid layer's convolution and
            # recurrent states, or an indexer's keys, would keep the first part's rows
            if not all(type(layer) in ROW_WISE_LAYERS for layer in getattr(part, "layers", None) or [None]):
                return None
            cache = part
            _grow_rows(cache, distinct)
        else:
            _write_rows(cache, part, i)
        del part
    if distinct != len(copy_of):
        cache.batch_select_indices(copy_of)
    return cache


def _grow_rows(cache, distinct: int) -> None:
    """Make each layer's keys and values `distinct` rows tall, the first part's rows at the top; a layer at a time,
    so the first part's cache is freed as the whole one is made."""
    for layer in cache.layers:
        if len(layer.keys) < distinct:
            for name in ("keys", "values"):
                part = getattr(layer, name)
                whole = part.new_empty((distinct, *part.shape[1:]))
                whole[: len(part)] = part
                setattr(layer, name, whole)


def _write_rows(cache, part, start: int) -> None:
    """Copy a later part's keys and values into the rows from `start` (a function: no loop variable keeps the part's
    last layer alive through the next part's forward)."""
    for whole, piece in zip(cache.layers, part.layers):
        whole.keys[start : start + len(piece.keys)] = piece.keys
        whole.values[start : start + len(piece.values)] = piece.values


# The attention backends an in-process generation may use: PyTorch's SDPA but its cuDNN backend. PyTorch picks cuDNN
# first on an H100, and there its host time was ~54 ms of each ~125 ms decode step (1.5B nf4, 128 rows, 1024 new
# tokens: 1.4-2.2 ms a call, 28 calls a step) while the step was host-bound (process CPU time = wall time, the device
# busy ~63 ms a step): bench/decode_steps.py's profile, issue 23. Without it (the memory-efficient kernel there) the
# same rollout took 97.65 s against 141.01 on another H100 (`--arms harness,harness-cudnn`). On a CPU the choice is
# what it was (no cuDNN there).
DECODE_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


class HFEngine:
    """A rollout.base.RolloutEngine."""

    facts: dict
    eval_batch: int  # a training rollout's rows (train.prompts_per_step x group_size)
    prefill_rows: int  # a training rollout's distinct prompts: the most one prefill forward takes (prompt_cache)
    sleeps = False  # the trainer's own model: nothing to put to sleep
    share_prompts = True  # prompt_cache; bench/prompt_sharing.py turns it off to measure what it saves
    # SDPA backends generate() may use (DECODE_ATTENTION); None: PyTorch's own choice, which bench/decode_steps.py's
    # harness-cudnn arm measures against it
    attention: tuple[SDPBackend, ...] | None = DECODE_ATTENTION

    def __init__(self, model, tokenizer, cfg, device=None, workdir=None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg.rollout
        self.facts = {"rollout_engine": "hf"}
        # a held-out eval holds no more rows, and prefills no more prompts at once, than a training rollout: the
        # memory fit counts it beside the rollout (it had taken its 500 prompts in one generate, uncounted)
        self.prefill_rows = cfg.train.prompts_per_step
        self.eval_batch = cfg.train.prompts_per_step * cfg.train.group_size

    def sync(self) -> None:
        pass  # the trainer's own model generates: nothing to push

    def mark_synced(self) -> None:
        pass  # nor ever stale

    def release(self) -> None:
        pass  # nor to hand over

    def pop_metrics(self) -> dict:
        return {"time/sync_s": 0.0}  # the trained weights are the generating weights

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[str], greedy: bool = False, temperature: float | None = None,
                 seed: int | None = None) -> Rollout:
        device = next(self.model.parameters()).device
        distinct_ids, distinct_mask, copy_of = encode_distinct(self.tokenizer, prompts, device)
        prompt_ids, prompt_mask = distinct_ids[copy_of], distinct_mask[copy_of]
        # top_k=0 to generate: no top-k of its own (transformers defaults to 50); rollout.top_k is SamplerLogprobs'
        # remove_invalid_values: a diverged policy's NaN logits would crash the sampler; let it
        # sample so the training step can see the non-finite loss and stop the run as diverged.
        # a rollout (no temperature of the caller's): SamplerLogprobs applies the run's temperature, top-k and top-p
        # and records the sampled tokens' log-probs, so generate applies none; a sampled eval: its temperature alone
        recorder = None if greedy or temperature else SamplerLogprobs(self.cfg.temperature, self.cfg.top_p, self.cfg.top_k)
        sampling = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=temperature or 1.0, top_p=1.0, top_k=0, remove_invalid_values=True,
            **({"logits_processor": LogitsProcessorList([recorder])} if recorder else {}))
        was_training = self.model.training
        self.model.eval()
        # transformers fills every setting a call leaves unset from the checkpoint's generation_config.json
        # (a repetition_penalty, min_p, no_repeat_ngram_size): it would shape the sampler, and the greedy
        # eval, but not the log-probs the trainer scores. Generate from transformers' defaults only.
        hf_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        own, hf_model.generation_config = hf_model.generation_config, GenerationConfig()
        backends = sdpa_kernel(list(self.attention)) if self.attention else contextlib.nullcontext()
        try:
            with seeded(device, seed), backends:
                cache = (prompt_cache(self.model, distinct_ids, distinct_mask, copy_of, self.prefill_rows)
                         if self.share_prompts else None)
                out = self.model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    **({"past_key_values": cache} if cache is not None else {}),
                    max_new_tokens=self.cfg.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    return_dict_in_generate=True,
                    **sampling,
                )
        finally:
            hf_model.generation_config = own
            self.model.train(was_training)
        completion = out.sequences[:, prompt_ids.shape[1] :]
        mask = completion_mask(completion, self.tokenizer.eos_token_id)
        logprobs = None
        if recorder is not None:
            logprobs = recorder.finish(completion)
            # after EOS the pad token is often outside the top-p nucleus: -inf there, and -inf * 0 is NaN
            logprobs = torch.where(mask.bool(), logprobs, 0.0)
        completion = completion.masked_fill(mask == 0, self.tokenizer.pad_token_id)
        return Rollout(prompt_ids, prompt_mask, completion, mask, logprobs, decode_completions(self.tokenizer, completion, mask))


class SamplerLogprobs(LogitsProcessor):
    """The log-prob of each sampled token under the distribution it was sampled from, one step at a time.

    Asking `generate` for output_scores kept every step's [N, V] float32 scores, then stacked them and took a
    log_softmax: three [N, C, V] copies, ~60 GB at 128 x 256 tokens and a 152k vocabulary. This processor
    instead takes each step's log_softmax, keeps it [N, V] until the next call, where input_ids[:, -1] is the
    token sampled from it, and keeps only that token's log-prob; `finish` gathers the last step's.

    Temperature, top-k and top-p are applied here, not by `generate`: transformers (generation/utils.py,
    _get_logits_processor) puts a caller's logits processors after its own processors (remove_invalid_values'
    InfNanRemoveLogitsProcessor) but before its warpers (temperature, top-k, top-p), so a processor of ours would
    see the scores before them. The engine calls `generate` with temperature 1, top_p 1 and top_k 0 (no warpers),
    and this applies transformers' own TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper in the order
    and under the conditions `generate` would (_get_logits_processor): the scores it returns, which `generate`
    samples from, are those it would have sampled from, and the log-probs are of exactly those."""

    def __init__(self, temperature: float, top_p: float, top_k: int = 0):
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + (
            [TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)] if top_k != 0 else []) + (
            [TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)] if top_p < 1.0 else [])
        self.steps: list[torch.Tensor] = []  # [N] per generated token
        self.last: torch.Tensor | None = None  # the previous call's log-softmax, [N, V]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is not None:  # the previous call's distribution sampled input_ids[:, -1]
            self.steps.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
            self.last = None  # freed before this step's copies are made
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        self.last = torch.log_softmax(scores, dim=-1, dtype=torch.float32)
        return scores

    def finish(self, completion: torch.Tensor) -> torch.Tensor:
        """[N, C] float32 log-probs of `completion` ([N, C], as generated: pad after a finished row's eos). A step
        that generate undid (its deferred stop check, on mps) left a call too many: cut to C."""
        width = completion.shape[1]
        if self.last is not None and len(self.steps) < width:
            self.steps.append(self.last.gather(-1, completion[:, len(self.steps) : len(self.steps) + 1]).squeeze(-1))
        self.last = None
        return torch.stack(self.steps[:width], dim=1)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int | None):
    """Inside: torch's global generators (the CPU's and `device`'s) seeded with `seed`; after: back where they were,
    as if nothing had drawn from them. A no-op for seed None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def evaluate(engine: RolloutEngine, task, problems) -> float:
    """Held-out accuracy: greedy decoding, mean reward; engine.eval_batch prompts a generate."""
    total, batch = 0.0, engine.eval_batch
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        rollout = engine.generate([p.prompt for p in chunk], greedy=True)
        total += sum(task.reward(p, t) for p, t in zip(chunk, rollout.texts))
    return total / len(problems)


def sampled_rewards(engine: RolloutEngine, task, problems, k: int, temperature: float, seed: int) -> list[list[float]]:
    """The rewards of k completions of each problem sampled at `temperature` (top_p 1), per problem. Row r of the
    k x problems draws from seed + r's generator where the engine has one per prompt (vLLM), from one seeded
    with seed + its batch's first row otherwise: the engine's own stream is not touched."""
    rows = [p for p in problems for _ in range(k)]
    rewards: list[float] = []
    batch = engine.eval_batch
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        rollout = engine.generate([p.prompt for p in chunk], temperature=temperature, seed=seed + i)
        rewards += [task.reward(p, t) for p, t in zip(chunk, rollout.texts)]
    return [rewards[j * k : (j + 1) * k] for j in range(len(problems))]


def held_out_metrics(engine: RolloutEngine, task, problems, samples: int = 0, temperature: float = 1.0,
                     seed: int = 0) -> dict:
    """One held-out evaluation: eval/reward (greedy) and eval/n (prompts); with `samples` k > 0 also eval/avg@k,
    eval/pass@j and eval/samples from k completions per prompt sampled at `temperature` (evals.passk)."""
    metrics = {"eval/reward": evaluate(engine, task, problems), "eval/n": len(problems)}
    if samples:
        metrics |= sample_metrics(sampled_rewards(engine, task, problems, samples, temperature, seed))
    return metrics
