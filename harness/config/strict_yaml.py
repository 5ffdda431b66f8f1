"""Reading a matrix (or run config) file: strict, bounded YAML.

PyYAML's safe_load lets the last of two equal keys win without a word, and expands aliases into
shared objects whose size is exponential in the file's (a 13-line alias bomb reached a cell name and
filled 8 GB). Here the file is composed into YAML nodes first (with libyaml's C parser where
installed: 5x faster than the pure-Python one on large files) and the node graph is checked before
any Python object is built: no duplicate keys, no recursive alias, a bounded nesting depth, and a
bounded number of values once aliases are expanded.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

MAX_BYTES = 1 << 20  # a matrix is a few KB; 1 MiB parses in well under a second with the C loader
MAX_VALUES = 100_000  # scalars, lists and mappings, counted with aliases expanded
MAX_DEPTH = 64  # nesting levels; a matrix uses about 5
MERGE = "tag:yaml.org,2002:merge"

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlProblem(ValueError):
    """A file that cannot be read as a matrix at all; the message names where in it."""


class StrictLoader(_Base):  # type: ignore[misc, valid-type]
    """SafeLoader (CSafeLoader when libyaml is there) whose documents pass `check_node` before construction."""


def load_yaml(path: Path) -> object:
    """The file's single YAML document as Python data, or YamlProblem saying what to fix."""
    if path.is_dir():
        raise YamlProblem("is a directory, not a YAML file: give a matrix file (matrices/NAME.yaml) or its name")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise YamlProblem(f"the file is {size:,} bytes; a matrix is a few KB and at most {MAX_BYTES:,} bytes are read: "
                              "is this the right file?")
        raw = path.read_bytes()
    except OSError as e:
        raise YamlProblem(f"cannot be read: {e.strerror or e}") from None
    if b"\x00" in raw:
        raise YamlProblem("is a binary file, not YAML text: give a matrix file (matrices/NAME.yaml)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlProblem(f"is not UTF-8 text (byte {e.start}): save it as UTF-8 YAML") from None
    return parse_yaml(text)


def parse_yaml(text: str) -> object:
    loader = None
    try:
        loader = StrictLoader(text)  # the pure-Python reader checks the characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        check_node(node)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise YamlProblem(f"not valid YAML: {_where(e)}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise YamlProblem(f"not valid YAML: line {line}: the character "
                          f"{chr(e.character) if isinstance(e.character, int) else e.character!r} "
                          "is not allowed in YAML; write it as an escape in double quotes (\"\\x1b\")") from None
    except yaml.YAMLError as e:
        raise YamlProblem(f"not valid YAML: {e}") from None
    except RecursionError:
        raise YamlProblem(f"not valid YAML: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def _where(e: yaml.MarkedYAMLError) -> str:
    """'while parsing a flow sequence (line 2, column 7): did not find expected ',' or ']' at line 3, column 1'"""
    def at(mark, sep: str) -> str:
        return f"{sep}line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    context = (f"{e.context} ({at(e.context_mark, '')[0:]}): " if e.context and e.context_mark
               else f"{e.context}: " if e.context else "")
    return context + f"{e.problem or 'invalid'}{at(e.problem_mark, ' at ')}"


def check_node(root) -> None:
    """YamlProblem on a duplicate key, a recursive alias, nesting deeper than MAX_DEPTH, or more than
    MAX_VALUES values with aliases expanded (named by the top-level key that holds the most)."""
    sizes: dict[int, int] = {}  # id(node) -> values under it with aliases expanded (memo: shared nodes count once each time)
    active: set[int] = set()

    def walk(node, path: str, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlProblem(f"{path}: an alias (*name) refers to a node that contains it: the value would be infinite")
        if depth > MAX_DEPTH:
            shown = path if len(path) <= 60 else path[:40] + "..."
            raise YamlProblem(f"{shown}: nested more than {MAX_DEPTH} levels deep; a matrix nests about 5")
        active.add(key)
        n = 1
        if isinstance(node, SequenceNode):
            n += sum(walk(child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node.value))
        elif isinstance(node, MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for k, v in node.value:
                if isinstance(k, ScalarNode) and k.tag != MERGE:
                    name = (k.tag, k.value)
                    if name in seen:
                        raise YamlProblem(f"{_join(path, k.value)}: duplicate key (line {k.start_mark.line + 1}; first on line "
                                          f"{seen[name]}): YAML would keep only the last one; merge them into one")
                    seen[name] = k.start_mark.line + 1
                label = k.value if isinstance(k, ScalarNode) else "?"
                n += walk(k, _join(path, label), depth + 1) + walk(v, _join(path, label), depth + 1)
        active.discard(key)
        sizes[key] = n
        return n

    total = walk(root, "", 0)
    if total > MAX_VALUES:
        parts = [(walk(v, _join("", k.value if isinstance(k, ScalarNode) else "?"), 1), k) for k, v in root.value] \
            if isinstance(root, MappingNode) else [(total, None)]
        biggest, k = max(parts, key=lambda p: p[0])
        where = k.value if isinstance(k, ScalarNode) else "(top level)"
        aliased = biggest > _distinct(root)
        why = ("YAML aliases (*name) expand it to" if aliased else "it holds") + f" {_count(biggest)} values"
        raise YamlProblem(f"{where}: {why}; a matrix may hold at most {MAX_VALUES:,}"
                          + (": write the repeated part out once, or use fewer aliases" if aliased
                             else ": is this the right file?"))


def _distinct(root) -> int:
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            todo.extend(node.value)
        elif isinstance(node, MappingNode):
            todo.extend(x for pair in node.value for x in pair)
    return len(seen)


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**12 else f"about 10^{len(str(n)) - 1}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)
