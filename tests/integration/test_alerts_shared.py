"""new_source_network across replicas: two alert monitors remembering clients' networks in one real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import reasons as R
from agent.audit.alerts import AlertMonitor
from agent.authn.principal import Principal
from agent.config.model import AlertSettings
from agent.decision import Decision, RequestView
from agent.ratelimit.shared import SharedState
from tests.redis_server import RedisServer
from tests.wait import until_async

PREFIX = "authz:orders:"
ROAMER = Principal("svc-roamer", "https://idp", "jwt", client_id="roamer")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class Replica:
    """One agent's alert monitor and Redis client, and the alerts it raised."""

    def __init__(self, url: str) -> None:
        self.alerts: list[tuple[str, dict[str, Any]]] = []
        self.state = SharedState(url, 0.2, PREFIX, alert=lambda k, d: self.alerts.append((k, d)))
        self.monitor = AlertMonitor(AlertSettings(), lambda k, d: self.alerts.append((k, d)), self.state)

    def seen(self, source: str, now: float, who: Principal = ROAMER) -> None:
        decision = Decision("id", True, 200, R.ALLOWED, "allow", "r", who)
        self.monitor.observe(RequestView("GET", "/", source=source), decision, now)

    async def settled(self) -> None:
        await until_async(lambda: self.monitor.asking == 0, "every sighting asked of Redis")

    def networks(self) -> list[str]:
        return [d["network"] for kind, d in self.alerts if kind == "new_source_network"]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[list[Replica]]:
    made = [Replica(redis_server.url) for _ in range(3)]
    yield made
    for r in made:
        await r.monitor.close()
        await r.state.close()


async def test_a_network_one_replica_learned_is_known_to_the_others(replicas: list[Replica]) -> None:
    a, b, restarted = replicas
    a.seen("10.1.0.7", 1000.0)  # the client's first network anywhere: learned silently
    assert a.monitor.asking  # the question is queued, never awaited on the decision's path
    await a.settled()
    b.seen("10.1.0.9", 1001.0)  # new to B, but A has seen it
    await b.settled()
    assert a.alerts == b.alerts == []
    b.seen("10.2.0.1", 1002.0)  # new to every replica
    await b.settled()
    assert b.networks() == ["10.2.0.0/24"] and a.alerts == []
    assert b.alerts[0][1] == {"client_id": "roamer", "subject": "svc-roamer", "network": "10.2.0.0/24",
                              "known_networks": 1, "source": "10.2.0.1"}  # fmt: skip
    a.seen("10.2.0.1", 1003.0)  # B has learned it
    await a.settled()
    assert a.alerts == []
    # A replica that starts afresh (its memory empty) remembers through Redis: its first sighting is not "first".
    restarted.seen("10.1.0.7", 1004.0)
    restarted.seen("10.3.0.1", 1005.0)
    await restarted.settled()
    assert restarted.networks() == ["10.3.0.0/24"] and restarted.alerts[0][1]["known_networks"] == 2


async def test_a_new_network_seen_by_two_replicas_at_once_raises_once(replicas: list[Replica]) -> None:
    a, b, _ = replicas
    for i in range(5):  # five clients, each seen by both replicas from a new network in the same instant
        who = Principal(f"svc-{i}", "https://idp", "jwt", client_id=f"client-{i}")
        a.seen("10.1.0.7", 1000.0, who)
        b.seen("10.1.0.7", 1000.0, who)
        await a.settled()
        await b.settled()
        a.seen(f"10.{10 + i}.0.1", 1001.0, who)
        b.seen(f"10.{10 + i}.0.2", 1001.0, who)
        await a.settled()
        await b.settled()
    assert sorted(a.networks() + b.networks()) == [f"10.{10 + i}.0.0/24" for i in range(5)]
    assert a.state.fallbacks["alerts"] == b.state.fallbacks["alerts"] == 0


async def test_networks_are_forgotten_in_redis_after_days(replicas: list[Replica], redis_server: RedisServer) -> None:
    a, b, _ = replicas
    day = 86400.0
    a.seen("10.1.0.7", 0.0)
    a.seen("10.2.0.7", 1.0)
    await a.settled()
    assert a.networks() == ["10.2.0.0/24"]
    b.seen("10.2.0.7", 6 * day)  # kept alive by another replica's sighting
    await b.settled()
    b.seen("10.1.0.7", 10 * day)  # not seen anywhere for ten days: new again, and 10.2 is still known
    await b.settled()
    assert b.networks() == ["10.1.0.0/24"] and b.alerts[0][1]["known_networks"] == 1
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        key = next(iter(client.scan_iter(PREFIX + "nets:*")))
        assert 0 < client.pttl(key) <= 7 * day * 1000  # the whole hash goes `days` after the last sighting
        assert sorted(client.hkeys(key)) == [b"10.1.0.0/24", b"10.2.0.0/24"]
    finally:
        client.close()


async def test_redis_away_the_replica_answers_from_its_own_memory(
    replicas: list[Replica], redis_server: RedisServer
) -> None:
    a, _, _ = replicas
    a.seen("10.1.0.7", 1000.0)
    await a.settled()
    redis_server.stop()
    a.seen("10.2.0.7", 1001.0)  # asked, Redis does not answer: this replica knows 10.1, so 10.2 is new
    await a.settled()
    assert a.networks() == ["10.2.0.0/24"]
    assert ("shared_state_unavailable", {"error": "ConnectionError"}) in a.alerts
    a.seen("10.3.0.7", 1500.0)  # in backoff (not asked) or asked again in vain: a fallback either way
    await a.settled()
    assert a.networks() == ["10.2.0.0/24", "10.3.0.0/24"] and a.state.fallbacks["alerts"] == 2


async def test_the_server_gives_its_monitor_the_policys_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    from agent.config import load_policy_text
    from agent.server.run import AgentServer

    text = (
        "version: 1\nservice: orders\nroutes:\n  - {name: r, match: {path: /}, public: true}\n"
        f'shared_state: {{redis: "{redis_server.url}"}}\n'
    )
    server = AgentServer(load_policy_text(text, "p.yaml"), "127.0.0.1:0", None, str(tmp_path / "audit.log"))
    try:
        monitor = server.engine.listeners[1]
        assert isinstance(monitor, AlertMonitor) and monitor.shared is server.shared is not None
    finally:
        await server.stop()
