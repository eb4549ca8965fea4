"""Signed bundles against tampering, and an agent's client against a real control plane signing with another key."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import Policy
from agent.controlplane.bundle import (
    BundleError,
    Revocations,
    parse_policy,
    parse_revocations,
    policy_payload,
    revocations_payload,
    sign,
    verified_payload,
)
from agent.controlplane.client import STATE_FILE, PolicyClient
from agent.controlplane.server import ControlPlane, Publisher
from tests.wait import until_async

POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    routes:
      - {name: health, match: {path: /healthz}, public: true}
    """)


def test_tampered_unsigned_foreign_and_misdirected_bundles_are_refused() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = sign(policy_payload("orders", "orders@abc", POLICY, 1), key)
    assert parse_policy(verified_payload(good, [key.public_key()]), "orders").policy_yaml == POLICY
    tampered = type(good)(payload=good.payload.replace(b"healthz", b"healthy"), signature=good.signature)
    unsigned = type(good)(payload=good.payload)
    foreign = sign(good.payload, other)
    for bundle in (tampered, unsigned, foreign):
        with pytest.raises(BundleError):
            verified_payload(bundle, [key.public_key()])
    assert verified_payload(foreign, [key.public_key(), other.public_key()])  # rotation: either key
    with pytest.raises(BundleError, match="this agent enforces 'billing'"):
        parse_policy(verified_payload(good, [key.public_key()]), "billing")
    r = Revocations(3, frozenset({"j1"}), (("https://idp", "mallory", 1700000000),))
    assert parse_revocations(revocations_payload(r)) == r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_bundle_signed_by_an_unknown_key_is_refused_and_reported(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), f"127.0.0.1:{free_port()}", None)
    await cp.start()
    installed: list[Policy] = []

    async def install(policy: Policy, source: str) -> str | None:
        installed.append(policy)
        return None

    trusted = Ed25519PrivateKey.generate().public_key()  # not the control plane's key
    client = PolicyClient(cp.listen, "orders", tmp_path / "state", [trusted], install, lambda r: None)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    try:
        for _ in range(100):
            agents = cp.publisher.status()["agents"]
            if agents and agents[0]["error"]:
                break
            await asyncio.sleep(0.05)
        assert installed == [] and client.version == ""
        assert "does not verify" in cp.publisher.status()["agents"][0]["error"]
        assert not (tmp_path / "state" / STATE_FILE).exists()
    finally:
        stop.set()
        await task
        await cp.stop()


async def test_a_tampered_state_file_is_not_served(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    bundle = sign(policy_payload("orders", "x", POLICY, 1), key)
    state = tmp_path / "state"
    state.mkdir()
    saved = {"bundle": {"payload": bundle.payload.replace(b"healthz", b"admin"), "signature": bundle.signature}}
    (state / STATE_FILE).write_bytes(msgpack.packb(saved, use_bin_type=True))

    async def install(policy: Policy, source: str) -> str | None:
        raise AssertionError("a tampered bundle must not be installed")

    client = PolicyClient("127.0.0.1:1", "orders", state, [key.public_key()], install, lambda r: None)
    assert await client.load_last_good() is False
    assert "does not verify" in (client.last_error or "")


async def test_revocations_reach_a_replica_cut_off_from_the_control_plane_through_redis(tmp_path: Path) -> None:
    from agent.ratelimit.shared import SharedState
    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "orders.yaml").write_text(POLICY)
    key = Ed25519PrivateKey.generate()
    cp = ControlPlane(policies, key, f"127.0.0.1:{free_port()}", None, poll_s=0.1)
    await cp.start()

    async def install(policy: Policy, source: str) -> str | None:
        return None

    applied: dict[str, list[Revocations]] = {"a": [], "b": []}
    states = [SharedState(redis.url, 0.2, "authz:orders:") for _ in range(2)]
    a = PolicyClient(cp.listen, "orders", tmp_path / "a", [key.public_key()], install, applied["a"].append,
                     lambda: states[0])  # fmt: skip
    # b's control plane is unreachable: only Redis can tell it about revocations.
    b = PolicyClient(f"127.0.0.1:{free_port()}", "orders", tmp_path / "b", [key.public_key()], install,
                     applied["b"].append, lambda: states[1])  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(a.run(stop)), loop.create_task(b.run(stop)), loop.create_task(b.watch_shared(stop))]
    try:
        (policies / "revocations.yaml").write_text("jti: [stolen-1]\n")
        for _ in range(200):
            if applied["b"]:
                break
            await asyncio.sleep(0.05)
        assert applied["a"] and applied["b"] and applied["b"][-1].jti == {"stolen-1"}
        assert not b.connected
        # A list in Redis that the control plane did not sign is refused.
        forged = sign(revocations_payload(Revocations(99, frozenset({"everyone"}))), Ed25519PrivateKey.generate())
        await states[0].put_revocations(99, forged.SerializeToString())
        await asyncio.sleep(0.5)
        assert b.revocations_seq == applied["b"][-1].sequence and applied["b"][-1].jti == {"stolen-1"}
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await cp.stop()
        for s in states:
            await s.close()
        redis.stop()


