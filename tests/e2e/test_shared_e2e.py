"""Two agents behind two Envoys sharing one real Redis: one quota, one replay cache, and Redis killed mid-run."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from agent import reasons as R
from agent.demo.app import demo_app, start_site
from agent.demo.idp import LocalIdP
from agent.envoyconf import EnvoyProcess, bootstrap
from tests.e2e.conftest import AgentProcess, LoopThread, Response, free_port, idp_yaml, request
from tests.keys import b64
from tests.redis_server import RedisServer
from tests.wait import until

pytestmark = pytest.mark.e2e

POLICY = """version: 1
service: orders
shared_state: {{redis: "{redis}", timeout_ms: 100}}
{idp}routes:
  - name: quota
    match: {{methods: [GET], path: /v1/quota}}
    authn: [jwt]
    allow: {{}}
    rate_limit: {{key: subject, per_minute: 6, burst: 6, shared: true}}
  - name: orders
    match: {{methods: [GET], path: /v1/orders}}
    authn: [jwt]
    allow: {{}}
default: deny
"""


@dataclass
class Pair:
    idp: LocalIdP
    redis: RedisServer
    ports: list[int]
    agents: list[AgentProcess]


@pytest.fixture(scope="module")
def pair(transport: str, loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("shared")
    redis = RedisServer(work / "redis")
    redis.start()
    idp = LocalIdP()
    loop_thread.run(idp.start())
    runner, app_port = loop_thread.run(start_site(demo_app()))
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(redis=redis.url, idp=idp_yaml(idp.issuer)))
    agents: list[AgentProcess] = []
    envoys: list[EnvoyProcess] = []
    ports: list[int] = []
    try:
        for i in range(2):
            replica = work / f"replica-{i}"
            replica.mkdir()
            listen = f"127.0.0.1:{free_port()}"
            agents.append(AgentProcess(policy, listen, replica, transport))
            port = free_port()
            envoy = EnvoyProcess(bootstrap(f"127.0.0.1:{port}", f"127.0.0.1:{app_port}", listen), replica)
            envoy.start()
            envoys.append(envoy)
            ports.append(port)
        yield Pair(idp, redis, ports, agents)
    finally:
        for e in envoys:
            e.stop()
        for a in agents:
            a.stop()
        redis.stop()
        loop_thread.run(runner.cleanup())
        loop_thread.run(idp.stop())


def get(port: int, path: str, headers: dict[str, str]) -> Response:
    return request(port, "GET", path, headers)


def test_one_quota_across_two_replicas(pair: Pair) -> None:
    bearer = {"authorization": f"Bearer {pair.idp.mint(sub=f'quota-{uuid.uuid4().hex}')}"}
    statuses = [get(pair.ports[i % 2], "/v1/quota", bearer).status for i in range(20)]
    # 6 a minute with a burst of 6, shared: six pass between both, plus at most one lease each in flight.
    assert 6 <= statuses.count(200) <= 8, statuses
    assert statuses.count(429) >= 12


def proof(key: ECKey, url: str, token: str) -> str:
    claims = {
        "jti": uuid.uuid4().hex,
        "htm": "GET",
        "htu": url,
        "iat": int(time.time()),
        "ath": b64(hashlib.sha256(token.encode()).digest()),
    }
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return jws.serialize_compact(header, json.dumps(claims).encode(), key, algorithms=["ES256"])


def test_a_dpop_proof_replayed_to_the_other_replica_is_refused(pair: Pair) -> None:
    key = ECKey.generate_key("P-256", private=True)
    token = pair.idp.mint(cnf={"jkt": key.thumbprint()})
    authority = f"127.0.0.1:{pair.ports[0]}"  # both replicas serve one name, as behind a load balancer
    headers = {
        "host": authority,
        "authorization": f"DPoP {token}",
        "dpop": proof(key, f"http://{authority}/v1/orders", token),
    }
    assert get(pair.ports[0], "/v1/orders", headers).status == 200
    replay = get(pair.ports[1], "/v1/orders", headers)
    assert replay.status == 401 and replay.json()["reason"] == R.DPOP_PROOF_REPLAYED


def test_redis_killed_mid_run_valid_requests_still_pass(pair: Pair) -> None:
    token = pair.idp.mint(sub=f"steady-{uuid.uuid4().hex}")
    bearer = {"authorization": f"Bearer {token}"}
    assert all(get(p, "/v1/orders", bearer).status == 200 for p in pair.ports)
    pair.redis.stop()
    try:
        for _ in range(3):
            assert all(get(p, "/v1/orders", bearer).status == 200 for p in pair.ports)
        quota = [get(pair.ports[0], "/v1/quota", bearer).status for _ in range(8)]
        assert quota.count(200) == 6  # the shared limit goes on locally on each replica
        key = ECKey.generate_key("P-256", private=True)
        bound = pair.idp.mint(cnf={"jkt": key.thumbprint()})
        authority = f"127.0.0.1:{pair.ports[0]}"
        headers = {
            "host": authority,
            "authorization": f"DPoP {bound}",
            "dpop": proof(key, f"http://{authority}/v1/orders", bound),
        }
        assert get(pair.ports[0], "/v1/orders", headers).status == 200
        assert get(pair.ports[0], "/v1/orders", headers).status == 401  # the replica's own cache still holds
    finally:
        pair.redis.start()
    until(
        lambda: '"alert":"shared_state_unavailable"' in "".join(a.logs() for a in pair.agents),
        "the shared_state_unavailable alert is in the audit stream",
    )  # an alert record in the audit stream
