"""Typed, frozen run configuration. A RunConfig is one training run; its hash is its folder name."""

from __future__ import annotations

import functools
import hashlib
import json
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from harness.config.engine_options import VLLM_LORA_RANKS, VLLM_SAME, check_vllm_options
from harness.registries import ALGORITHMS, COLOCATION, MODELS, QUANT, SHAPES, TASKS

SEED_MAX = 2**32 - 1  # torch.manual_seed takes [-2**63, 2**64); numpy's (and most samplers') range is [0, 2**32)


class Frozen(BaseModel):
    """Every config model: unknown keys are errors, no inf or nan, and no lax bool <-> number coercion
    (pydantic would read `steps: true` as 1 and `enforce_eager: 1` as true)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_coercion(cls, v, info: ValidationInfo):
        kinds = _kinds(cls, info.field_name)
        if isinstance(v, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(f"expected a number, got {str(v).lower()}")
        if v is not None and not isinstance(v, bool) and bool in kinds and kinds <= {bool, type(None)}:
            raise ValueError(f"expected true or false, got {v!r}")
        return v


@functools.cache
def _kinds(model: type[BaseModel], field: str) -> frozenset:
    """The types a field's annotation admits (a Literal's by its values), unions flattened."""
    def walk(a) -> set:
        origin = typing.get_origin(a)
        if origin is Literal:
            return {type(x) for x in typing.get_args(a)}
        if origin in (typing.Union, types.UnionType):
            return set().union(*(walk(x) for x in typing.get_args(a)))
        if origin is typing.Annotated:
            return walk(typing.get_args(a)[0])
        return {origin or a}

    return frozenset(walk(model.model_fields[field].annotation))


class TaskConfig(Frozen):
    name: str = "arith"
    source: str | None = Field(None, description="boxed, math: a local JSONL file or an HF dataset id; "
                               "reasoning_gym: the dataset's name (chain_sum, countdown, ...)")
    eval_size: int = Field(500, ge=1, description="held-out prompts scored greedily for eval/reward")
    chat: Literal["auto"] | bool = Field("auto", description="wrap each prompt in the tokenizer's chat template "
                                         "(apply_chat_template, add_generation_prompt); auto: when the tokenizer has one")
    system_prompt: str | None = Field(None, description="with chat: the system message before each prompt")
    format_reward: float = Field(0.0, ge=0, description="added to a training completion's reward when its answer is in "
                                 "the form the task reads (a closed \\boxed{}); eval/reward stays accuracy alone")
    options: dict[str, int | float | str | bool | tuple[int | float | str | bool, ...]] = Field(
        {}, description="reasoning_gym: the dataset's own config (size, min_terms, ...); its seed is the harness's")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return TASKS.canonical(v)

    def __hash__(self) -> int:  # frozen configs are hashable (cache keys); `options` is a dict, so hash its JSON
        return hash(self.model_dump_json())


DTYPES = Literal["auto", "bfloat16", "float16", "float32"]


SAMPLING = ("colocation", "temperature", "top_p", "top_k", "max_new_tokens")  # the RolloutConfig fields every engine reads


class RolloutConfig(Frozen):
    """How rollouts are generated. Every field below `max_new_tokens` configures the vLLM engine
    (colocation `colocated` or `server`); an `in_process` run has no engine to configure, so they
    are validated like any field (a misspelt key or an out-of-range value is an error) and then
    reset to their defaults, so they do not change its run id."""

    colocation: str = "in_process"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the top_k most likely tokens (before top_p, as transformers "
                       "and vLLM order them); 0: no top-k")
    max_new_tokens: int = Field(5, ge=1)
    quantization: Literal["same", "bf16", "bitsandbytes", "fp8"] = Field(
        "same", description="vLLM's weights: same (the trainer's format where vLLM has it), bf16 (unquantized), "
                            "bitsandbytes (NF4), fp8")
    kv_cache_dtype: str = Field("auto", description="vLLM kv_cache_dtype: auto, fp8, fp8_e4m3, fp8_e5m2, ...")
    kv_scales: Literal["static", "recalibrate"] = Field(
        "static", description="an fp8 KV cache's scales: static (vLLM's, from the checkpoint or 1.0), recalibrate "
                              "(colocated; from the trainer's keys and values after every adapter sync). Colocated, "
                              "both check them every eval_every-th sync (mismatch/kv_static_abs, "
                              "mismatch/kv_recalibrated_abs)")
    rollout_model: str | None = Field(None, description="a different checkpoint for vLLM (e.g. a pre-quantized export); "
                                      "the trainer's adapter is still synced")
    dtype: DTYPES = Field("auto", description="vLLM's dtype; auto: the trainer's compute dtype")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="share of the GPU vLLM may take (weights + KV cache)")
    lora_sync: Literal["adapter", "merged"] = Field(
        "adapter", description="a LoRA trainer's weights in vLLM: adapter (loaded as one; LoRA kernels at every decode "
                               "step) or merged (W + scale BA written into vLLM's weights; colocated, bf16 base only; "
                               "decodes faster, but bf16 drops updates under half a weight's step: "
                               "mismatch/merge_rel_err)")
    max_model_len: int | None = Field(None, ge=1, description="vLLM's longest sequence (default: the model's, 131072 for "
                                      "Qwen2.5, which a small KV cache refuses): the longest prompt + max_new_tokens")
    enforce_eager: bool | Literal["auto"] = Field(
        "auto", description="true: no CUDA graphs (faster start, slower decode); auto: CUDA graphs on a GPU (measured "
                            "at 1.5B: ~8x the eager decode for ~40 s more engine start), eager on CPU")
    max_lora_rank: int | None = Field(None, description=f"vLLM's LoRA slot size, one of {VLLM_LORA_RANKS}; "
                                      "default: the smallest >= lora.r")
    sleep_mode: bool = Field(True, description="colocated on CUDA: vLLM sleeps while the trainer trains, "
                             "wakes for the next rollout")
    sleep_level: Literal[1, 2] = Field(1, description="1: weights to CPU, KV cache dropped; "
                                       "2: both dropped, weights reloaded on wake")
    offload_trainer: bool = Field(False, description="colocated on CUDA: move the trainer's model to CPU while vLLM generates")
    check_tolerance: float = Field(0.05, gt=0, description="engine check: largest mean |trainer - vLLM| log-prob "
                                   "per sampled token after an adapter sync")

    @field_validator("colocation")
    @classmethod
    def _known(cls, v: str) -> str:
        return COLOCATION.canonical(v)

    @field_validator("enforce_eager", mode="before")
    @classmethod
    def _eager(cls, v):
        if v not in (True, False, "auto") or not isinstance(v, (bool, str)):  # 1 == True: a number is refused too
            raise ValueError(f"expected true or false, or auto; got {v!r}")
        return v

    @model_validator(mode="after")
    def _kv_scales(self):
        if self.kv_scales == "recalibrate" and not self.kv_cache_dtype.startswith("fp8"):
            raise ValueError(f"kv_scales recalibrate sets an fp8 KV cache's scales; kv_cache_dtype is {self.kv_cache_dtype!r} "
                             "(valid with it: static)")
        if self.kv_scales == "recalibrate" and self.colocation == "server":
            raise ValueError("kv_scales recalibrate writes the scales inside the engine, which a `vllm serve` process does "
                             "not expose: use colocation colocated, or kv_scales static")
        return self

    @property
    def kv_scales_mode(self) -> str | None:
        """How the engine's fp8 KV-cache scales are kept: static or recalibrate; None without an fp8 cache."""
        return self.kv_scales if self.kv_cache_dtype.startswith("fp8") else None

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {v} is not a vLLM LoRA rank; valid: {', '.join(map(str, VLLM_LORA_RANKS))}")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _reset_engine_options_in_process(cls, data, handler):
        full = handler(data)  # every field validated first, whatever the colocation
        if full.colocation != "in_process" or not isinstance(data, dict):
            return full
        return handler({k: getattr(full, k) for k in SAMPLING})

    @property
    def engine(self) -> str:
        """The rollout engine (registries.ROLLOUT_ENGINES) this colocation mode runs on, as registries.COLOCATION says."""
        return COLOCATION.value(self.colocation)