# -- SERVICE.test.yaml: the control plane runs a policy's tests before it publishes it ----------------------------

TESTED = textwrap.dedent("""\
    version: 1
    service: orders
    identity_providers:
      corp:
        issuer: https://idp.example.test
        jwks_uri: https://idp.example.test/jwks
        audiences: [orders-api]
        algorithms: [ES256]
    routes:
      - name: list-orders
        match: {{methods: [GET], path: /v1/orders}}
        authn: [jwt]
        allow: {{scopes_all: [{scope}]}}
      - {{name: health, match: {{path: /healthz}}, public: true}}
    default: deny
    """)  # the key source points nowhere: the tests' runner never fetches keys

CASES = textwrap.dedent("""\
    policy: {policy}
    cases:
      - name: a {scope} token lists orders
        request: {{method: GET, path: /v1/orders}}
        token: {{claims: {{sub: alice, scope: "{scope}"}}}}
        expect: {{status: 200, route: list-orders}}
      - name: no token
        request: {{method: GET, path: /v1/orders}}
        expect: {{status: 401}}
      - name: health is public
        request: {{path: /healthz}}
        expect: {{status: 200}}
    """)


def replace(path: Path, text: str) -> None:
    """Write as an operator's deploy does (a temporary file renamed over the old one): never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_orders(policies: Path, scope: str = "orders:read", tests_scope: str | None = "orders:read") -> None:
    replace(policies / "orders.yaml", TESTED.format(scope=scope))
    if tests_scope is not None:
        replace(policies / "orders.test.yaml", CASES.format(policy="orders.yaml", scope=tests_scope))


def no_credentials(*texts: str) -> None:
    for text in texts:
        assert "eyJ" not in text and "Bearer " not in text


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    return d


async def test_passing_tests_publish_and_their_results_are_in_status(policies: Path) -> None:
    write_orders(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    orders = pub.status()["services"]["orders"]
    assert orders["error"] is None and orders["sequence"] == 1
    tests = orders["tests"]
    assert tests["file"] == str(policies / "orders.test.yaml") and tests["version"] == orders["version"]
    assert (tests["passed"], tests["failed"], tests["failures"], tests["errors"]) == (3, 0, [], [])


async def test_failing_tests_block_the_publish_and_the_agent_keeps_the_last_good_bundle(
    policies: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_orders(policies)
    key = Ed25519PrivateKey.generate()
    cp = ControlPlane(policies, key, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", poll_s=0.05)
    await cp.start()
    installed: list[str] = []

    async def install(policy: Policy, source: str) -> str | None:
        installed.append(policy.version)
        return None

    client = PolicyClient(cp.listen, "orders", tmp_path / "state", [key.public_key()], install, lambda r: None)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    try:
        await until_async(lambda: "orders" in cp.publisher.published, "the tested policy published")
        good = cp.publisher.published["orders"].version
        await until_async(lambda: client.version == good, "the agent enforces the tested policy")
        # A change that locks readers out: its own tests say so, and it is not published.
        write_orders(policies, scope="orders:admin")
        await until_async(lambda: cp.publisher.errors.get("orders"), "the failing tests reported")
        status = await admin_status(cp)
        orders = status["services"]["orders"]
        assert orders["version"] == good and orders["sequence"] == 1
        tests = orders["tests"]
        assert tests["version"] != good and (tests["passed"], tests["failed"]) == (2, 1)
        assert tests["failures"] == [
            {"name": "a orders:read token lists orders", "line": 3, "problems": ["status: expected 200, got 403"]}
        ]
        assert "not published, the last good bundle stays" in orders["error"]
        assert "1 of 3 tests failed: 'a orders:read token lists orders'" in orders["error"]
        assert "status: expected 200, got 403" in orders["error"]
        assert any(
            r.levelname == "ERROR"
            and "the last good bundle stays" in r.getMessage()
            and "orders.test.yaml" in r.getMessage()
            and "a orders:read token lists orders" in r.getMessage()
            for r in caplog.records
        )
        no_credentials(json.dumps(status), caplog.text)
        assert client.version == good and installed == [good]
        # Fixing the policy publishes it, and the agent takes it.
        replace(policies / "orders.yaml", TESTED.format(scope="orders:read") + "# readers are back\n")
        await until_async(lambda: "orders" not in cp.publisher.errors, "the fixed policy passes its tests")
        fixed = cp.publisher.published["orders"]
        assert fixed.version not in (good, tests["version"]) and fixed.sequence == 2
        await until_async(lambda: client.version == fixed.version, "the agent enforces the fixed policy")
        assert installed == [good, fixed.version]
    finally:
        stop.set()
        await task
        await cp.stop()


async def admin_status(cp: ControlPlane) -> dict[str, Any]:
    """/status as an operator reads it: over HTTP from the admin port."""
    assert cp.admin_listen is not None
    async with aiohttp.ClientSession() as session, session.get(f"http://{cp.admin_listen}/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def test_fixing_the_test_publishes(policies: Path) -> None:
    write_orders(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    good = pub.published["orders"].version
    # A deliberate change (readers become writers) whose tests were not updated yet: refused.
    write_orders(policies, scope="orders:write", tests_scope=None)
    await pub.scan()
    assert pub.published["orders"].version == good and pub.status()["services"]["orders"]["tests"]["failed"] == 1
    # The tests catch up with the change: the same policy file now passes and is published.
    write_orders(policies, scope="orders:write", tests_scope="orders:write")
    await pub.scan()
    orders = pub.status()["services"]["orders"]
    assert orders["error"] is None and orders["version"] != good and orders["sequence"] == 2
    assert (orders["tests"]["passed"], orders["tests"]["failed"]) == (3, 0)


async def test_an_invalid_test_file_blocks_the_publish_with_file_and_line(policies: Path) -> None:
    replace(policies / "orders.yaml", TESTED.format(scope="orders:read"))
    bad = CASES.format(policy="orders.yaml", scope="orders:read").replace(
        "expect: {status: 401}", "expect: {stat: 401}"
    )
    replace(policies / "orders.test.yaml", bad)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    status = pub.status()
    assert "orders" not in status["services"] and pub.published == {}
    refused = status["refused"]["orders"]
    assert refused["tests"]["errors"] and refused["tests"]["passed"] == 0
    assert all(e.startswith(f"{policies / 'orders.test.yaml'}:") for e in refused["tests"]["errors"])
    assert f"{policies / 'orders.test.yaml'}:9:" in refused["error"]
    assert "orders.test.yaml could not be run" in refused["error"]
    # Fixed, it publishes.
    replace(policies / "orders.test.yaml", CASES.format(policy="orders.yaml", scope="orders:read"))
    await pub.scan()
    assert pub.status()["services"]["orders"]["error"] is None and "orders" not in pub.status()["refused"]


async def test_a_test_file_is_never_read_as_a_policy(policies: Path) -> None:
    write_orders(policies)
    replace(policies / "billing.test.yaml", CASES.format(policy="billing.yaml", scope="billing:read"))
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    status = pub.status()
    assert set(status["services"]) == {"orders"} and set(pub.errors) == {"billing"}
    # A test file without its policy: shown, nothing else.
    assert status["refused"] == {
        "billing": {
            "error": f"{policies / 'billing.test.yaml'}: there is no policy billing.yaml beside it to test",
            "tests": None,
        }
    }
    assert not any("orders.test" in k or "billing.test" in k for k in (*status["services"], *status["refused"]))


async def test_a_test_file_of_another_policy_is_refused(policies: Path) -> None:
    write_orders(policies, tests_scope=None)
    replace(policies / "billing.yaml", POLICY.replace("service: orders", "service: billing"))
    # orders.test.yaml that tests billing.yaml: it says nothing about orders.yaml, so orders is not published.
    replace(policies / "orders.test.yaml", CASES.format(policy="billing.yaml", scope="orders:read"))
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    status = pub.status()
    assert set(status["services"]) == {"billing"}
    refused = status["refused"]["orders"]
    assert "billing.yaml" in refused["error"] and refused["tests"]["errors"]


async def test_removing_the_test_file_publishes_without_tests(policies: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_orders(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    write_orders(policies, scope="orders:admin", tests_scope=None)
    await pub.scan()
    assert pub.published["orders"].sequence == 1 and pub.errors.get("orders")
    (policies / "orders.test.yaml").unlink()
    await pub.scan()
    orders = pub.status()["services"]["orders"]
    assert orders["sequence"] == 2 and orders["error"] is None and orders["tests"] is None
    assert "orders.test.yaml was removed: orders publishes without tests from now on" in caplog.text


async def test_a_failing_case_about_a_forwarded_token_shows_no_token(
    policies: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = TESTED.format(scope="orders:read").replace("authn: [jwt]", "authn: [jwt]\n    forward_token: true")
    replace(policies / "orders.yaml", policy)
    cases = CASES.format(policy="orders.yaml", scope="orders:read").replace(
        "expect: {status: 200, route: list-orders}",
        'expect: {status: 200, upstream_headers: {authorization: "Bearer not-the-token"}}',
    )
    replace(policies / "orders.test.yaml", cases)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    refused = pub.status()["refused"]["orders"]
    assert refused["tests"]["failed"] == 1 and "authorization" in refused["error"]
    no_credentials(json.dumps(pub.status()), caplog.text)


# -- no file can stop the control plane, and no test run holds up revocations or other services --------------------

SLOW_POLICY = textwrap.dedent("""\
    version: 1
    service: orders
    identity_providers:
      corp:
        issuer: https://idp.example.test
        jwks_uri: https://idp.example.test/jwks
        audiences: [orders-api]
        algorithms: [ES256]
    routes:
      - name: create-order
        match: {methods: [POST], path: /v1/orders}
        authn: [jwt]
        bind: dpop
        allow: {}
    default: deny
    """)


async def test_a_test_file_cannot_forge_a_line_of_the_log(policies: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A case name with a line break, in a failing case or in an error about the file, is escaped in the log and
    /status, as `policy test` prints it: SERVICE.test.yaml comes from many teams, the log is the operator's."""
    forged = '"x\\n2026-12-01 10:00:00,000 INFO agent.controlplane: orders published"'
    replace(policies / "orders.yaml", TESTED.format(scope="orders:admin"))
    cases = CASES.format(policy="orders.yaml", scope="orders:read")
    failing = cases.replace("- name: a orders:read token lists orders", f"- name: {forged}")
    replace(policies / "orders.test.yaml", failing)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    assert pub.tests["orders"].failures[0][0] == "x\\n2026-12-01 10:00:00,000 INFO agent.controlplane: orders published"
    invalid = cases.replace("- name: no token", f"- name: {forged}").replace("expect: {status: 401}", "expect: {}")
    replace(policies / "orders.test.yaml", invalid)
    await pub.scan()
    assert any("x\\n2026-12-01" in e for e in pub.tests["orders"].errors)
    logged = [r.getMessage() for r in caplog.records if r.name == "agent.controlplane"]
    assert len([m for m in logged if "x\\n2026-12-01" in m]) == 2
    assert not [line for m in logged for line in m.splitlines() if line.startswith("2026-12-01")]


