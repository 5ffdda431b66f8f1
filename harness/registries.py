"""Every axis's registry in one place: what names a matrix may use, and what backs each."""

from harness.registry import Registry

QUANT = Registry("quant format")
QUANT.register("bf16", "harness.quant:BF16", "no quantization: the base in the device's compute dtype")
QUANT.register("int8", "harness.quant:INT8", "bitsandbytes LLM.int8 base, frozen, + LoRA")
QUANT.register("nf4", "harness.quant:NF4", "QLoRA: bitsandbytes NF4 base with double quantization + LoRA")
QUANT.register("fp4", "harness.quant:FP4", "bitsandbytes FP4 base with double quantization + LoRA")

ALGORITHMS = Registry("algorithm")
ALGORITHMS.register("grpo", "harness.recipes.grpo:run", "GRPO: group-relative advantages, clipped surrogate, k3 KL")

TASKS = Registry("task")
TASKS.register("arith", "harness.tasks:ArithTask", "two-digit addition, exact-answer reward (synthetic)")
TASKS.register("boxed", "harness.tasks:BoxedTask", "GSM8K-style word problems, answer in \\boxed{} (JSONL or HF dataset)")

MODELS = Registry("built-in model")
MODELS.register("tiny-arith", "harness.tiny_arith:build", "0.6M-parameter Qwen2, warm-started on `arith`")

COLOCATION = Registry("colocation mode")
COLOCATION.register("in_process", "harness.rollout:InProcessRollout", "the trainer's own model generates (transformers)")

EXECUTORS = Registry("executor")
EXECUTORS.register("sequential", "harness.executor:run_sequential", "one run after another in this process")
