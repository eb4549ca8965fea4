"""Path templates (`{param}` one segment, `**` the rest) and the most-specific-wins route matcher."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

T = TypeVar("T")

LITERAL, PARAM, GLOB = 0, 1, 2  # also the specificity rank of a segment: lower is more specific
MAX_SEGMENTS = 64
_PARAM_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_BAD_LITERAL = re.compile(r"[{}*?#%\\\x00-\x20\x7f]")
# A request method the agent judges: an RFC 9110 token with no lower-case letter, at most 32 characters. Methods
# are case-sensitive, but many frameworks (Django, Werkzeug, Rack) upper-case what they get, so `delete` must never
# be judged as "some method other than DELETE"; nor may an empty one.
_METHOD_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Z-]{1,32}")
# %25 then two hex digits: a percent sign that encodes an escape. An upstream that decodes twice reads another path.
_DOUBLE_ENCODED = re.compile(r"%25[0-9A-Fa-f]{2}")


@dataclass(frozen=True, slots=True)
class Segment:
    kind: int
    value: str  # the literal, or the parameter's name; "" for a glob


def parse_template(template: str) -> tuple[Segment, ...]:
    """Parse a route's path template; raises ValueError saying what is wrong and how to write it."""
    if not template.startswith("/"):
        raise ValueError(f"path {template!r} must start with '/'")
    if template == "/":
        return ()
    parts = template[1:].split("/")
    out: list[Segment] = []
    names: set[str] = set()
    for i, part in enumerate(parts):
        if part == "":
            raise ValueError(f"path {template!r} has an empty segment ('//' or a trailing '/')")
        if part == "**":
            if i != len(parts) - 1:
                raise ValueError(f"path {template!r}: '**' may only be the last segment")
            out.append(Segment(GLOB, ""))
            continue
        m = _PARAM_RE.match(part)
        if m:
            name = m.group(1)
            if name in names:
                raise ValueError(f"path {template!r} binds {{{name}}} twice; give each parameter its own name")
            names.add(name)
            out.append(Segment(PARAM, name))
            continue
        if part in (".", "..") or _BAD_LITERAL.search(part):
            raise ValueError(
                f"path {template!r}: segment {part!r} is not a plain literal, a whole-segment {{param}} or a final '**'"
            )
        out.append(Segment(LITERAL, part))
    if len(out) > MAX_SEGMENTS:
        raise ValueError(f"path {template!r} has more than {MAX_SEGMENTS} segments")
    return tuple(out)


def shape(segments: Sequence[Segment]) -> tuple[str, ...]:
    """Two templates with the same shape match exactly the same paths (parameter names aside)."""
    return tuple(s.value if s.kind == LITERAL else ("{}" if s.kind == PARAM else "**") for s in segments)


def request_method_ok(method: str) -> bool:
    """Whether a request's method may be judged at all (see _METHOD_RE); anything else is refused."""
    return _METHOD_RE.fullmatch(method) is not None


def double_encoded(raw: str) -> bool:
    """Whether the path part of a request target holds a double-encoded escape (%25XX)."""
    end = len(raw)
    for ch in "?#":
        j = raw.find(ch, 0, end)
        if j != -1:
            end = j
    return _DOUBLE_ENCODED.search(raw, 0, end) is not None


# Paths made only of unreserved and sub-delim characters, with no dot segment (nor one followed by `;` path
# parameters, which Tomcat and Spring read as a dot segment): split without decoding.
_PLAIN_PATH = re.compile(r"(?:/(?!\.\.?(?:[/;]|$))[A-Za-z0-9\-._~!$&'()*+,;=:@]+)+")