def write_slow_orders(policies: Path, cases: int = 60) -> None:
    """orders with a test file that takes long (about 0.2 s a case here: 1,000 requests with fresh DPoP proofs)."""
    replace(policies / "orders.yaml", SLOW_POLICY)
    slow = "".join(
        f"  - name: c{i}\n    request: {{method: POST, path: /v1/orders}}\n"
        f"    token: {{claims: {{sub: c}}, dpop: true}}\n    repeat: 1000\n    expect: {{status: 200}}\n"
        for i in range(cases)
    )
    replace(policies / "orders.test.yaml", "policy: orders.yaml\ncases:\n" + slow)


def write_billing(policies: Path, route: str = "health") -> None:
    billing = POLICY.replace("service: orders", "service: billing").replace("health,", f"{route},")
    replace(policies / "billing.yaml", billing)


DEEP = "[" * 3000 + "]" * 3000  # past Python's recursion limit, as PyYAML composes it


async def test_a_policy_nested_too_deep_is_refused_at_its_line_and_the_poll_goes_on(policies: Path) -> None:
    write_billing(policies)
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), f"127.0.0.1:{free_port()}", None, poll_s=0.05)
    await cp.start()
    pub = cp.publisher
    try:
        await until_async(lambda: "billing" in pub.published, "billing published")
        replace(policies / "evil.yaml", "version: 1\nservice: evil\nroutes: " + DEEP + "\n")
        await until_async(lambda: "evil" in pub.errors, "the deep policy refused", timeout=5)
        assert pub.errors["evil"] == f"{policies / 'evil.yaml'}:3: nested more than 64 levels deep"
        # The poll goes on: a revocation and another service's change still get out.
        replace(policies / "revocations.yaml", "jti: [stolen]\n")
        write_billing(policies, route="healthz")
        await until_async(lambda: pub.revocations.sequence == 1, "the revocation published", timeout=5)
        await until_async(lambda: pub.published["billing"].sequence == 2, "billing's change published", timeout=5)
        assert pub.status()["refused"]["evil"]["error"] == pub.errors["evil"]
    finally:
        await cp.stop()


