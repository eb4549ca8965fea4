"""Two replicas' engines sharing one real Redis: shared quotas, replay caches across replicas, Redis outages."""

from __future__ import annotations

import base64
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import reasons as R
from agent.config import load_policy
from agent.decision import Decision, RequestView
from agent.engine import Engine
from agent.ratelimit.shared import SharedState
from tests.keys import SigningKey, claims, dpop_proof, jkt, make_key, mint
from tests.redis_server import RedisServer

HOST = "api.example.test"
HMAC_KEY = b"s" * 32


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def routes(url: str) -> str:
    return textwrap.dedent(f"""\
        shared_state: {{redis: "{url}", timeout_ms: 200}}
        hmac_clients:
          billing: {{key_file: billing.key, roles: [billing]}}
        routes:
          - name: quota
            match: {{methods: [GET], path: /v1/quota}}
            authn: [jwt]
            allow: {{}}
            rate_limit: {{key: subject, per_minute: 10, burst: 10, shared: true}}
          - name: local
            match: {{methods: [GET], path: /v1/local}}
            authn: [jwt]
            allow: {{}}
            rate_limit: {{key: subject, per_minute: 10, burst: 10}}
          - name: orders
            match: {{methods: [GET], path: /v1/orders}}
            authn: [jwt]
            allow: {{}}
          - name: billing
            match: {{methods: [POST], path: /v1/billing}}
            authn: [hmac]
            allow: {{}}
        default: deny
        """)


class Replica:
    def __init__(self, engine: Engine, state: SharedState) -> None:
        self.engine, self.state = engine, state
        self.alerts: list[tuple[str, dict[str, Any]]] = []

    async def check(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Decision:
        view = RequestView(method, path, HOST, headers, source="10.0.0.1", scheme="https", body=body)
        return await self.engine.check(view)


@pytest.fixture
async def replicas(
    redis_server: RedisServer, write_policy: Callable[..., Path], tmp_path: Path
) -> AsyncIterator[list[Replica]]:
    (tmp_path / "billing.key").write_text(base64.b64encode(HMAC_KEY).decode())
    policy = load_policy(write_policy(routes(redis_server.url)))
    made: list[Replica] = []
    for _ in range(2):
        alerts: list[tuple[str, dict[str, Any]]] = []
        state = SharedState(redis_server.url, 0.2, "authz:test:", alert=lambda k, d, a=alerts: a.append((k, d)))
        engine = Engine.for_policy(policy, shared=state)
        for s in engine.stores.values():
            assert await s.refresh()
        r = Replica(engine, state)
        r.alerts = alerts
        made.append(r)
    yield made
    for r in made:
        await r.state.close()


async def test_a_shared_quota_holds_across_replicas(replicas: list[Replica], keys: dict[str, SigningKey]) -> None:
    a, b = replicas
    bearer = {"authorization": f"Bearer {mint(keys['ES256'], claims(sub='carol'))}"}
    statuses = [(await (a if i % 2 else b).check("GET", "/v1/quota", bearer)).status for i in range(30)]
    allowed = statuses.count(200)
    # 10 a minute, burst 10: ten pass, plus at most one lease (batch 1) per replica in flight.
    assert 10 <= allowed <= 12, statuses
    assert statuses[-1] == 429
    # The same limit kept per replica (not shared) lets each replica admit its own ten.
    local = [(await (a if i % 2 else b).check("GET", "/v1/local", bearer)).status for i in range(30)]
    assert local.count(200) == 20


async def test_a_proof_replayed_to_another_replica_is_refused(
    replicas: list[Replica], keys: dict[str, SigningKey]
) -> None:
    a, b = replicas
    client = make_key("ES256", "client")
    token = mint(keys["ES256"], claims(cnf={"jkt": jkt(client)}))
    headers = {"authorization": f"DPoP {token}", "dpop": dpop_proof(client, "GET", f"https://{HOST}/v1/orders", token)}
    assert (await a.check("GET", "/v1/orders", headers)).allowed
    replay = await b.check("GET", "/v1/orders", headers)
    assert (replay.status, replay.reason) == (401, R.DPOP_PROOF_REPLAYED)


async def test_a_signature_replayed_to_another_replica_is_refused(replicas: list[Replica]) -> None:
    from agent.demo.client import sign_request

    a, b = replicas
    body = b'{"n": 1}'
    headers = sign_request("POST", f"https://{HOST}/v1/billing", body, HMAC_KEY, "billing")
    headers["content-length"] = str(len(body))
    assert (await a.check("POST", "/v1/billing", headers, body)).allowed
    replay = await b.check("POST", "/v1/billing", headers, body)
    assert (replay.status, replay.reason) == (401, R.SIGNATURE_REPLAYED)


async def test_redis_down_valid_requests_still_pass_then_shared_state_resumes(
    replicas: list[Replica], redis_server: RedisServer, keys: dict[str, SigningKey]
) -> None:
    a, b = replicas
    client = make_key("ES256", "client")
    token = mint(keys["ES256"], claims(sub="dave", cnf={"jkt": jkt(client)}))
    bearer = {"authorization": f"Bearer {mint(keys['ES256'], claims(sub='erin'))}"}
    assert (await a.check("GET", "/v1/quota", bearer)).allowed
    redis_server.stop()
    url = f"https://{HOST}/v1/orders"
    proof = {"authorization": f"DPoP {token}", "dpop": dpop_proof(client, "GET", url, token)}
    assert (await a.check("GET", "/v1/orders", proof)).allowed  # replay cache: this replica's own
    assert (await a.check("GET", "/v1/orders", proof)).reason == R.DPOP_PROOF_REPLAYED  # still refused here
    quota = [(await a.check("GET", "/v1/quota", bearer)).status for _ in range(15)]
    assert quota.count(200) == 10  # the shared limit goes on as a local one
    assert not a.state.up and a.state.fallbacks["replay"] >= 1 and a.state.fallbacks["quota"] >= 1
    assert [kind for kind, _ in a.alerts] == ["shared_state_unavailable"]  # once per outage, not per request
    redis_server.start()
    a.state._retry_at = 0.0  # skip the rest of the backoff
    fresh = {"authorization": f"DPoP {token}", "dpop": dpop_proof(client, "GET", url, token)}
    assert (await a.check("GET", "/v1/orders", fresh)).allowed
    assert a.state.up
    assert (await b.check("GET", "/v1/orders", fresh)).reason == R.DPOP_PROOF_REPLAYED  # shared again
