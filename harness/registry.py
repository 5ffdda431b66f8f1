"""Name -> lazy target registries, one per axis, with "did you mean" errors.

Targets are "module:attribute" strings so that heavy libraries (bitsandbytes, modelopt, vllm)
are imported only when a run actually uses them; validating a matrix imports nothing. Each
Registry is typed by what its targets must be (`Registry[T]`, given the base type or Protocol),
and `get` checks the target it loads against that base, as lm-evaluation-harness's registry does.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
V = TypeVar("V")


class UnknownName(ValueError):
    pass


class Names:
    """A closed set of names on one axis, with descriptions, aliases and "did you mean" errors."""

    def __init__(self, axis: str):
        self.axis = axis  # what a name means, for messages: "quant format", "task", ...
        self._descriptions: dict[str, str] = {}
        self._aliases: dict[str, str] = {}

    def _add(self, name: str, description: str, aliases: tuple[str, ...]) -> None:
        if name in self._descriptions or name in self._aliases:
            raise ValueError(f"{self.axis} {name!r} is registered twice")
        self._descriptions[name] = description
        for alias in aliases:
            self._aliases[alias] = name

    def names(self) -> list[str]:
        return sorted(self._descriptions)

    def describe(self, name: str) -> str:
        return self._descriptions[self.canonical(name)]

    def canonical(self, name: str) -> str:
        """The registered name for `name` (resolving aliases), or UnknownName with suggestions."""
        if name in self._descriptions:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = self.names() + sorted(self._aliases)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownName(f"unknown {self.axis} {name!r}{hint} Valid: {', '.join(self.names())}")


class Choices(Names, Generic[V]):
    """Names that each carry a plain value, known without importing anything (no lazy target)."""

    def __init__(self, axis: str):
        super().__init__(axis)
        self._values: dict[str, V] = {}

    def register(self, name: str, value: V, description: str = "", aliases: tuple[str, ...] = ()) -> None:
        self._add(name, description, aliases)
        self._values[name] = value

    def value(self, name: str) -> V:
        return self._values[self.canonical(name)]


class Registry(Names, Generic[T]):
    """Names -> lazy "module:attribute" targets that must satisfy `base` (a class, an ABC or a Protocol).

    `get` imports the target and checks it, once per loaded object:
      - a class target: issubclass(target, base); against a Protocol (whose data members issubclass
        cannot check) the class must define or annotate every member of the Protocol;
      - an instance or function target: isinstance(target, base); against a Protocol with `__call__`,
        the target's signature must also accept the arguments of the Protocol's `__call__`.
    A mismatch is a TypeError naming the registry, the name and the target.
    """

    def __init__(self, axis: str, base: type):
        super().__init__(axis)
        self.base = base
        self._targets: dict[str, str] = {}
        self._checked: dict[str, object] = {}  # name -> the loaded object that passed the check

    def register(self, name: str, target: str, description: str = "", aliases: tuple[str, ...] = ()) -> None:
        module, _, attr = target.partition(":")
        if not module or not attr:
            raise ValueError(f"{self.axis} {name!r}: target {target!r} is not 'module:attribute'")
        self._add(name, description, aliases)
        self._targets[name] = target

    def target(self, name: str) -> str:
        """The "module:attribute" that backs `name`, without importing it."""
        return self._targets[self.canonical(name)]

    def module(self, name: str) -> str:
        """The module that backs `name`, without importing it."""
        return self.target(name).partition(":")[0]

    def get(self, name: str) -> T:
        name = self.canonical(name)
        target = self._targets[name]
        module, _, attr = target.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        if self._checked.get(name) is not obj:
            problem = mismatch(obj, self.base)
            if problem:
                raise TypeError(f"{self.axis} registry: {name!r} -> {target} {problem}")
            self._checked[name] = obj
        return obj


def mismatch(obj: Any, base: type) -> str | None:
    """Why `obj` does not satisfy `base` (see Registry), or None when it does."""
    what = f"{'Protocol' if is_protocol(base) else 'class'} {base.__module__}.{base.__qualname__}"
    if not is_protocol(base):
        if isinstance(obj, type):
            return None if issubclass(obj, base) else f"is not a subclass of {what}"
        return None if isinstance(obj, base) else f"is a {type(obj).__qualname__}, not an instance of {what}"
    members = protocol_members(base)
    if isinstance(obj, type):
        missing = [m for m in members if not _declares(obj, m)]
    else:
        missing = [m for m in members if not hasattr(obj, m)]
        if not missing and getattr(base, "_is_runtime_protocol", False) and not isinstance(obj, base):
            return f"does not satisfy {what}: isinstance refuses it (a method set to None?)"
    if missing:
        return f"does not satisfy {what}: it lacks {', '.join(missing)}"
    if "__call__" in members and not isinstance(obj, type) and not _accepts_call(obj, base):
        args = ", ".join(_call_signature(base).parameters)
        return f"does not satisfy {what}: it cannot be called as {base.__qualname__}({args})"
    return None


def is_protocol(base: type) -> bool:
    """A Protocol class itself (not a concrete class that subclasses one)."""
    return isinstance(base, type) and bool(vars(base).get("_is_protocol", False))


def protocol_members(proto: type) -> list[str]:
    """The attributes and methods a Protocol declares (its own and its Protocol bases'), `__call__` included."""
    names: set[str] = set()
    for cls in proto.__mro__:
        if cls is object or cls is Protocol or cls is Generic or not vars(cls).get("_is_protocol", False):
            continue
        names |= {n for n in (*vars(cls), *vars(cls).get("__annotations__", {})) if not n.startswith("_") or n == "__call__"}
    return sorted(names)


def _declares(cls: type, member: str) -> bool:
    return any(member in vars(k) or member in vars(k).get("__annotations__", {}) for k in cls.__mro__ if k is not object)


def _call_signature(proto: type) -> inspect.Signature:
    sig = inspect.signature(proto.__call__)  # type: ignore[operator]
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


def _accepts_call(obj: Any, proto: type) -> bool:
    """Whether obj(...) binds the arguments of proto's `__call__` (positional as positional, keyword-only by name)."""
    try:
        have = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell, so do not refuse it
        return True
    want = _call_signature(proto).parameters.values()
    positional = [None for p in want if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: None for p in want if p.kind is p.KEYWORD_ONLY}
    try:
        have.bind(*positional, **keywords)
    except TypeError:
        return False
    return True