async def test_revocations_nested_too_deep_are_refused_and_the_fixed_list_gets_out(policies: Path) -> None:
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    replace(policies / "revocations.yaml", "jti:\n  - " + DEEP + "\n")
    await pub.scan()
    assert pub.revocations_error == f"{policies / 'revocations.yaml'}:2: nested more than 64 levels deep"
    replace(policies / "revocations.yaml", "jti: [stolen]\n")
    await pub.scan()
    assert (pub.revocations.sequence, pub.revocations.jti, pub.revocations_error) == (1, {"stolen"}, "")


async def test_a_file_over_the_policy_size_bound_is_refused_as_policy_lint_refuses_it(policies: Path) -> None:
    """`policy lint` and `run --policy` refuse a policy over 8 MiB; the control plane read any size into memory,
    and would publish to agents what `policy lint` refuses. The revocations file has the same bound."""
    padding = "#" * (8 << 20) + "\n"
    write_billing(policies)
    replace(policies / "revocations.yaml", "jti: [stolen]\n")
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    good = pub.published["billing"].version
    replace(policies / "billing.yaml", (policies / "billing.yaml").read_text() + padding)
    replace(policies / "revocations.yaml", "jti: [stolen, another]\n" + padding)
    await pub.scan()
    assert pub.published["billing"].version == good
    assert pub.errors["billing"] == f"{policies / 'billing.yaml'}: cannot read the policy: larger than {8 << 20} bytes"
    assert pub.revocations.jti == {"stolen"}
    assert (
        pub.revocations_error
        == f"{policies / 'revocations.yaml'}: cannot read the revocations: larger than {8 << 20} bytes"
    )