class EvalConfig(Frozen):
    """The held-out evaluation during training (task.eval_size prompts, every train.eval_every steps)."""

    samples: int = Field(0, ge=0, description="completions sampled per held-out prompt at `temperature`, besides the "
                         "greedy one: logs eval/avg@k (pass@1, their mean reward) and eval/pass@j, j = 1, 2, 4, ..., k "
                         "(unbiased; harness/evals/passk.py); 0: greedy only")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of those completions (top_p 1, no top_k)")


class LoraConfig(Frozen):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | tuple[str, ...] = "all-linear"


class ModelOptConfig(Frozen):
    """ModelOpt fake-quantization knobs, named as in NeMo RL's QARL parameters."""

    quant_cfg: str | None = Field(None, description="with quant: modelopt, a ModelOpt config name (NVFP4_DEFAULT_CFG) "
                                  "or a YAML file")
    quant_calib_dataset: str | None = Field(None, description="calibrate on this JSONL file (a 'text' field per line) "
                                            "or HF dataset id instead of the task's prompts")
    quant_calib_size: int = Field(128, ge=1, description="texts used to calibrate amax")
    quant_batch_size: int = Field(32, ge=1)
    quant_sequence_length: int = Field(64, ge=1)
    recalibrate_every: int = Field(0, ge=0, description="re-calibrate amax every N steps; 0 keeps the first calibration")


