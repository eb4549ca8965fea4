"""YAML read into plain containers that remember the line of every key and item, for file:line errors."""

from __future__ import annotations

from typing import Any

import yaml

from agent.errors import ConfigError


class LDict(dict[str, Any]):
    """A mapping from the file: `line` is where it starts, `lines[key]` where each key is, and `texts[key]`
    where a string value's text starts (for errors inside a value, such as a CEL expression)."""

    line: int
    lines: dict[str, int]
    texts: dict[str, TextSpan]


class TextSpan:
    """Where a string value's characters are in the file: maps a (line, column) inside the value to the file's."""

    __slots__ = ("block", "column", "indent", "line", "raw", "value")

    def __init__(self, line: int, column: int, block: bool, indent: int, raw: str = "", value: str = "") -> None:
        self.line = line  # 1-based line of the value's first character (of its indicator for a block scalar)
        self.column = column  # 1-based column of the value's first character (of its opening quote)
        self.block = block  # a literal or folded block scalar: its text starts on the next line
        self.indent = indent  # the block's indentation
        self.raw = raw  # the scalar as written (quotes, escapes, line breaks), for a flow scalar
        self.value = value  # and as read

    def locate(self, line: int, column: int) -> tuple[int, int]:
        """The file's (line, column) of the value's `line`, `column` (both 1-based)."""
        if self.block:
            return self.line + line, self.indent + column
        lines = self.value.split("\n")
        index = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
        # Walk the text as written beside the text as read: escapes (\"), quotes doubled (''), and line breaks
        # folded into spaces are written characters with no read character of their own, so they are passed.
        raw, value = self.raw, self.value
        i = j = 0
        while j < index and j < len(value) and i < len(raw):
            if raw[i] == value[j]:
                j += 1
            i += 1
        if j < len(value):
            while i < len(raw) and raw[i] != value[j]:
                i += 1
        before = raw[:i]
        breaks = before.count("\n")
        if breaks == 0:
            return self.line, self.column + i
        return self.line + breaks, i - before.rfind("\n")


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
        out.line, out.lines, out.texts = line, {}, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got {key!r}", file, key_line)
            if key in out:
                raise ConfigError(f"duplicate key {key!r} (first at line {out.lines[key]}); keep one", file, key_line)
            out[key] = _convert(value_node, loader, file)
            out.lines[key] = key_line
            if isinstance(value_node, yaml.ScalarNode):
                out.texts[key] = _span(value_node, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LList()
        seq.line, seq.lines = line, []
        for item in node.value:
            seq.append(_convert(item, loader, file))
            seq.lines.append(item.start_mark.line + 1)
        return seq
    return loader.construct_object(node, deep=True)


def _span(node: yaml.ScalarNode, loader: yaml.SafeLoader) -> TextSpan:
    start = node.start_mark
    buffer = start.buffer or ""
    if node.style == ">":
        # Folded: its lines are read joined by spaces, so the walk beside the written text (as for flow
        # scalars) finds a column on any of them. The text starts on the line after the indicator.
        begin = buffer.find("\n", start.pointer) + 1
        raw = buffer[begin : node.end_mark.pointer]
        return TextSpan(start.line + 2, 1, False, 0, raw, str(node.value))
    if node.style == "|":
        indent = 0
        # The block's first non-blank line after the indicator gives its indentation.
        for text in buffer[start.pointer :].split("\n")[1:]:
            if text.strip():
                indent = len(text) - len(text.lstrip(" "))
                break
        return TextSpan(start.line + 1, start.column + 1, True, indent)
    raw = buffer[start.pointer : node.end_mark.pointer]
    return TextSpan(start.line + 1, start.column + 1, False, 0, raw, str(node.value))