async def test_a_revocation_list_naming_a_key_twice_is_refused(policies: Path) -> None:
    """PyYAML keeps the last of two `jti:` lists: the first list's tokens would silently be let in again."""
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    replace(policies / "revocations.yaml", "jti: [a]\n")
    await pub.scan()
    replace(policies / "revocations.yaml", "jti: [a]\nsubjects: []\njti: [b]\n")
    await pub.scan()
    assert pub.revocations.jti == {"a"} and "revocations.yaml:3: duplicate key 'jti'" in pub.revocations_error
    replace(policies / "revocations.yaml", "# nothing revoked\n")  # empty: nothing revoked, as before
    await pub.scan()
    assert (pub.revocations.sequence, pub.revocations.jti, pub.revocations_error) == (2, frozenset(), "")


async def test_a_revocation_is_not_held_behind_a_running_test(policies: Path) -> None:
    write_slow_orders(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    first = asyncio.get_running_loop().create_task(pub.scan())  # 60,000 requests with fresh proofs: seconds
    try:
        await until_async(lambda: pub.status()["validating"] == ["orders"], "the orders tests running")
        replace(policies / "revocations.yaml", "jti: [stolen-token]\n")
        write_billing(policies)
        pub.poll()  # the next poll, as ControlPlane._poll makes it
        assert pub.revocations.sequence == 1  # read by the poll itself
        await until_async(lambda: "billing" in pub.published or first.done(), "billing or the orders tests")
        assert not first.done() and pub.status()["validating"] == ["orders"], "billing waited for orders' tests"
    finally:
        started = time.monotonic()
        await pub.close()  # the run stops before its next case
        closed = time.monotonic() - started
        await first
    assert closed < 5 and "orders" not in pub.published and "orders" not in pub.tests


async def test_the_control_plane_serves_before_a_slow_test_file_is_done(policies: Path, tmp_path: Path) -> None:
    write_slow_orders(policies)
    replace(policies / "revocations.yaml", "jti: [stolen-token]\n")
    key = Ed25519PrivateKey.generate()
    cp = ControlPlane(policies, key, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", poll_s=0.05)
    started = time.monotonic()
    await cp.start()
    assert time.monotonic() - started < 2

    async def install(policy: Policy, source: str) -> str | None:
        raise AssertionError("orders is still being tested: nothing to install")

    revoked: list[Revocations] = []
    client = PolicyClient(cp.listen, "orders", tmp_path / "state", [key.public_key()], install, revoked.append)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(client.run(stop))
    try:
        await until_async(lambda: revoked, "the agent holds the revocations")
        status = await admin_status(cp)
        assert status["validating"] == ["orders"] and status["services"] == {} and revoked[-1].jti == {"stolen-token"}
    finally:
        stop.set()
        await task
        started = time.monotonic()
        await cp.stop()
    assert time.monotonic() - started < 5, "stopping waited for the test file"


async def test_a_test_file_over_its_budget_blocks_its_own_publish(policies: Path) -> None:
    write_slow_orders(policies)
    write_billing(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate(), test_budget_s=0.3)
    await pub.scan()
    assert set(pub.published) == {"billing"}
    refused = pub.status()["refused"]["orders"]
    assert "orders.test.yaml could not be run" in refused["error"] and "took longer than 0.3 s" in refused["error"]
    assert refused["tests"]["errors"] and refused["tests"]["passed"] == 0


async def test_an_unforeseen_error_refuses_only_its_service_with_its_type(
    policies: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No file raises one any more; a loader bug is simulated: it must not escape to the poll."""
    from agent.controlplane import server

    real = server.load_policy_text

    def buggy(text: str, file: str = "<policy>", base_dir: Path | None = None, stand_ins: bool = False) -> Policy:
        if file.endswith("evil.yaml"):
            raise RecursionError("maximum recursion depth exceeded")
        return real(text, file, base_dir, stand_ins)

    monkeypatch.setattr(server, "load_policy_text", buggy)
    write_billing(policies)
    replace(policies / "evil.yaml", POLICY.replace("service: orders", "service: evil"))
    replace(policies / "revocations.yaml", "jti: [stolen]\n")
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    assert set(pub.published) == {"billing"} and pub.revocations.sequence == 1
    error = pub.status()["refused"]["evil"]["error"]
    assert error.startswith(f"{policies / 'evil.yaml'}: not published, the last good bundle stays")
    assert "(RecursionError: maximum recursion depth exceeded)" in error
    assert "Traceback" in caplog.text and "validating evil failed" in caplog.text


async def test_the_poll_goes_on_after_an_error(
    policies: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_billing(policies)
    cp = ControlPlane(policies, Ed25519PrivateKey.generate(), f"127.0.0.1:{free_port()}", None, poll_s=0.05)
    await cp.start()
    real, failures = cp.publisher.poll, [OSError("simulated: the directory could not be listed")]

    def poll_failing_once() -> None:
        if failures:
            raise failures.pop()
        real()

    monkeypatch.setattr(cp.publisher, "poll", poll_failing_once)
    try:
        await until_async(lambda: not failures, "the failing poll")
        replace(policies / "revocations.yaml", "jti: [stolen]\n")
        await until_async(lambda: cp.publisher.revocations.sequence == 1, "the next poll", timeout=5)
        assert "the next poll tries again" in caplog.text
    finally:
        await cp.stop()


async def test_require_tests_publishes_only_a_tested_policy(policies: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_orders(policies, tests_scope=None)
    replace(policies / "orders.test.yml", CASES.format(policy="orders.yaml", scope="orders:read"))  # misnamed
    pub = Publisher(policies, Ed25519PrivateKey.generate(), require_tests=True)
    await pub.scan()
    status = pub.status()
    assert status["services"] == {} and status["settings"]["require_tests"] is True
    error = status["refused"]["orders"]["error"]
    assert "not published (no version of orders was published yet): no tests" in error
    assert "(orders.test.yml is not read as its tests: rename it orders.test.yaml)" in error
    assert status["misnamed"] == {
        "orders.test.yml": "not read (the control plane reads *.yaml): probably meant orders.test.yaml"
    }
    assert "orders.test.yml is not read (the control plane reads *.yaml): probably meant orders.test.yaml" in (
        caplog.text
    )
    (policies / "orders.test.yml").rename(policies / "orders.test.yaml")
    await pub.scan()
    status = pub.status()
    assert status["services"]["orders"]["tests"]["passed"] == 3 and status["misnamed"] == {}
    # Its tests removed, the published version stays and the service says why nothing new gets out.
    (policies / "orders.test.yaml").unlink()
    write_orders(policies, scope="orders:write", tests_scope=None)
    await pub.scan()
    orders = pub.status()["services"]["orders"]
    assert orders["sequence"] == 1 and "no tests" in orders["error"]
    assert "orders.test.yaml was removed: orders is not published from now on" in caplog.text


async def test_require_tests_a_removed_test_file_is_said_as_such(policies: Path) -> None:
    """The published policy's tests removed: it is untested now, not failing them."""
    write_orders(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate(), require_tests=True)
    await pub.scan()
    version = pub.published["orders"].version
    (policies / "orders.test.yaml").unlink()
    await pub.scan()
    assert pub.errors["orders"].startswith(f"{version} is published and no longer tested (nothing new is published): "
                                           "no tests: with --require-tests")  # fmt: skip
    assert "fails" not in pub.errors["orders"]


async def test_without_require_tests_an_untested_policy_publishes_and_a_misnamed_test_file_is_shown(
    policies: Path,
) -> None:
    write_orders(policies, tests_scope=None)
    replace(policies / "orders.test.yml", CASES.format(policy="orders.yaml", scope="orders:read"))
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    status = pub.status()
    assert status["services"]["orders"]["error"] is None and status["services"]["orders"]["tests"] is None
    assert list(status["misnamed"]) == ["orders.test.yml"]


@pytest.mark.parametrize("name", ["orders.tests.yaml", "orders_test.yaml", "orders-tests.yaml"])
async def test_a_test_file_named_like_a_policy_is_refused_with_the_name_it_was_meant_to_have(
    policies: Path, name: str
) -> None:
    write_orders(policies, tests_scope=None)
    replace(policies / name, CASES.format(policy="orders.yaml", scope="orders:read"))
    replace(policies / "load-test.yaml", POLICY.replace("service: orders", "service: load-test"))  # a real service
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await pub.scan()
    status = pub.status()
    assert set(status["services"]) == {"orders", "load-test"}
    service = name.removesuffix(".yaml")
    error = status["refused"][service]["error"]
    assert error.startswith(f"{policies / name}:1: policy: unknown key")
    assert error.endswith(f"{name} was read as the policy of service {service!r}: "
                          "if it holds the tests of orders, name it orders.test.yaml")  # fmt: skip
    assert status["misnamed"] == {name: "read as a policy and refused: probably meant orders.test.yaml"}


async def test_a_fifo_named_like_a_policy_holds_up_nothing(policies: Path) -> None:
    """Read, a FIFO blocks its reader for ever (before, the event loop itself: no agent was served)."""
    os.mkfifo(policies / "evil.yaml")
    write_billing(policies)
    pub = Publisher(policies, Ed25519PrivateKey.generate())
    await asyncio.wait_for(pub.scan(), 10)
    assert set(pub.published) == {"billing"} and pub.errors == {}