def split_request_path(raw: str) -> list[str] | None:
    """The decoded segments of a request path, or None when it is not in a form safe to match.

    Envoy normalises paths before asking (normalize_path, merge_slashes, escaped slashes rejected); anything
    that still carries dot segments, empty segments, encoded slashes or bad escapes is refused here too, so
    the agent never decides on a different path than the one the upstream will see.
    """
    cut = len(raw)
    for ch in "?#":
        j = raw.find(ch)
        if j != -1 and j < cut:
            cut = j
    path = raw[:cut]
    if len(path) < 512 and _PLAIN_PATH.fullmatch(path):
        parts = path[1:].split("/")
        return parts if len(parts) <= MAX_SEGMENTS else None
    if not path.startswith("/"):
        return None
    if path == "/":
        return []
    parts = path[1:].split("/")
    if len(parts) > MAX_SEGMENTS:
        return None
    out: list[str] = []
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part == "":
            if i != last:
                return None
            out.append("")  # a trailing slash: only a '**' route can match it
            continue
        if "%" in part:
            try:
                seg = unquote_to_bytes(part).decode("utf-8", "strict")
            except UnicodeDecodeError:
                return None
            if _bad_escapes(part):
                return None
        else:
            seg = part
        if seg.partition(";")[0] in (".", "..") or "/" in seg or "\\" in seg:
            return None
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
            return None
        out.append(seg)
    return out


def _bad_escapes(part: str) -> bool:
    i = part.find("%")
    while i != -1:
        h = part[i + 1 : i + 3]
        if len(h) != 2 or any(c not in "0123456789abcdefABCDEF" for c in h):
            return True
        i = part.find("%", i + 3)
    return False


class _Node(Generic[T]):
    __slots__ = ("end", "glob", "literal", "param")

    def __init__(self) -> None:
        self.literal: dict[str, _Node[T]] = {}
        self.param: _Node[T] | None = None
        self.end: list[tuple[frozenset[str] | None, T]] = []
        self.glob: list[tuple[frozenset[str] | None, T]] = []


def _pick(entries: list[tuple[frozenset[str] | None, T]], method: str) -> T | None:
    fallback: T | None = None
    for methods, value in entries:
        if methods is None:
            fallback = value
        elif method in methods:
            return value  # an explicit method list beats "any method" on the same shape
    return fallback


class Matcher(Generic[T]):
    """Finds the most specific template for a path: segment by segment, literal > {param} > '**'.

    Independent of the order routes were written in. Overlaps that this order cannot settle (the same
    shape with overlapping methods) are refused when the policy is loaded, see `overlaps`.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        # Templates made only of literals, by their segments: such a template matching the whole path is
        # the most specific match there is, so one dict lookup settles most requests.
        self._exact: dict[tuple[str, ...], list[tuple[frozenset[str] | None, T]]] = {}

    def add(self, segments: Sequence[Segment], methods: frozenset[str] | None, value: T) -> None:
        if all(s.kind == LITERAL for s in segments):
            self._exact.setdefault(tuple(s.value for s in segments), []).append((methods, value))
        node = self._root
        for seg in segments:
            if seg.kind == LITERAL:
                node = node.literal.setdefault(seg.value, _Node())
            elif seg.kind == PARAM:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node.glob.append((methods, value))
                return
        node.end.append((methods, value))

    def match(self, segments: Sequence[str], method: str) -> T | None:
        entries = self._exact.get(tuple(segments))
        if entries is not None:
            found = _pick(entries, method)
            if found is not None:
                return found
        return self._walk(self._root, segments, 0, method)

    def _walk(self, node: _Node[T], segs: Sequence[str], i: int, method: str) -> T | None:
        if i == len(segs):
            if node.end:
                found = _pick(node.end, method)
                if found is not None:
                    return found
        else:
            seg = segs[i]
            child = node.literal.get(seg)
            if child is not None:
                found = self._walk(child, segs, i + 1, method)
                if found is not None:
                    return found
            if node.param is not None and seg != "":
                found = self._walk(node.param, segs, i + 1, method)
                if found is not None:
                    return found
        if node.glob:
            return _pick(node.glob, method)
        return None


def bind(segments: Sequence[Segment], path: Sequence[str]) -> dict[str, str]:
    """The values of a matched template's {params} in a request path."""
    return {s.value: path[i] for i, s in enumerate(segments) if s.kind == PARAM}


def overlaps(a: frozenset[str] | None, b: frozenset[str] | None) -> bool:
    """Whether two method sets of one shape leave a method with no single most specific route."""
    if a is None or b is None:
        return a is None and b is None
    return bool(a & b)
