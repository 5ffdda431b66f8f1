"""Name -> lazy target registries, one per axis, with "did you mean" errors.

Targets are "module:attribute" strings so that heavy libraries (bitsandbytes, modelopt, vllm)
are imported only when a run actually uses them; validating a matrix imports nothing.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field


class UnknownName(ValueError):
    pass


@dataclass
class Registry:
    axis: str  # what a name means, for messages: "quant format", "task", ...
    _targets: dict[str, str] = field(default_factory=dict)
    _descriptions: dict[str, str] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, target: str, description: str = "", aliases: tuple[str, ...] = ()) -> None:
        if name in self._targets or name in self._aliases:
            raise ValueError(f"{self.axis} {name!r} is registered twice")
        self._targets[name] = target
        self._descriptions[name] = description
        for alias in aliases:
            self._aliases[alias] = name

    def names(self) -> list[str]:
        return sorted(self._targets)

    def describe(self, name: str) -> str:
        return self._descriptions[self.canonical(name)]

    def canonical(self, name: str) -> str:
        """The registered name for `name` (resolving aliases), or UnknownName with suggestions."""
        if name in self._targets:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = self.names() + sorted(self._aliases)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownName(f"unknown {self.axis} {name!r}{hint} Valid: {', '.join(self.names())}")

    def module(self, name: str) -> str:
        """The module that backs `name`, without importing it."""
        return self._targets[self.canonical(name)].partition(":")[0]

    def get(self, name: str):
        module, _, attr = self._targets[self.canonical(name)].partition(":")
        return getattr(importlib.import_module(module), attr)
