"""YAML read into plain containers that remember the line of every key and item, for file:line errors."""

from __future__ import annotations

from typing import Any

import yaml

from agent.errors import ConfigError


class LDict(dict[str, Any]):
    """A mapping from the file: `line` is where it starts, `lines[key]` where each key is."""

    line: int
    lines: dict[str, int]


class LList(list[Any]):
    """A sequence from the file: `line` is where it starts, `lines[i]` where each item is."""

    line: int
    lines: list[int]


def line_of(obj: object, key: str | int | None = None, default: int = 0) -> int:
    """The line of `obj` (or of its `key`), or `default` when it has none (a scalar)."""
    if key is not None:
        lines = getattr(obj, "lines", None)
        if isinstance(lines, dict) and isinstance(key, str):
            return int(lines.get(key, getattr(obj, "line", default)))
        if isinstance(lines, list) and isinstance(key, int) and 0 <= key < len(lines):
            return int(lines[key])
    return int(getattr(obj, "line", default))


def load_yaml(text: str, file: str) -> Any:
    """Parse one YAML document; duplicate keys and non-string keys are errors (PyYAML keeps the last)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError("the file is empty", file, 1)
        return _convert(node, loader, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"not valid YAML: {e.problem or e.context}", file, line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file, 0) from None
    finally:
        loader.dispose()


def _convert(node: yaml.Node, loader: yaml.SafeLoader, file: str) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<:` merge keys the way SafeLoader would
        out = LDict()
        out.line, out.lines = line, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got {key!r}", file, key_line)
            if key in out:
                raise ConfigError(f"duplicate key {key!r} (first at line {out.lines[key]}); keep one", file, key_line)
            out[key] = _convert(value_node, loader, file)
            out.lines[key] = key_line
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LList()
        seq.line, seq.lines = line, []
        for item in node.value:
            seq.append(_convert(item, loader, file))
            seq.lines.append(item.start_mark.line + 1)
        return seq
    return loader.construct_object(node, deep=True)
