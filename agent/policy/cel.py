"""The `when` condition of a policy rule: a CEL expression, compiled and checked once at load.

Google's CEL runtime (cel-expr-python, the C++ cel-cpp underneath) parses and type-checks the text against
the variables below; this module then walks the checked AST to (1) refuse selects of unknown `request` /
`source` fields, which type checking cannot see because both are maps, (2) collect what the expression reads
(`When.references`), and (3) bound the work one evaluation may cost, since policies come from many teams and
a hostile one must not be able to stall the agent.

Cost model. Inputs are bounded elsewhere: a token's claims by the provider's max_token_bytes (8 KiB by default),
and the request a `when` sees (path, host, headers) by MAX_WHEN_REQUEST_BYTES (16 KiB, agent/policy/conditions.py:
past it those fields are null). "Input" below means at most about 8-16 KiB. `contains()` takes a literal of at
most 256 bytes, so it is linear in its receiver. Only the CEL standard library is enabled: no
extension, so no `cel.bind` (which could double a string per node), no `strings.repeat`, no `lists.range`.
Every standard function is O(1) or linear in its operands, so without a comprehension an evaluation costs at
most nodes x input: <= 512 nodes, depth <= 32 (the parser itself stops at 32 levels; a chain of `+` of 8 KiB
strings copies at most 32 * 33 / 2 * 8 KiB = 4 MiB), at most 16 `contains()` (62 us each on 8 KiB).
A comprehension multiplies its condition by the length of its range (<= ~4K elements of an 8 KiB input), so:
  - comprehensions may not nest (one level keeps the loop linear in the input), and the conditions of all of
    them together have at most 64 nodes (macro included);
  - `map()` and `filter()` are refused: this runtime appends to the accumulated list by copying it, which is
    quadratic (measured: 0.6 s for 4,000 elements); `all`, `exists`, `exists_one` keep a bool or a count;
  - inside a condition, `+` may only add numbers, times and durations, and an operation linear in an operand
    is refused when that operand is loop-invariant input (it mentions a policy variable), since the same
    8 KiB would be scanned for every element: `size` of a string, `in` over a list, `contains` on such a
    receiver, `==` / `!=` of two such lists or maps, conversions (`int`, `timestamp`, ...) parsing one.
    Values from the iteration variable are fine: the elements partition the input, their costs add up to one
    pass. `matches()` is refused in a loop (see below); list and map literals there have at most 8 entries
    (this runtime rebuilds a literal on every iteration);
  - `matches` takes a literal RE2 pattern (linear-time matching, no backtracking) of at most 256 bytes with no
    counted repetition over 16, at most 8 per expression. This runtime compiles the pattern on every call,
    and Unicode classes make RE2 programs huge (`\\pL{16}` x 25 costs 0.5 s per call), so the pattern is also
    timed against the real RE2 at load and refused over 0.5 ms;
  - a time zone argument (`getHours("Europe/Berlin")`) must be a literal the runtime knows, checked at load.
Measured (best of 3, development machine shared by 2 cores): the three-clause
`claims.tenant == params.tenant && "support" in roles && now.getHours("Europe/Berlin") >= 9` costs ~9 us as
the engine hands it its variables (agent.policy.conditions.Facts: only `claims.tenant` of the claims, once the
token is seen again), with 0.5 KiB of claims as with 8 KiB; handed the claims whole it costs ~30 us and
~200 us (the runtime converts every entry of a map it is handed; `true` alone costs ~3 us). An expression
that reads the claims whole (`size(claims)`, a loop over them, a key computed at run time) is handed all.
Worst cases the bounds allow with 8 KiB of claims: a 64-node condition over 4,000 list
elements 4.9-6.7 ms; `in` an 8-entry literal over 4,000 elements 4-6 ms; 16 contains() on 8 KiB ~1 ms;
8 matches() of 8 KiB ~0.4 ms (each pattern < 0.5 ms to compile by the load check, so <= 4 ms).
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from cel_expr_python import cel
from google.protobuf import any_pb2

from agent._xds.cel.expr import checked_pb2, syntax_pb2

__all__ = [
    "MAX_EXPRESSION_BYTES",
    "VARIABLES",
    "CelCompileError",
    "When",
    "claims_convert",
    "compile_when",
]

MAX_EXPRESSION_BYTES: Final = 4096
MAX_DEPTH: Final = 32
MAX_NODES: Final = 512
MAX_PATTERN_BYTES: Final = 256
MAX_PATTERN_REPEAT: Final = 16  # the largest n in a counted repetition x{n} / x{n,m}
MAX_PATTERNS: Final = 8  # matches() calls in one expression
MAX_CONTAINS: Final = 16  # contains() calls in one expression (62 us each on 8 KiB, measured)
MAX_LOOP_NODES: Final = 64  # nodes of all comprehensions together, their ranges excluded
MAX_LOOP_LITERAL_ENTRIES: Final = 8

REQUEST_FIELDS: Final = frozenset({"method", "path", "host", "scheme", "headers", "query"})
SOURCE_FIELDS: Final = frozenset({"address", "certificate_present"})
_RECORD_FIELDS: Final[Mapping[str, frozenset[str]]] = {"request": REQUEST_FIELDS, "source": SOURCE_FIELDS}
_MAP_FIELDS: Final = frozenset({("request", "headers"), ("request", "query")})

_T = cel.Type
_DECLARATIONS: Final[Mapping[str, cel.Type]] = {
    "claims": _T.Map(_T.STRING, _T.DYN),
    "subject": _T.STRING,
    "client_id": _T.STRING,
    "scopes": _T.List(_T.STRING),
    "roles": _T.List(_T.STRING),
    "params": _T.Map(_T.STRING, _T.STRING),
    "request": _T.Map(_T.STRING, _T.DYN),
    "source": _T.Map(_T.STRING, _T.DYN),
    "now": _T.TIMESTAMP,
}
VARIABLES: Final[frozenset[str]] = frozenset(_DECLARATIONS)

_ENV: Final = cel.NewEnv(variables=_DECLARATIONS)
# Throwaway expressions that run a literal through the real runtime (RE2, the time zone database).
_PROBE_ENV: Final = cel.NewEnv(variables={"p": _T.STRING, "s": _T.STRING, "t": _T.TIMESTAMP})
_PATTERN_PROBE: Final = _PROBE_ENV.compile("s.matches(p)")
# A subject for timing a pattern: ASCII, digits, punctuation and multibyte letters, as claims and headers hold.
_PATTERN_SAMPLE: Final = ("alice.smith-42@example.com/Ärger_ü€中文 " * 16)[:512]
MAX_PATTERN_SECONDS: Final = 0.0005  # compile + match once; this runtime does both on every call
_ZONE_PROBE: Final = _PROBE_ENV.compile("t.getHours(p) >= 0")
_CLAIMS_PROBE: Final = _ENV.compile("size(claims) >= 0")  # converts every claim, reads none
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

_ERROR_LINE: Final = re.compile(r"ERROR: <input>:(-?\d+):(-?\d+): (.*)")
_LOOP_MACROS: Final = frozenset({"all", "exists", "exists_one"})
_TZ_ACCESSORS: Final = frozenset(
    {
        "getFullYear",
        "getMonth",
        "getDayOfYear",
        "getDayOfMonth",
        "getDate",
        "getDayOfWeek",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)
_CONVERSIONS: Final = frozenset({"string", "bytes", "int", "uint", "double", "timestamp", "duration"})


class CelCompileError(Exception):
    """A `when` the agent refuses to load; `line` and `column` (1-based) point into the expression text."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(f"{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class When:
    """A compiled `when`: `holds` evaluates it; `references` lists what it reads ("claims", "request.method")."""

    text: str
    references: frozenset[str]
    _expr: cel.Expression = field(repr=False, compare=False)
    # What it reads, as agent.policy.conditions.Facts.variables builds it: a variable ("params"), or only the
    # fields of `request` / `source` and the keys of `claims` it selects by name ("request.method",
    # "claims.sub"). The runtime converts every value it is handed, whole maps included (8 KiB of claims cost
    # ~40 us, the request's headers carry the token), for an expression that may read one entry of them.
    names: tuple[str, ...] = field(default=(), repr=False, compare=False)
    # The variables themselves ("claims", "params", "request"): the keys `result` hands the runtime.
    roots: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def result(self, variables: Mapping[str, object]) -> bool | None:
        """True or False; None when it cannot be evaluated (an error, or a result that is not a bool)."""
        try:
            value = self._expr.eval(None, {n: variables[n] for n in self.roots}).value()
            # An error's value is its message (a str); the checker made every result a bool otherwise.
            return value if isinstance(value, bool) else None
        except Exception:  # noqa: BLE001 - the caller decides what an error means (never an allow)
            return None

    def holds(self, variables: Mapping[str, object]) -> bool:
        """True only if evaluation succeeds with the bool true; any error or other result is False."""
        return self.result(variables) is True


def claims_convert(claims: Mapping[str, object]) -> bool:
    """Whether the runtime takes these claims as a map. It does not when one value cannot be a CEL value (an
    integer past 64 bits, at any depth): then `claims` is an error whatever the expression reads of it, so
    a `when` may be handed only the keys it reads when this is true (agent.policy.conditions)."""
    try:
        return bool(_CLAIMS_PROBE.eval(data={"claims": claims}).value() is True)
    except Exception:  # noqa: BLE001 - refused by the binding itself: hand the claims over whole, as before
        return False


def compile_when(text: str) -> When:
    """Parse, type-check and bound `text`; raise CelCompileError with the position of the first problem."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_EXPRESSION_BYTES:
        raise CelCompileError(f"the expression is {size} bytes, more than the {MAX_EXPRESSION_BYTES} allowed")
    try:
        expr = _ENV.compile(text)
    except RuntimeError as exc:
        raise _compile_error(str(exc)) from None
    checked = _checked(expr)
    checker = _Checker(text, checked)
    checker.check(checked.expr)
    result = expr.return_type()
    if result != _T.BOOL:
        raise CelCompileError(f"a `when` must be true or false, this is {result.name().lower()}")
    references = frozenset(checker.references)
    roots = tuple(sorted({r.split(".", 1)[0] for r in references}))
    return When(text=text, references=references, _expr=expr, names=_names(roots, checker), roots=roots)


def _names(roots: tuple[str, ...], checker: _Checker) -> tuple[str, ...]:
    """`When.names`: a record or the claims whole where the expression uses them whole (`size(claims)`,
    `request.exists(...)`, a key computed at run time), else only the fields and keys it selects by name."""
    names: list[str] = []
    for root in roots:
        if root in _RECORD_FIELDS and f"{root}.*" not in checker.references:
            names += sorted(r for r in checker.references if r.startswith(f"{root}."))
        elif root == "claims" and checker.claim_keys is not None:
            names += [f"claims.{key}" for key in sorted(checker.claim_keys)]
        else:
            names.append(root)
    return tuple(names)


def _compile_error(raw: str) -> CelCompileError:
    for line in raw.splitlines():
        found = _ERROR_LINE.search(line)
        if found:
            message = found.group(3).removesuffix(" [INVALID_ARGUMENT]").replace(" (in container '')", "")
            # The parser's own nesting limit (32) reports no position (-1:-1).
            return CelCompileError(message, max(1, int(found.group(1))), max(1, int(found.group(2))))
    return CelCompileError(raw.removeprefix("INVALID_ARGUMENT: ").strip())


def _checked(expr: cel.Expression) -> checked_pb2.CheckedExpr:
    wrapped = any_pb2.Any()
    wrapped.ParseFromString(expr.serialize())
    checked = checked_pb2.CheckedExpr()
    if not wrapped.Unpack(checked):
        raise CelCompileError("the CEL runtime returned an expression this agent cannot read")
    return checked


def _children(node: syntax_pb2.Expr) -> Iterator[syntax_pb2.Expr]:
    kind = node.WhichOneof("expr_kind")
    if kind == "select_expr":
        yield node.select_expr.operand
    elif kind == "call_expr":
        if node.call_expr.HasField("target"):
            yield node.call_expr.target
        yield from node.call_expr.args
    elif kind == "list_expr":
        yield from node.list_expr.elements
    elif kind == "struct_expr":
        for entry in node.struct_expr.entries:
            if entry.HasField("map_key"):
                yield entry.map_key
            yield entry.value
    elif kind == "comprehension_expr":
        loop = node.comprehension_expr
        yield from (loop.iter_range, loop.accu_init, loop.loop_condition, loop.loop_step, loop.result)


class _Checker:
    """One walk over the checked AST: positions, field names, references and the cost rules."""

    def __init__(self, text: str, checked: checked_pb2.CheckedExpr) -> None:
        self.text = text
        self.checked = checked
        self.references: set[str] = set()
        self.claim_keys: set[str] | None = set()  # the claims it selects by literal name; None: it uses them whole
        self.nodes = 0
        self.tainted: dict[int, bool] = {}  # id -> mentions a policy variable
        self.patterns = 0
        self.loop_nodes = 0
        self.contains = 0

    def fail(self, node: syntax_pb2.Expr, message: str) -> CelCompileError:
        offset = self.checked.source_info.positions.get(node.id, 0)  # in code points, like Python's str
        before = self.text[:offset]
        line = before.count("\n") + 1
        column = offset - (before.rfind("\n") + 1) + 1
        return CelCompileError(message, line, column)

    def check(self, root: syntax_pb2.Expr) -> None:
        self.walk(root, None, depth=1, in_loop=False)

    def is_variable(self, node: syntax_pb2.Expr) -> bool:
        # Loop variables may not take a policy variable's name (see comprehension), so the name decides.
        return (
            node.WhichOneof("expr_kind") == "ident_expr"
            and node.ident_expr.name in VARIABLES
            and node.id in self.checked.reference_map
        )

    def walk(self, node: syntax_pb2.Expr, parent: syntax_pb2.Expr | None, depth: int, in_loop: bool) -> bool:
        """Check `node` and below; return whether the subtree mentions a policy variable."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(node, f"the expression is too large (more than {MAX_NODES} nodes)")
        if depth > MAX_DEPTH:
            raise self.fail(node, f"the expression nests too deeply (more than {MAX_DEPTH} levels)")
        kind = node.WhichOneof("expr_kind")
        if kind == "ident_expr":
            tainted = self.is_variable(node)
            if tainted:
                self.reference(node, parent)
            return tainted
        if kind == "comprehension_expr":
            return self.comprehension(node, depth, in_loop)
        tainted = False
        for child in _children(node):
            tainted |= self.walk(child, node, depth + 1, in_loop)
        self.tainted[node.id] = tainted
        if kind == "call_expr":
            self.call(node, in_loop)
        elif in_loop and kind in ("list_expr", "struct_expr"):
            entries = len(node.list_expr.elements) + len(node.struct_expr.entries)
            if entries > MAX_LOOP_LITERAL_ENTRIES:
                raise self.fail(
                    node, f"a literal inside all()/exists() may have at most {MAX_LOOP_LITERAL_ENTRIES} entries"
                )
        return tainted

    def comprehension(self, node: syntax_pb2.Expr, depth: int, in_loop: bool) -> bool:
        loop = node.comprehension_expr
        if in_loop:
            raise self.fail(node, "a comprehension (all, exists, ...) may not be nested inside another one")
        macro = self.macro_name(node)
        if macro not in _LOOP_MACROS:
            raise self.fail(
                node,
                f"{macro}() builds a list element by element, which costs quadratic time here; "
                "use all(), exists() or exists_one()",
            )
        if loop.iter_var in VARIABLES:
            raise self.fail(node, f"`{loop.iter_var}` is a policy variable; give the loop variable another name")
        tainted = self.walk(loop.iter_range, node, depth + 1, in_loop=False)
        before = self.nodes
        for part in (loop.accu_init, loop.loop_condition, loop.loop_step, loop.result):
            tainted |= self.walk(part, node, depth + 1, in_loop=True)
        self.loop_nodes += self.nodes - before
        if self.loop_nodes > MAX_LOOP_NODES:
            raise self.fail(
                node,
                f"the conditions of all()/exists() are too large together (more than {MAX_LOOP_NODES} nodes "
                f"with the macros' own) at {macro}()",
            )
        self.tainted[node.id] = tainted
        return tainted

    def macro_name(self, node: syntax_pb2.Expr) -> str:
        call = self.checked.source_info.macro_calls.get(node.id)
        if call is not None and call.WhichOneof("expr_kind") == "call_expr":
            return str(call.call_expr.function)
        # No macro record (this runtime keeps none): tell the kinds apart by the accumulator, a list for
        # map() and filter(), and by filter's conditional step.
        loop = node.comprehension_expr
        init = loop.accu_init
        if init.WhichOneof("expr_kind") == "list_expr":
            return "filter" if loop.loop_step.call_expr.function == "_?_:_" else "map"
        if init.const_expr.WhichOneof("constant_kind") == "bool_value":
            return "all" if init.const_expr.bool_value else "exists"
        return "exists_one"

    def reference(self, ident: syntax_pb2.Expr, parent: syntax_pb2.Expr | None) -> None:
        name = ident.ident_expr.name
        fields = _RECORD_FIELDS.get(name)
        if fields is None:
            self.references.add(name)
            if name == "claims":
                self.claim(ident, parent)
            return
        selected = self.selected_field(ident, parent)
        if selected is None:
            self.references.add(f"{name}.*")
            return
        field_name, at = selected
        if field_name not in fields:
            known = ", ".join(sorted(fields))
            raise self.fail(at, f"`{name}` has no field `{field_name}` (it has {known})")
        self.references.add(f"{name}.{field_name}")

    def claim(self, ident: syntax_pb2.Expr, parent: syntax_pb2.Expr | None) -> None:
        """Note the claim `parent` reads by a literal name (`claims.sub`, `claims["sub"]`, `has(claims.sub)`,
        `"sub" in claims`); any other use of `claims` reads them whole."""
        selected = self.selected_field(ident, parent)
        key = selected[0] if selected is not None else None
        if key is None and parent is not None and parent.WhichOneof("expr_kind") == "call_expr":
            call = parent.call_expr
            if (
                call.function == "@in"
                and len(call.args) == 2
                and call.args[1].id == ident.id
                and call.args[0].const_expr.WhichOneof("constant_kind") == "string_value"
            ):
                key = str(call.args[0].const_expr.string_value)
        if key is None:
            self.claim_keys = None
        elif self.claim_keys is not None:
            self.claim_keys.add(key)

    @staticmethod
    def selected_field(ident: syntax_pb2.Expr, parent: syntax_pb2.Expr | None) -> tuple[str, syntax_pb2.Expr] | None:
        """The field `parent` takes from `ident` by a select or a literal index, with the node to blame."""
        if parent is None:
            return None
        if parent.WhichOneof("expr_kind") == "select_expr":
            return str(parent.select_expr.field), parent
        call = parent.call_expr
        if (
            parent.WhichOneof("expr_kind") == "call_expr"
            and call.function == "_[_]"
            and len(call.args) == 2
            and call.args[0].id == ident.id
            and call.args[1].const_expr.WhichOneof("constant_kind") == "string_value"
        ):
            return str(call.args[1].const_expr.string_value), parent
        return None

    def type_kind(self, node: syntax_pb2.Expr) -> str:
        """The kind, "map", "list", "primitive" or "dyn" (unknown until evaluation) for the checked type of `node`."""
        if self.is_known_map(node):
            return "map"
        checked_type = self.checked.type_map.get(node.id)
        if checked_type is None:
            return "dyn"
        kind = checked_type.WhichOneof("type_kind")
        if kind == "map_type":
            return "map"
        if kind == "list_type":
            return "list"
        if kind in ("primitive", "well_known", "null"):
            return "primitive"
        return "dyn"

    def is_known_map(self, node: syntax_pb2.Expr) -> bool:
        """`request.headers` and `request.query` are maps though `request` is map(string, dyn)."""
        if node.WhichOneof("expr_kind") != "select_expr":
            return False
        operand = node.select_expr.operand
        return self.is_variable(operand) and (operand.ident_expr.name, node.select_expr.field) in _MAP_FIELDS

    def is_string_like(self, node: syntax_pb2.Expr) -> bool:
        checked_type = self.checked.type_map.get(node.id)
        if checked_type is None or checked_type.WhichOneof("type_kind") == "dyn":
            return True
        return checked_type.WhichOneof("type_kind") == "primitive" and checked_type.primitive in (
            checked_pb2.Type.STRING,
            checked_pb2.Type.BYTES,
        )

    def call(self, node: syntax_pb2.Expr, in_loop: bool) -> None:
        call = node.call_expr
        operands = ([call.target] if call.HasField("target") else []) + list(call.args)
        if call.function == "matches" and len(operands) == 2:
            self.pattern(operands[1])
        if call.function == "contains":
            self.contains += 1
            if self.contains > MAX_CONTAINS:
                raise self.fail(node, f"an expression may call contains() at most {MAX_CONTAINS} times")
            if len(operands) == 2:
                # A substring from the request (a header in another) costs the product of both lengths.
                needle = self.literal_string(operands[1], "the argument of contains()")
                if len(needle.encode("utf-8", "surrogatepass")) > MAX_PATTERN_BYTES:
                    raise self.fail(operands[1], f"the argument of contains() is longer than {MAX_PATTERN_BYTES} bytes")
        if call.function in _TZ_ACCESSORS and call.HasField("target") and len(call.args) == 1:
            self.zone(call.args[0])
        if in_loop:
            self.loop_cost(node, call.function, operands)

    def loop_cost(self, node: syntax_pb2.Expr, function: str, operands: list[syntax_pb2.Expr]) -> None:
        """Refuse, inside a loop step, an operation that scans loop-invariant input on every iteration."""

        def invariant(operand: syntax_pb2.Expr) -> bool:
            return self.tainted.get(operand.id, False) or self.is_variable(operand)

        costly = None
        if function == "matches":
            costly = "matches() (this runtime compiles the pattern on every call)"
        elif function == "_+_" and (self.type_kind(node) != "primitive" or self.is_string_like(node)):
            costly = "`+` building a string or list"
        elif function == "size" and len(operands) == 1 and invariant(operands[0]):
            if self.type_kind(operands[0]) not in ("map", "list") and self.is_string_like(operands[0]):
                costly = "size() of a string from a policy variable"
        elif function == "@in" and len(operands) == 2 and invariant(operands[1]):
            if self.type_kind(operands[1]) != "map":
                costly = "`in` over a list from a policy variable"
        elif function == "contains" and len(operands) == 2 and invariant(operands[0]):
            costly = "contains() on a string from a policy variable"
        elif function in ("_==_", "_!=_") and len(operands) == 2 and all(invariant(o) for o in operands):
            if any(self.type_kind(o) != "primitive" for o in operands):
                costly = "comparing two lists or maps from policy variables"
        elif (
            function in _CONVERSIONS
            and len(operands) == 1
            and invariant(operands[0])
            and self.is_string_like(operands[0])
        ):
            costly = f"{function}() of a string from a policy variable"
        if costly is not None:
            raise self.fail(
                node, f"{costly} inside all()/exists() would be repeated for every element; do it outside the loop"
            )

    def literal_string(self, node: syntax_pb2.Expr, what: str) -> str:
        if node.WhichOneof("expr_kind") != "const_expr" or node.const_expr.WhichOneof("constant_kind") != (
            "string_value"
        ):
            raise self.fail(node, f"{what} must be a string literal")
        return str(node.const_expr.string_value)

    def pattern(self, node: syntax_pb2.Expr) -> None:
        pattern = self.literal_string(node, "the pattern of matches()")
        self.patterns += 1
        if self.patterns > MAX_PATTERNS:
            raise self.fail(node, f"an expression may call matches() at most {MAX_PATTERNS} times")
        if len(pattern.encode("utf-8", "surrogatepass")) > MAX_PATTERN_BYTES:
            raise self.fail(node, f"the pattern of matches() is longer than {MAX_PATTERN_BYTES} bytes")
        repeat = _largest_repeat(pattern)
        if repeat > MAX_PATTERN_REPEAT:
            raise self.fail(
                node, f"the pattern repeats {repeat} times; at most {MAX_PATTERN_REPEAT} (use + or * for more)"
            )
        data = {"p": pattern, "s": _PATTERN_SAMPLE}
        start = time.perf_counter()
        probe = _PATTERN_PROBE.eval(data=data)
        seconds = time.perf_counter() - start
        if probe.type() != _T.BOOL:
            raise self.fail(node, f"RE2 cannot use this pattern: {_runtime_message(probe)}")
        # Unicode classes make RE2 programs huge: `\pL{16}` repeated in 200 bytes costs 0.5 s per call. No
        # static rule catches every such pattern, so time the real thing: it passes if one of three runs is
        # within the budget (noise from a busy machine only slows a run down); one far over it is final.
        for _ in range(2):
            if seconds <= MAX_PATTERN_SECONDS or seconds > 20 * MAX_PATTERN_SECONDS:
                break
            start = time.perf_counter()
            _PATTERN_PROBE.eval(data=data)
            seconds = min(seconds, time.perf_counter() - start)
        if seconds <= MAX_PATTERN_SECONDS:
            return
        raise self.fail(
            node,
            f"RE2 takes {seconds * 1e3:.1f} ms to compile and run this pattern, more than "
            f"{MAX_PATTERN_SECONDS * 1e3:g} ms; simplify it (Unicode classes such as \\pL, counted repetitions)",
        )

    def zone(self, node: syntax_pb2.Expr) -> None:
        zone = self.literal_string(node, "a time zone")
        probe = _ZONE_PROBE.eval(data={"p": zone, "t": _EPOCH})
        if probe.type() != _T.BOOL:
            raise self.fail(node, f"unknown time zone {zone!r}")


def _largest_repeat(pattern: str) -> int:
    """The largest count in the pattern's counted repetitions ({n}, {n,}, {n,m}), outside classes and escapes.

    RE2 unrolls them into its program (`[[:alpha:]]{0,1000}` takes ms to compile), and the runtime compiles
    the pattern on every call. A `{` that does not start a valid repetition is a literal in RE2; counting it
    anyway errs on the side of refusing.
    """
    largest = 0
    index = 0
    in_class = False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern.startswith("]", index + 1):
                index += 1  # a leading ] is a member, not the end
            elif pattern.startswith("^]", index + 1):
                index += 2
        elif char == "{":
            end = pattern.find("}", index)
            if end > index:
                for number in pattern[index + 1 : end].split(","):
                    if number.isascii() and number.isdigit():
                        largest = max(largest, int(number))
        index += 1
    return largest


def _runtime_message(value: cel.Value) -> str:
    text = str(value.value())
    return text.removeprefix("INVALID_ARGUMENT: ").removeprefix("invalid regular expression: ")
