"""Signed bundles against tampering, and an agent's client against a real control plane signing with another key."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from pathlib import Path

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
from agent.controlplane.server import ControlPlane

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
