"""Policy reload: a broken file is refused with file:line and the running policy stays; a good one is swapped in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import aiohttp

from agent import reasons as R
from agent.config import load_policy
from agent.decision import RequestView
from agent.server.run import AgentServer
from tests.keys import SigningKey, claims, mint

NEW_ROUTE = """  - name: list-invoices
    match: {methods: [GET], path: /v1/invoices}
    authn: [jwt]
    allow: {}
"""


async def decide(server: AgentServer, path: str, token: str) -> str:
    view = RequestView("GET", path, headers={"authorization": f"Bearer {token}"})
    return (await server.engine.check(view)).reason


async def test_broken_policy_is_refused_and_the_running_one_stays(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey], unused_tcp_port: int
) -> None:
    path = write_policy()
    admin = f"127.0.0.1:{unused_tcp_port}"
    server = AgentServer(load_policy(path), "127.0.0.1:0", admin, None, str(path))
    await server.start()
    try:
        assert await server.wait_ready(5)
        token = mint(keys["ES256"], claims())
        version = server.engine.policy.version
        good_text = path.read_text()
        path.write_text(good_text.replace("scopes_all: [orders:read]}", "scopes_al: [orders:read]}", 1))
        assert not await server.reload()
        assert server.engine.policy.version == version
        assert server.policy_error is not None and f"{path}:" in server.policy_error
        assert "did you mean 'scopes_all'" in server.policy_error
        assert await decide(server, "/v1/orders", token) == R.ALLOWED
        async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["policy_version"] == version and f"{path}:" in body["policy_error"]
        assert await decide(server, "/v1/invoices", token) == R.NO_ROUTE
        path.write_text(good_text.replace("default: deny", "") + NEW_ROUTE)
        assert await server.reload()
        assert server.engine.policy.version != version and server.policy_error is None
        assert await decide(server, "/v1/invoices", token) == R.ALLOWED
    finally:
        await server.stop(0.1)


async def test_file_change_is_picked_up_without_a_signal(
    write_policy: Callable[..., Path], keys: dict[str, SigningKey]
) -> None:
    import asyncio

    path = write_policy()
    server = AgentServer(load_policy(path), "127.0.0.1:0", None, None, str(path))
    await server.start()
    try:
        assert await server.wait_ready(5)
        before = server.engine.policy.version
        path.write_text(path.read_text().replace("default: deny", "") + NEW_ROUTE)
        for _ in range(50):
            if server.engine.policy.version != before:
                break
            await asyncio.sleep(0.1)
        assert server.engine.policy.version != before
        assert await decide(server, "/v1/invoices", mint(keys["ES256"])) == R.ALLOWED
    finally:
        await server.stop(0.1)


async def test_new_identity_provider_whose_keys_cannot_load_is_refused(
    write_policy: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_policy()
    server = AgentServer(load_policy(path), "127.0.0.1:0", None, None, str(path), reload_wait_s=0.5)
    await server.start()
    try:
        assert await server.wait_ready(5)
        before = server.engine.policy.version
        (tmp_path / "other.json").write_text(json.dumps({"keys": []}))
        path.write_text(path.read_text().replace("jwks_file: jwks.json", "jwks_file: other.json"))
        assert not await server.reload()
        assert server.engine.policy.version == before
        assert "not loaded" in (server.policy_error or "")
    finally:
        await server.stop(0.1)
