"""Rate limits: the bucket arithmetic (both twins, fake clock), then 429s and quota headers through the engine."""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from tests.clock import Clock
from tests.conftest import twins
from tests.keys import SigningKey, claims, mint

MODULES = twins("agent.ratelimit._bucket_py", "_bucket")


@pytest.fixture(params=MODULES, scope="module")
def bucket(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def test_a_new_key_has_a_full_burst_then_refills_at_the_rate(bucket: Any) -> None:
    t = bucket.BucketTable(2.0, 5.0)
    assert [t.take("a", 100.0) for _ in range(5)] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert t.take("a", 100.0) == pytest.approx(-0.5)  # one token back in half a second at 2/s
    assert t.take("a", 100.25) == pytest.approx(-0.25)
    assert t.take("a", 100.5) == pytest.approx(0.0)
    assert t.take("b", 100.5) == 4.0  # keys are independent
    assert t.take("a", 1000.0) == 4.0  # never more than the burst
    assert t.full_in(4.0) == pytest.approx(0.5)


def test_a_clock_going_backwards_refills_nothing(bucket: Any) -> None:
    t = bucket.BucketTable(1.0, 1.0)
    assert t.take("a", 50.0) == 0.0
    assert t.take("a", 10.0) < 0


def test_idle_buckets_are_swept_and_the_table_is_bounded(bucket: Any) -> None:
    t = bucket.BucketTable(1.0, 2.0, max_entries=100)
    for i in range(100):
        t.take(f"k{i}", 0.0)
    assert len(t) == 100
    assert t.sweep(0.5) == 0  # half refilled: still remembered
    assert t.sweep(1.0) == 100 and len(t) == 0  # refilled: the same as absent
    for i in range(250):
        t.take(f"k{i}", 2.0)
    assert len(t) == 100  # bounded: the oldest went first
    with pytest.raises(ValueError):
        bucket.BucketTable(0.0, 1.0)


def test_a_flood_of_new_keys_stays_bounded_and_cheap(bucket: Any) -> None:
    t = bucket.BucketTable(1.0, 5.0, max_entries=10_000)
    for i in range(200_000):  # 20x the bound, none of them idle: each new key pushes out the oldest
        assert t.take(f"flood-{i}", 10.0 + i * 1e-6) == 4.0
    assert len(t) == 10_000
    assert t.take("flood-199999", 10.2) < 4.0  # the newest are the ones kept
    assert t.take("flood-0", 10.2) == 4.0  # the oldest went, and comes back full


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 1000),
    burst=st.integers(1, 50),
    steps=st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 3)), max_size=60),
)
def test_the_twins_agree_and_never_admit_more_than_rate_times_time_plus_burst(
    rate: float, burst: int, steps: list[tuple[str, float]]
) -> None:
    tables = [importlib.import_module(m).BucketTable(rate, burst) for m in MODULES]
    now = 0.0
    admitted = {"a": 0, "b": 0, "c": 0}
    for key, dt in steps:
        now += dt
        results = [t.take(key, now) for t in tables]
        assert all(r == pytest.approx(results[0]) for r in results)
        admitted[key] += results[0] >= 0
    for n in admitted.values():
        assert n <= burst + rate * now + 1e-6


ROUTES = textwrap.dedent("""\
    routes:
      - name: list-orders
        match: {methods: [GET], path: /v1/orders}
        authn: [jwt]
        allow: {scopes_all: [orders:read]}
        rate_limit: {key: subject, per_second: 2, burst: 3}
      - name: search
        match: {methods: [GET], path: /v1/search}
        authn: [jwt]
        allow: {}
        rate_limit: {key: [client_id, "header:x-tenant"], per_minute: 60, burst: 2}
      - name: health
        match: {path: /healthz}
        public: true
        rate_limit: {key: source_ip, per_second: 1}
    default: deny
    """)


@pytest.fixture
async def limited(write_policy: Callable[..., Path]) -> tuple[Engine, Clock]:
    clock = Clock()
    e = Engine.for_policy(load_policy(write_policy(ROUTES)), clock=clock)
    for s in e.stores.values():
        assert await s.refresh()
    return e, clock


def get(engine: Engine, path: str, token: str | None = None, source: str = "10.0.0.1", **headers: str) -> Decision:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if token:
        hdrs["authorization"] = f"Bearer {token}"
    d = engine.decide(RequestView("GET", path, headers=hdrs, source=source))
    assert d is not None
    return d


