"""Route matching: properties over generated templates and paths, against a brute-force reference."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.paths import GLOB, LITERAL, PARAM, Matcher, Segment, bind, parse_template, split_request_path

WORDS = ["a", "b", "orders", "v1"]
segment_kind = st.sampled_from([LITERAL, LITERAL, PARAM])


@st.composite
def templates(draw: st.DrawFn) -> str:
    n = draw(st.integers(0, 4))
    parts = []
    for i in range(n):
        kind = draw(segment_kind)
        parts.append(draw(st.sampled_from(WORDS)) if kind == LITERAL else f"{{p{i}}}")
    if draw(st.booleans()):
        parts.append("**")
    return "/" + "/".join(parts)


paths = st.lists(st.sampled_from([*WORDS, "zz", "x y"]), max_size=6)


def reference(templates_: list[tuple[Segment, ...]], path: list[str]) -> int | None:
    """The most specific template by brute force: segment ranks compared left to right."""
    best: tuple[tuple[int, ...], int] | None = None
    for index, segs in enumerate(templates_):
        ranks: list[int] = []
        ok = True
        for i, seg in enumerate(segs):
            if seg.kind == GLOB:
                ranks += [GLOB] * (len(path) - i + 1)
                break
            if i >= len(path) or (seg.kind == LITERAL and seg.value != path[i]) or path[i] == "":
                ok = False
                break
            ranks.append(seg.kind)
        else:
            if len(segs) != len(path):
                ok = False
            ranks.append(LITERAL)  # ending exactly here beats a glob ending here
        if ok and (best is None or tuple(ranks) < best[0]):
            best = (tuple(ranks), index)
    return None if best is None else best[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(templates(), min_size=1, max_size=8, unique=True), paths, st.randoms())
def test_most_specific_wins_independent_of_order(tpls: list[str], path: list[str], rnd: random.Random) -> None:
    from agent.policy.paths import shape

    # Same-shape templates are refused by the loader; keep one of each shape.
    by_shape: dict[tuple[str, ...], str] = {}
    for t in tpls:
        by_shape.setdefault(shape(parse_template(t)), t)
    unique = list(by_shape.values())
    parsed = [parse_template(t) for t in unique]
    expected = reference(parsed, path)
    order = list(range(len(unique)))
    rnd.shuffle(order)
    m: Matcher[int] = Matcher()
    for i in order:
        m.add(parsed[i], None, i)
    assert m.match(path, "GET") == expected


@settings(max_examples=200, deadline=None)
@given(templates(), st.lists(st.sampled_from(["x", "y1", "tenant-7"]), min_size=6, max_size=6))
def test_a_path_made_from_a_template_matches_it_and_binds_its_params(tpl: str, values: list[str]) -> None:
    segs = parse_template(tpl)
    path: list[str] = []
    for i, s in enumerate(segs):
        if s.kind == LITERAL:
            path.append(s.value)
        elif s.kind == PARAM:
            path.append(values[i])
        else:
            path += values[: i % 3]
    m: Matcher[str] = Matcher()
    m.add(segs, frozenset({"GET"}), tpl)
    assert m.match(path, "GET") == tpl
    assert m.match(path, "DELETE") is None
    for i, s in enumerate(segs):
        if s.kind == PARAM:
            assert bind(segs, path)[s.value] == values[i]


def test_explicit_methods_beat_any_method_on_the_same_shape() -> None:
    m: Matcher[str] = Matcher()
    m.add(parse_template("/v1/orders"), None, "any")
    m.add(parse_template("/v1/orders"), frozenset({"POST"}), "post")
    assert m.match(["v1", "orders"], "POST") == "post"
    assert m.match(["v1", "orders"], "GET") == "any"


def test_method_mismatch_falls_back_to_a_less_specific_route() -> None:
    m: Matcher[str] = Matcher()
    m.add(parse_template("/v1/orders"), frozenset({"GET"}), "literal")
    m.add(parse_template("/v1/{x}"), frozenset({"POST"}), "param")
    assert m.match(["v1", "orders"], "POST") == "param"


def test_param_never_matches_an_empty_segment() -> None:
    m: Matcher[str] = Matcher()
    m.add(parse_template("/v1/{id}"), None, "param")
    assert m.match(["v1", ""], "GET") is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("/", []),
        ("/v1/orders?x=1#f", ["v1", "orders"]),
        ("/v1/caf%C3%A9", ["v1", "café"]),
        ("/v1/orders/", ["v1", "orders", ""]),
    ],
)
def test_request_paths_are_split_and_decoded(raw: str, expected: list[str]) -> None:
    assert split_request_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "v1",
        "/v1//orders",
        "/v1/../admin",
        "/v1/./x",
        "/v1/%2e%2e/admin",
        "/a%2Fb",
        "/a%5Cb",
        "/a\\b",
        "/a%zz",
        "/a%C3",
        "/a%00b",
        "/a%0a",
        "/" + "x/" * 70,
    ],
)
def test_paths_not_in_normal_form_are_refused(raw: str) -> None:
    assert split_request_path(raw) is None


@pytest.mark.parametrize(
    "bad", ["v1", "/v1//x", "/v1/", "/**/x", "/a/{x}/{x}", "/a{x}", "/a/*", "/a/..", "/a/{1x}", "/a/%2F"]
)
def test_bad_templates_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_template(bad)
