"""FP8 KV-cache scales of a colocated vLLM engine (rollout.kv_scales).

vLLM writes keys and values into an fp8 cache as x / scale. Its scales come from the checkpoint or are 1.0, set when
the engine loads: a sync that changes the adapter changes the keys and values the engine writes, not the scales, so
they go stale (NeMo RL PR 3008 recalibrates them every step). `recalibrate` sets them after every adapter sync from
the trainer's own keys and values on the latest rollout (the first sync: on the step's prompts), as vLLM's own
calculation does (Attention.calc_kv_scales), amax / 200 for keys and amax / 100 for values (vllm.envs
K/V_SCALE_CONSTANT: e4m3's largest value is 448, which leaves room for keys and values larger than the calibration
batch's), and amax / 200 for queries: on backends that take fp8 queries with an fp8 cache (FlashAttention 3 on Hopper)
vLLM quantizes each query with its layer's q scale, also 1.0 unless calibrated.

The check, in both modes at every eval_every-th sync: vLLM scores the latest rollout's completions under the scales
it loaded with and under scales recalibrated now, and each is compared with the trainer's log-probs of the same
tokens: mismatch/kv_static_abs and mismatch/kv_recalibrated_abs, mean |vLLM - trainer| per token. Static scales are
stale when the first is clearly above the second. Where every key and value sits in e4m3's normal range under both
scales, the two differ only by where the rounding falls (bench/kv_scales.py); a scale matters where values overflow
448 or fall below that range. (The two vLLM scorings also differ from each other by about the fp8 rounding noise of
both, so their difference alone would flag scales that are fine.)
"""

from __future__ import annotations

import math
import re
import time
from typing import NamedTuple

import torch

from harness.recipes.rl_math import mask_positions

Q_RANGE, K_RANGE, V_RANGE = 200.0, 200.0, 100.0
CALIBRATION_ROWS = 32  # sequences of the latest rollout the scales are computed on
CHECK_ROWS = 32  # of those, the ones the check scores on both sides (all: a tiny task's few tokens are noisy)
# where the trainer's queries, keys and values are as attention sees them, but for rotary: the projections, or a
# query's or key's per-head norm where the model has one (Qwen3's q_norm and k_norm, applied after the projection)
_TRAINER_KV = re.compile(r"layers\.(\d+)\.self_attn\.([qkv])_(proj|norm)$")
_ENGINE_LAYER = re.compile(r"layers\.(\d+)\.")

class LayerScales(NamedTuple):
    k: float
    v: float
    q: float = 1.0  # read only by backends that quantize queries (with an fp8 cache on Hopper)


Scales = dict[int, LayerScales]  # layer index -> its scales


