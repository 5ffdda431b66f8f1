"""Dotted field paths ("lora.r", "rollout.top_p") into config trees: for matrices, tune spaces and --set."""

from __future__ import annotations


def get_dotted(tree: dict, dotted: str, default=None):
    """tree["lora"]["r"] for "lora.r"; `default` where a part is missing (or holds None)."""
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return default if tree is None else tree


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree["lora"]["r"] = value for "lora.r", creating the parents a partial config lacks.
    ValueError when a parent holds a value rather than fields ("quant.x")."""
    *parents, leaf = dotted.split(".")
    for i, part in enumerate(parents):
        node = tree.get(part)
        if isinstance(node, str) and part == "task":  # `task: arith` shorthand
            node = {"name": node}
        if node is not None and not isinstance(node, dict):
            raise ValueError(f"{dotted}: {'.'.join(parents[:i + 1])} is a value ({node!r}), not a group of fields")
        tree[part] = node = dict(node or {})
        tree = node
    tree[leaf] = value