class TrainConfig(Frozen):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2, description="completions sampled per prompt")
    lr: float = Field(1e-3, ge=0)
    beta: float = Field(0.04, ge=0, description="grpo: weight of the k3 KL to the reference in the loss; rloo: of the KL penalty "
                        "in the reward; dpo: DPO's beta (scale of the implicit reward); unused by sft and distill")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0, description="above clip_low: DAPO's clip-higher (0.28 in the paper)")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo", description="grpo: dapo (mean over the batch's tokens), grpo (per sequence, then over sequences), "
                            "dr_grpo (token sum / (sequences x max_new_tokens)), as TRL names them")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="grpo: divide centred rewards by the group's std, the batch's, or nothing (Dr. GRPO: none)")
    filter_groups: bool = Field(False, description="grpo: drop groups whose rewards are all equal from the loss (DAPO dynamic "
                                                    "sampling, without re-sampling); counted in frac_reward_zero_std")
    updates_per_batch: int = Field(1, ge=1, description="optimizer steps on each rollout batch")
    micro_batch_size: int | None = Field(None, ge=1, description="grpo: completions per forward and backward; the step's "
                                         "gradient accumulates over them (the same update, less memory); None: all at once")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    gradient_checkpointing: bool = False
    trainable: Literal["lora", "full"] = Field("lora", description="full: every base weight trains "
                                               "(QAT through the fake quantizer)")
    dtype: DTYPES = Field("auto", description="the trainer's compute dtype; auto: bf16 where the hardware has it, else float32")
    tis_cap: float | None = Field(None, gt=1, description="grpo: the importance-sampling cap C_max of every is_mode "
                                  "(weights from p_train/p_sampler correct the surrogate for the rollout engine's "
                                  "policy); None: no correction")
    is_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "token_truncate", description="grpo, with tis_cap: as TRL's vllm_importance_sampling_mode: the token's ratio "
        "or its sequence's (exp of the summed log-ratio, for all its tokens), clamped to [is_cap_min, tis_cap] "
        "(truncate) or zeroed outside it (mask)")
    is_cap_min: float | None = Field(None, ge=0, description="grpo, with tis_cap: the lower bound C_min of the "
                                     "importance-sampling ratio; None: none")
    mismatch_cap: float = Field(2.0, gt=1, description="mismatch/ratio_out_of_cap_frac counts tokens whose p_train/p_sampler "
                                "is outside [1/cap, cap]")

    @model_validator(mode="after")
    def _importance_sampling(self):
        if self.tis_cap is None:  # the correction is off: a mode or lower cap alone would be silently ignored
            unused = [f"train.{k}" for k in ("is_mode", "is_cap_min") if getattr(self, k) != TrainConfig.model_fields[k].default]
            if unused:
                raise ValueError(f"{' and '.join(unused)} configure{'s' if len(unused) == 1 else ''} the importance-sampling "
                                 "correction, which train.tis_cap (its cap C_max) turns on: set tis_cap too")
        elif self.is_cap_min is not None and self.is_cap_min >= self.tis_cap:
            raise ValueError(f"train.is_cap_min {self.is_cap_min} must be below train.tis_cap {self.tis_cap}")
        return self


# train options only some recipes read (harness/recipes/): set for another algorithm they would be ignored, so it is an error
ALGORITHM_OPTIONS = {
    "loss_type": ("grpo",), "scale_rewards": ("grpo",), "filter_groups": ("grpo",), "tis_cap": ("grpo",),
    "is_mode": ("grpo",), "is_cap_min": ("grpo",), "micro_batch_size": ("grpo",),
    "clip_low": ("grpo", "rloo"), "clip_high": ("grpo", "rloo"),  # the clipped surrogate (rloo's over whole completions)
}
KL_REGULARISED = ("grpo", "rloo")  # recipes whose objective holds beta x KL to the reference (see RunConfig.kl_in_loss)


