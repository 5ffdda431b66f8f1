"""Typed, frozen run configuration. A RunConfig is one training run; its hash is its folder name."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.registries import ALGORITHMS, COLOCATION, MODELS, QUANT, TASKS


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(Frozen):
    name: str = "arith"
    source: str | None = Field(None, description="boxed: a local JSONL file or an HF dataset id")
    eval_size: int = Field(500, ge=1, description="held-out prompts scored greedily for eval/reward")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        return TASKS.canonical(v)


class RolloutConfig(Frozen):
    colocation: str = "in_process"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(5, ge=1)

    @field_validator("colocation")
    @classmethod
    def _known(cls, v: str) -> str:
        return COLOCATION.canonical(v)


class LoraConfig(Frozen):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | tuple[str, ...] = "all-linear"


class ModelOptConfig(Frozen):
    """ModelOpt fake-quantization knobs, named as in NeMo RL's QARL parameters."""

    quant_cfg: str | None = Field(None, description="with quant: modelopt, a ModelOpt config name (NVFP4_DEFAULT_CFG) or a YAML file")
    quant_calib_dataset: str | None = Field(None, description="calibrate on this JSONL file (a 'text' field per line) or HF dataset id instead of the task's prompts")
    quant_calib_size: int = Field(128, ge=1, description="texts used to calibrate amax")
    quant_batch_size: int = Field(32, ge=1)
    quant_sequence_length: int = Field(64, ge=1)
    recalibrate_every: int = Field(0, ge=0, description="re-calibrate amax every N steps; 0 keeps the first calibration")


class TrainConfig(Frozen):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2, description="completions sampled per prompt")
    lr: float = Field(1e-3, ge=0)
    beta: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    updates_per_batch: int = Field(1, ge=1, description="optimizer steps on each rollout batch")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    gradient_checkpointing: bool = False
    trainable: Literal["lora", "full"] = Field("lora", description="full: every base weight trains (QAT through the fake quantizer)")


class RunConfig(Frozen):
    model: str = "builtin:tiny-arith"
    task: TaskConfig = TaskConfig()
    quant: str = "bf16"
    algorithm: str = "grpo"
    rollout: RolloutConfig = RolloutConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    modelopt: ModelOptConfig = ModelOptConfig()
    teacher: str | None = Field(None, description="distill: the BF16 teacher; None means the same checkpoint as `model`")
    seed: int = 0

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

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if v.startswith("builtin:"):
            return "builtin:" + MODELS.canonical(v.removeprefix("builtin:"))
        return v  # an HF id or a local folder: checked when loaded, it may need the network

    @model_validator(mode="after")
    def _format_options(self):
        fmt = QUANT.get(self.quant)
        if self.quant == "modelopt" and not self.modelopt.quant_cfg:
            raise ValueError("quant: modelopt needs modelopt.quant_cfg (a ModelOpt config name or a YAML file)")
        if self.modelopt.recalibrate_every and not fmt.calibrated:
            raise ValueError(f"modelopt.recalibrate_every applies to ModelOpt formats, not {self.quant}")
        if self.train.trainable == "full" and not fmt.trains_full_weights:
            raise ValueError(f"train.trainable: full needs a base whose weights can train (bf16 or a ModelOpt format), not {self.quant}")
        return self

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]
