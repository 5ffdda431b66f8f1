"""Models: loading a policy (and its quantized base), the built-in tiny model, checkpoints, export."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path


@runtime_checkable
class ModelBuilder(Protocol):
    """A built-in model (registries.MODELS, `model: builtin:<name>`): builder() makes the model once, cached,
    and returns its HF folder."""

    def __call__(self) -> Path: ...