class RunConfig(Frozen):
    model: str = "builtin:tiny-arith"
    task: TaskConfig = TaskConfig()
    quant: str = "bf16"
    algorithm: str = "grpo"
    rollout: RolloutConfig = RolloutConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    modelopt: ModelOptConfig = ModelOptConfig()
    eval: EvalConfig = EvalConfig()
    teacher: str | None = Field(None, description="distill: the BF16 teacher; None means the same checkpoint as `model`")
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("quant")
    @classmethod
    def _quant(cls, v: str) -> str:
        return QUANT.canonical(v)

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        return ALGORITHMS.canonical(v)

    @field_validator("model", "teacher")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("builtin:"):
            return "builtin:" + MODELS.canonical(v.removeprefix("builtin:"))
        if v is not None and v.startswith("shape:"):  # a real architecture with random weights (models/shape.py)
            return "shape:" + SHAPES.canonical(v.removeprefix("shape:"))
        return v  # an HF id or a local folder: checked when loaded, it may need the network

    @model_validator(mode="after")
    def _format_options(self):
        fmt = QUANT.get(self.quant)
        self._check_algorithm_options()
        if self.quant == "modelopt" and not self.modelopt.quant_cfg:
            raise ValueError("quant: modelopt needs modelopt.quant_cfg (a ModelOpt config name or a YAML file)")
        if self.quant != "modelopt" and self.modelopt.quant_cfg:
            raise ValueError(f"modelopt.quant_cfg is read with quant: modelopt only; {self.quant} would ignore it "
                             "(remove it, or set quant: modelopt)")
        if self.modelopt.recalibrate_every and not fmt.calibrated:
            raise ValueError(f"modelopt.recalibrate_every applies to ModelOpt formats, not {self.quant}")
        if self.train.trainable == "full" and not fmt.trains_full_weights:
            raise ValueError("train.trainable: full needs a base whose weights can train (bf16 or a ModelOpt format), "
                             f"not {self.quant}")
        if self.rollout.engine == "vllm":
            check_vllm_options(self)
        return self

    def _check_algorithm_options(self) -> None:
        defaults = TrainConfig()
        ignored: dict[tuple[str, ...], list[str]] = {}
        for k, users in ALGORITHM_OPTIONS.items():
            if self.algorithm not in users and getattr(self.train, k) != getattr(defaults, k):
                ignored.setdefault(users, []).append(f"train.{k}")
        if self.teacher is not None and self.algorithm != "distill":
            ignored.setdefault(("distill",), []).append("teacher")
        if ignored:
            parts = [f"{', '.join(fields)} configure{'s' if len(fields) == 1 else ''} "
                     + ("the grpo loss" if users == ("grpo",)
                        else f"the {' and '.join(users)} recipe{'s' if len(users) > 1 else ''}")
                     for users, fields in ignored.items()]
            raise ValueError(f"{'; '.join(parts)}; algorithm {self.algorithm} has no such option (it would be ignored): "
                             "remove it, or set it only on cells whose algorithm reads it")

    @property
    def kl_in_loss(self) -> bool:
        """Whether this run's objective holds a KL term to the reference (grpo's loss, rloo's reward) with a
        non-zero weight. Only then is a KL blow-up a failure of the run; for sft, dpo and distill (and beta 0)
        the logged `kl` measures how far the policy moved, which is information, not instability."""
        return self.algorithm in KL_REGULARISED and self.train.beta > 0

    @property
    def vllm_quantization(self) -> str | None:
        """The `quantization` argument vLLM gets (None: the checkpoint's own weights)."""
        q = self.rollout.quantization
        if q == "same":
            return None if self.rollout.rollout_model else VLLM_SAME[self.quant]
        return None if q == "bf16" else q

    def canonical_json(self) -> str:
        """The config as JSON, the fields added after the first results were written left out while at their
        default: a run of an older config keeps its run id, and its folder, when the harness gains a field."""
        tree = self.model_dump(mode="json")
        if self.rollout.colocation == "in_process":  # no engine reads it: the default its run ids were made with
            tree["rollout"]["enforce_eager"] = ENGINE_DEFAULT_BEFORE["enforce_eager"]
        for dotted in ADDED_LATER:
            *parents, leaf = dotted.split(".")
            node, default = tree, _DEFAULTS
            for part in parents:
                node, default = node[part], default[part]
            if node[leaf] == default[leaf]:
                del node[leaf]
        return json.dumps(tree, sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]


# Fields (dotted) that came after results existed; append new fields here, never remove one.
ADDED_LATER = ("task.chat", "task.system_prompt", "task.format_reward", "task.options", "eval", "train.micro_batch_size",
               "rollout.top_k", "train.is_mode", "train.is_cap_min", "rollout.kv_scales",
               "rollout.max_model_len", "rollout.lora_sync")
_DEFAULTS = RunConfig().model_dump(mode="json")
# engine options whose default changed (issue 23: CUDA graphs on a GPU); an in-process run resets engine options to
# their defaults, so its canonical JSON writes the old one and keeps its run id
ENGINE_DEFAULT_BEFORE = {"enforce_eager": True}
