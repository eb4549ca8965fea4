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
    """Where a string value's characters are in the file: maps a (line, column) inside the value to the file's.

    The value is matched to its text in the file character by character, passing over what YAML drops or
    rewrites (indentation, quotes, the backslash of an escape, line breaks folded into spaces), so positions are
    exact in plain, quoted, literal and folded scalars alike. A character written as an escape (`\\u00e9`) keeps
    the position of the one before it.
    """

    __slots__ = ("column", "line", "source", "value")

    def __init__(self, line: int, column: int, source: str, value: str) -> None:
        self.line = line  # 1-based line of source[0]
        self.column = column  # 1-based column of source[0]
        self.source = source  # the value's text in the file, from its first character to the scalar's end
        self.value = value

    def locate(self, line: int, column: int) -> tuple[int, int]:
        """The file's (line, column) of the value's `line`, `column` (both 1-based; one past the end is fine)."""
        lines = self.value.split("\n")
        line = min(max(line, 1), len(lines))
        offset = sum(len(text) + 1 for text in lines[: line - 1]) + max(column, 1) - 1
        at = self._index(offset)
        before = self.source[:at]
        breaks = before.count("\n")
        if breaks == 0:
            return self.line, self.column + at
        return self.line + breaks, at - before.rfind("\n")

    def _index(self, offset: int) -> int:
        """The index in `source` of the value's character at `offset`; past the end, just after the last one."""
        source, value = self.source, self.value
        last = len(value.rstrip("\n")) - 1
        target = min(offset, last)
        at, start = -1, 0
        for ch in value[: target + 1]:
            found = source.find(ch, start)
            if found == -1 or (found - start > _MAX_ESCAPE and source[start:found].strip(_DROPPED)):
                continue  # written as an escape
            at, start = found, found + 1
        if at < 0:
            return 0
        return at + 1 if offset > last else at


_DROPPED = " \t\r\n\\\"'"  # what YAML may drop between two characters of a value
_MAX_ESCAPE = 10  # the longest escape, \\U0001F600


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


def load_yaml(text: str, file: str, *, allow_empty: bool = False) -> Any:
    """Parse one YAML document; duplicate keys and non-string keys are errors (PyYAML keeps the last).

    An empty document (nothing but comments) is an error, or None with `allow_empty`."""
    loader = _Loader(text, file)
    try:
        node = loader.get_single_node()
        if node is None:
            if allow_empty:
                return None
            raise ConfigError("the file is empty", file, 1)
        return _Walk(loader, file).convert(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"not valid YAML: {e.problem or e.context}", file, line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file, 0) from None
    finally:
        loader.dispose()


MAX_VALUES = 200_000  # mappings, lists and scalars one policy file may expand to (aliases count each time)
MAX_DEPTH = 64  # mappings and lists one inside another; a policy needs about 7, a test case's claims a few more


class _Loader(yaml.SafeLoader):
    """PyYAML composes a document recursively: `[[[[...` a few thousand deep is a RecursionError, which no caller
    expects from a file (it stopped the control plane's poll for good). Nesting past MAX_DEPTH is refused at the
    line where it goes too deep, long before Python's recursion limit."""

    def __init__(self, text: str, file: str) -> None:
        super().__init__(text)
        self.file = file
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", self.file, mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Walk:
    """One conversion: aliases are followed, so a value may be met many times (`&a [*b, *b, ...]` nested is
    exponential, a few hundred bytes for billions of values) or inside itself (`&a [*a]`), and aliases of
    aliases nest deeper than the text does: all are refused with their line, never a hang or a RecursionError
    (the control plane reads policies from many teams)."""

    def __init__(self, loader: yaml.SafeLoader, file: str) -> None:
        self.loader = loader
        self.file = file
        self.left = MAX_VALUES
        self.open: set[int] = set()  # the nodes being converted, from the root down
        # Where each scalar's text is, made once per node: an alias of a long string must not copy its text again
        # at every use (1,500 aliases of a 1 MiB string would be 1.5 GB).
        self.spans: dict[int, TextSpan] = {}

    def convert(self, node: yaml.Node) -> Any:
        line = node.start_mark.line + 1
        self.left -= 1
        if self.left < 0:
            raise ConfigError(f"the file expands to more than {MAX_VALUES} values (YAML aliases)", self.file, line)
        if id(node) in self.open:
            raise ConfigError("a YAML alias refers to a value that contains it", self.file, line)
        if len(self.open) >= MAX_DEPTH and isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            raise ConfigError(f"nested more than {MAX_DEPTH} levels deep (through YAML aliases)", self.file, line)
        if isinstance(node, yaml.MappingNode):
            self.open.add(id(node))
            try:
                return self.mapping(node, line)
            finally:
                self.open.discard(id(node))
        if isinstance(node, yaml.SequenceNode):
            self.open.add(id(node))
            try:
                seq = LList()
                seq.line, seq.lines = line, []
                for item in node.value:
                    seq.append(self.convert(item))
                    seq.lines.append(item.start_mark.line + 1)
                return seq
            finally:
                self.open.discard(id(node))
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.MappingNode, line: int) -> LDict:
        loader, file = self.loader, self.file
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
            out[key] = self.convert(value_node)
            out.lines[key] = key_line
            if isinstance(value_node, yaml.ScalarNode):
                span = self.spans.get(id(value_node))
                if span is None:
                    span = self.spans[id(value_node)] = _span(value_node)
                out.texts[key] = span
        return out


def _span(node: yaml.ScalarNode) -> TextSpan:
    start, end = node.start_mark, node.end_mark
    buffer = start.buffer
    quoted = 1 if node.style in ('"', "'") else 0
    if not isinstance(buffer, str):  # read from a stream: no text to match, positions as if written plainly
        return TextSpan(start.line + 1, start.column + 1 + quoted, node.value, node.value)
    if node.style in ("|", ">"):  # the text starts on the line after the indicator
        first = buffer.find("\n", start.pointer, end.pointer) + 1 or end.pointer
        return TextSpan(start.line + 2, 1, buffer[first : end.pointer], node.value)
    return TextSpan(start.line + 1, start.column + 1 + quoted, buffer[start.pointer + quoted : end.pointer], node.value)