@torch.no_grad()
def trainer_scales(model, ids: torch.Tensor, mask: torch.Tensor) -> Scales:
    """Scales from the trainer's queries, keys and values over the unmasked tokens of `ids`. A query's or key's
    largest value after rotary embedding is bounded, at every position, by the norm of the pair of channels rotary
    turns together (rotate_half's i and i + head_dim / 2): that norm is its amax here, since the projection's output
    is pre-rotary."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    amax: dict[tuple[int, str], float] = {}
    keep = [mask.bool()]  # the chunk being run

    def hook(index: int, kind: str):
        def record(module, args, out):
            x = out.float()[keep[0]]
            if kind in ("q", "k"):
                x = x.view(x.shape[0], -1, head_dim)
                x = torch.hypot(x[..., : head_dim // 2], x[..., head_dim // 2:])
            amax[index, kind] = max(amax.get((index, kind), 0.0), float(x.abs().max()) if x.numel() else 0.0)
        return record

    found = {}
    for name, m in model.named_modules():
        if (match := _TRAINER_KV.search(name)) and (match[2], match[3]) != ("v", "norm"):
            key = int(match[1]), match[2]
            if match[3] == "norm" or key not in found:  # a per-head norm comes after the projection: it wins
                found[key] = m
    handles = [m.register_forward_hook(hook(index, kind)) for (index, kind), m in found.items()]
    if not handles:
        raise RuntimeError("kv_scales recalibrate: the trainer has no layers.N.self_attn.q_proj / k_proj / v_proj "
                           "modules to take queries, keys and values from; use rollout.kv_scales static")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", base)  # the decoder without lm_head: no [rows, tokens, vocab] logits
    was_training = model.training
    model.eval()  # no LoRA dropout in the keys and values
    try:
        for start in range(0, ids.shape[0], 8):
            keep[0] = mask[start:start + 8].bool()
            part = mask[start:start + 8]  # positions as in generate and the training forward
            body(input_ids=ids[start:start + 8], attention_mask=part, position_ids=mask_positions(part))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # a layer with all-zero queries, keys or values (nothing to calibrate on) keeps vLLM's default scale, 1.0
    return {i: LayerScales(amax[i, "k"] / K_RANGE or 1.0, amax[i, "v"] / V_RANGE or 1.0,
                           amax.get((i, "q"), 0.0) / Q_RANGE or 1.0) for i in sorted({i for i, _ in amax})}


def _attention_layers(worker) -> dict[int, torch.nn.Module]:
    return {int(_ENGINE_LAYER.search(m.layer_name)[1]): m for m in worker.model_runner.model.modules()
            if hasattr(m, "_k_scale") and hasattr(m, "layer_name") and _ENGINE_LAYER.search(m.layer_name)}


def read_scales(worker) -> Scales:
    """Runs inside vLLM's worker (collective_rpc): each attention layer's scales now."""
    return {i: LayerScales(float(m._k_scale), float(m._v_scale), float(getattr(m, "_q_scale", 1.0)))
            for i, m in _attention_layers(worker).items()}


def write_scales(worker, scales: Scales) -> None:
    """Runs inside vLLM's worker: set each attention layer's scales, in place. Backends read the tensors (CUDA: kept by
    address, so captured CUDA graphs see the new values), the floats (CPU) or the CPU copies; all three are set."""
    layers = _attention_layers(worker)
    if set(layers) != set(scales):
        raise RuntimeError(f"kv scales for layers {sorted(scales)}, but the engine's attention layers are {sorted(layers)}")
    for i, (k, v, q) in scales.items():
        m = layers[i]
        m._k_scale.fill_(k), m._v_scale.fill_(v)
        m._k_scale_float, m._v_scale_float = k, v
        if hasattr(m, "_q_scale"):
            m._q_scale.fill_(q)
            m._q_scale_float = q
        for name, value in (("_k_scale_cpu", k), ("_v_scale_cpu", v)):
            if hasattr(m, name):
                getattr(m, name).fill_(value)


def scale_shift(old: Scales, new: Scales) -> float:
    """Mean |ln(new / old)| over layers and their scales: how far the scales moved."""
    logs = [abs(math.log(n / o)) for i in new for n, o in zip(new[i], old[i])]
    return sum(logs) / len(logs)


class KVScales:
    """Keeps a colocated engine's fp8 KV-cache scales (recalibrate) and checks them (both modes).
    The engine calls remember() with every sampled rollout, synced() after an adapter sync (the work is done there,
    in the engine's sync, apart from the rollout's time) and before_generate() before it generates (the first sync
    has no rollout to calibrate on: the step's prompts, there)."""

    def __init__(self, engine, mode: str):
        self.engine, self.mode = engine, mode
        self.loaded: Scales = self.llm.collective_rpc(read_scales)[0]
        self.current = self.loaded
        self.rollout: tuple[torch.Tensor, ...] | None = None  # prompt ids, prompt mask, completion ids, completion mask
        self.pending, self.syncs = False, 0

    def remember(self, prompt_ids, prompt_mask, ids, mask) -> None:
        self.rollout = tuple(t[:CALIBRATION_ROWS] for t in (prompt_ids, prompt_mask, ids, mask))

    @property
    def llm(self):  # not kept: the engine must be freeable when its backend closes
        return self.engine.backend.llm

    def synced(self) -> None:
        self.syncs += 1
        if self.rollout:
            p_ids, p_mask, c_ids, c_mask = self.rollout
            self._update(torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1))
        else:
            self.pending = True

    def before_generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        if self.pending:
            self.pending = False
            self._update(prompt_ids[:CALIBRATION_ROWS], prompt_mask[:CALIBRATION_ROWS])

    def _update(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        check = self.rollout is not None and (self.syncs - 1) % self.engine.cfg.train.eval_every == 0
        if self.mode == "static" and not check:  # nothing to set: no trainer forward
            return
        t0 = time.perf_counter()
        fresh = trainer_scales(self.engine.model, ids, mask)
        if check:
            static, recalibrated = self.check(fresh)
            self.engine._stat("mismatch/kv_static_abs", static)
            self.engine._stat("mismatch/kv_recalibrated_abs", recalibrated)
        if self.mode == "recalibrate":
            self.engine._stat("kv/scale_shift", scale_shift(self.current, fresh))
            self._apply(fresh)
        self.engine._stat("time/kv_scales_s", time.perf_counter() - t0)

    def check(self, fresh: Scales) -> tuple[float, float]:
        """Mean |vLLM - trainer| log-prob per completion token of the latest rollout's first CHECK_ROWS, vLLM scoring
        it under the scales it loaded with and under `fresh` (the trainer's: raw log-probs, temperature 1, as vLLM's
        prompt log-probs are)."""
        p_ids, p_mask, c_ids, c_mask = (t[:CHECK_ROWS] for t in self.rollout)
        trainer = self._trainer_logprobs(p_ids, p_mask, c_ids, c_mask)
        in_use, m = self.current, c_mask.float().cpu()
        gaps = []
        for scales in (self.loaded, fresh):
            scored = self.score(scales, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1))
            gaps.append(float(((scored[:, p_ids.shape[1]:] - trainer).abs() * m).sum() / m.sum().clamp(min=1)))
        self._apply(in_use)
        return gaps[0], gaps[1]

    @torch.no_grad()
    def _trainer_logprobs(self, p_ids, p_mask, c_ids, c_mask) -> torch.Tensor:
        from harness.recipes.rl_math import completion_logprobs

        model, was_training = self.engine.model, self.engine.model.training
        model.eval()
        try:  # two rows at a time: [2, C, vocab] float32 logits
            return torch.cat([completion_logprobs(model, p_ids[i:i + 2], p_mask[i:i + 2], c_ids[i:i + 2], c_mask[i:i + 2],
                                                  with_entropy=False)
                              [0].float().cpu() for i in range(0, p_ids.shape[0], 2)])
        finally:
            model.train(was_training)

    def _apply(self, scales: Scales) -> None:
        self.llm.collective_rpc(write_scales, args=(scales,))
        self.llm.reset_prefix_cache()  # cached blocks hold keys and values written with the old scales
        self.current = scales

    def score(self, scales: Scales, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """vLLM's raw log-prob of each unmasked token of `ids` (0 elsewhere and at each row's first) under `scales`,
        [rows, columns] like `ids`; leaves `scales` in use."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._apply(scales)
        rows = [i[m.bool()].tolist() for i, m in zip(ids.cpu(), mask.cpu())]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows],
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, seed=0),  # not
                                 # from the generators the rollouts draw from
                                 lora_request=self.engine.backend.lora_request, use_tqdm=False)
        scores = torch.zeros(ids.shape, dtype=torch.float32)
        for r, (o, row, m) in enumerate(zip(outs, rows, mask.cpu().bool())):
            scores[r, m] = torch.tensor([0.0] + [d[t].logprob for t, d in zip(row[1:], o.prompt_logprobs[1:])])
        return scores