def test_429_with_retry_after_and_ratelimit_headers(limited: tuple[Engine, Clock], keys: dict[str, SigningKey]) -> None:
    engine, clock = limited
    alice = mint(keys["ES256"])
    allowed = [get(engine, "/v1/orders", alice) for _ in range(3)]
    assert all(d.allowed for d in allowed)
    assert [dict(d.response_headers)["ratelimit"] for d in allowed] == [
        '"list-orders";r=2;t=1',
        '"list-orders";r=1;t=1',
        '"list-orders";r=0;t=2',
    ]
    assert dict(allowed[0].response_headers)["ratelimit-policy"] == '"list-orders";q=2;w=1'
    over = get(engine, "/v1/orders", alice)
    headers = dict(over.response_headers)
    assert (over.status, over.reason, over.outcome) == (429, R.RATE_LIMITED, "deny")
    assert headers["retry-after"] == "1" and headers["ratelimit"] == '"list-orders";r=0;t=1'
    assert engine.remembered_hits >= 2  # the remembered-allow path is limited too
    bob = mint(keys["ES256"], claims(sub="bob"))
    assert get(engine, "/v1/orders", bob).allowed  # another subject, another bucket
    clock.now += 0.5
    assert get(engine, "/v1/orders", alice).allowed  # one token back at 2/s
    assert get(engine, "/v1/orders", alice).status == 429


def test_rules_refuse_before_the_limit_counts(limited: tuple[Engine, Clock], keys: dict[str, SigningKey]) -> None:
    engine, _ = limited
    no_scope = mint(keys["ES256"], claims(scope="profile"))
    for _ in range(5):
        assert get(engine, "/v1/orders", no_scope).reason == R.SCOPE_MISSING
    assert get(engine, "/v1/orders", mint(keys["ES256"], claims(scope="profile orders:read"))).allowed


def test_composite_keys_and_public_routes(limited: tuple[Engine, Clock], keys: dict[str, SigningKey]) -> None:
    engine, _ = limited
    token = mint(keys["ES256"])
    assert [get(engine, "/v1/search", token, x_tenant="acme").allowed for _ in range(3)] == [True, True, False]
    assert get(engine, "/v1/search", token, x_tenant="globex").allowed
    limited_h = get(engine, "/v1/search", token, x_tenant="acme")
    assert dict(limited_h.response_headers)["ratelimit-policy"] == '"search";q=60;w=60'
    assert get(engine, "/healthz", source="10.9.9.9").allowed
    assert get(engine, "/healthz", source="10.9.9.9").status == 429
    assert get(engine, "/healthz", source="10.9.9.8").allowed


async def test_a_reload_keeps_the_buckets_of_unchanged_limits(
    limited: tuple[Engine, Clock], keys: dict[str, SigningKey], write_policy: Callable[..., Path]
) -> None:
    engine, clock = limited
    token = mint(keys["ES256"])
    for _ in range(3):
        get(engine, "/v1/orders", token)
    changed = ROUTES.replace("per_minute: 60, burst: 2", "per_minute: 120, burst: 2")
    new = Engine(load_policy(write_policy(changed)), engine.stores, clock=clock)
    new.adopt_limits(engine)
    assert get(new, "/v1/orders", token).status == 429  # same limit: the spent bucket carried over
    assert new.limiters["search"].table is not engine.limiters["search"].table  # a changed limit starts afresh


def test_rate_limit_mistakes_are_refused_with_their_line(tmp_path: Path) -> None:
    from agent.config import load_policy_text
    from agent.errors import ConfigErrors

    text = textwrap.dedent("""\
        version: 1
        service: s
        routes:
          - name: a
            match: {path: /a}
            public: true
            rate_limit: {key: subject, per_second: 1}
          - name: b
            match: {path: /b}
            public: true
            rate_limit: {key: sauce_ip, per_second: 1, per_minute: 5}
          - name: c
            match: {path: /c}
            public: true
            rate_limit: {key: "header:X Bad", per_second: 0, burst: 0}
        """)
    with pytest.raises(ConfigErrors) as e:
        load_policy_text(text, "p.yaml")
    got = "\n".join(f"{x.line}: {x.message}" for x in e.value.errors)
    assert "7: routes[0] (a).rate_limit.key: a public route has no subject" in got
    assert "11: routes[1] (b).rate_limit.key: unknown part 'sauce_ip'; did you mean 'source_ip'?" in got
    assert "11: routes[1] (b).rate_limit: give exactly one of per_second or per_minute" in got
    assert "15: routes[2] (c).rate_limit.key: 'header:X Bad' needs a lower-case header name" in got
    assert "15: routes[2] (c).rate_limit.per_second must be a positive number" in got
